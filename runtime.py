"""The process a script runs in: its options, its rank in a distributed run, its device and precision.

    python -c "import runtime; print(runtime.get_device('auto'), runtime.peak_flops('cpu'))"

train_gpt2.py, bench.py and hellaswag.py share these; model.py knows only the network, and checkpoints.py the files
of a run directory.
"""

import dataclasses
import os
import signal
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist


class ConfigError(ValueError):
    """What a user can fix (an option, a file, a setting): the scripts print it as one line and exit with code 2."""

    every_rank = False  # True for what only one rank may see (its own chunk of data): that rank reports it too


# -----------------------------------------------------------------------------
# options: a dataclass whose fields are the `--name=value` options, each with its help text as metadata

def option(default, help, section=None):
    """A dataclass field with its --help text (and the title of the section it opens in --help)."""
    return dataclasses.field(default=default, metadata={"help": help, "section": section})


def parse_bool(text):
    value = text.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise ValueError("expected true/false/1/0")


def parse_args(argv, config_class):
    """A config_class (a dataclass of bool/int/float/str fields) from `--name=value` arguments, each converted to the
    field's type; the fields not given keep their defaults."""
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    overrides = {}
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"expected --name=value, got {arg!r} (see --help)")
        name, text = arg[2:].split("=", 1)
        if name not in fields:
            raise ConfigError(f"unknown option --{name} (see --help for the options)")
        kind = fields[name].type
        try:
            overrides[name] = parse_bool(text) if kind is bool else kind(text)
        except ValueError as e:
            detail = str(e) if kind is bool else f"expected {kind.__name__}"
            raise ConfigError(f"--{name}={text}: {detail}") from None
    return config_class(**overrides)


def usage(doc, config_class, where):
    """--help: the script's docstring, then every option of config_class with its default, type and help, under the
    section titles of its fields' metadata."""
    lines = [doc.strip(), "", f"options (--name=value), the defaults {where}:"]
    for f in dataclasses.fields(config_class):
        if f.metadata.get("section"):
            lines += ["", f"  {f.metadata['section']}"]
        text = f.metadata.get("help", "")
        lines.append(f"    --{f.name}={f.default!r} ({f.type.__name__})" + (f"  {text}" if text else ""))
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# ranks: torchrun's environment, one process without it

@dataclass
class Dist:
    ddp: bool
    rank: int
    local_rank: int
    world_size: int

    @property
    def master(self):
        return self.rank == 0  # rank 0 alone prints and writes files; every rank computes


def dist_from_env():
    """Ranks from torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE); one process without it."""
    if "RANK" not in os.environ:
        return Dist(ddp=False, rank=0, local_rank=0, world_size=1)
    return Dist(ddp=True, rank=int(os.environ["RANK"]), local_rank=int(os.environ["LOCAL_RANK"]),
                world_size=int(os.environ["WORLD_SIZE"]))


def init_distributed(d, device):
    """Join the process group of a torchrun launch: NCCL between GPUs, gloo between CPU processes."""
    if not d.ddp:
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl", device_id=device)
    else:
        dist.init_process_group(backend="gloo")


class StopSignal:
    """SIGINT (Ctrl-C) and SIGTERM (kill, cloud preemption, a scheduler's time limit) as requests to stop: inside the
    `with` block the first one only sets a flag, which the training loop reads after each optimizer step (it saves a
    checkpoint and exits); a second SIGINT, a person pressing Ctrl-C again, raises KeyboardInterrupt at once. Not a
    second SIGTERM, nor a SIGINT within a second of the first: under torchrun one Ctrl-C reaches a worker twice (from
    the terminal, then forwarded by torchrun), and torchrun forwards the SIGTERM it gets. The previous handlers come
    back on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    REPEAT_AFTER = 1.0  # seconds: a SIGINT this long after the first is a second Ctrl-C

    def __init__(self):
        self.signum = 0  # the first signal received, 0 for none
        self.first_at = 0.0
        self.previous = {}

    def __enter__(self):
        for signum in self.SIGNALS:
            self.previous[signum] = signal.signal(signum, self.handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def handle(self, signum, frame):
        if not self.signum:
            self.signum, self.first_at = signum, time.monotonic()
        elif signum == signal.SIGINT and time.monotonic() - self.first_at >= self.REPEAT_AFTER:
            raise KeyboardInterrupt

    def stop_after(self, step, save, script, device, d):
        """After optimizer step `step` (0-based): if a stop was asked for on any rank, save the state of step + 1 steps
        done (save(step) returns the checkpoint's path), say so in one line and return the exit code, 128 + the
        signal's number (the shell's code for "ended by this signal"); else 0. Collective, as agreed()."""
        signum = self.agreed(device, d.ddp)
        if signum:
            path = save(step + 1)
            if d.master:
                print(f"{script}: stopped at step {step + 1} ({signal.Signals(signum).name}); saved {path}; run the "
                      "same command to continue", file=sys.stderr, flush=True)
        return 128 + signum if signum else 0

    def agreed(self, device, ddp):
        """The stop signal's number, or 0, the same on every rank: a signal that reached any rank stops them all at
        the same step. Collective in a distributed run (every rank calls it after every step)."""
        if not ddp:
            return self.signum
        flag = torch.tensor([self.signum], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())


def script_main(script, d, work):
    """A training script's main() around work(), which returns the exit code: a ConfigError is one line
    `SCRIPT: error: ...` and exit code 2; a Ctrl-C before training started (or a second one) stops at once with one
    line and 130; the process group is left in the end, the ranks together after a normal end."""
    together = False
    try:
        code = work()
        together = True  # every rank got here: a normal end, or one stop step agreed by all
        return code
    except ConfigError as e:
        if d.master or e.every_rank:
            print(f"{script}: error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before training started, or a second one: stop at once, nothing saved
        if d.master:
            print(f"\n{script}: interrupted, nothing saved since the last checkpoint; run the same command to "
                  "continue from it", file=sys.stderr, flush=True)
        return 128 + signal.SIGINT
    finally:
        end_distributed(together)


def end_distributed(together):
    """Leave the process group, if any. together: every rank ended normally, so they first wait for each other (a
    barrier): rank 0 may still be writing its last checkpoint, and gloo aborts a process (std::terminate, SIGABRT)
    whose peer tears the connections down under it. Not after an error, which another rank may never reach."""
    if dist.is_initialized():
        if together:
            dist.barrier()
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# the device and its precision

def default_device():
    """The device to run on when none is named: cuda, then mps, then cpu."""
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def get_device(name, d=None):
    """The torch.device for a --device value ("auto" picks default_device()), checked to exist on this machine; in a
    distributed run each process takes the GPU of its local rank. Raises ConfigError."""
    name = default_device() if name == "auto" else name
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"--device {name}: {str(e).splitlines()[0]}") from None
    available = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available, "cpu": lambda: True}
    if device.type not in available:
        raise ConfigError(f"--device {name}: expected cuda, mps or cpu")
    if not available[device.type]():
        raise ConfigError(f"--device {name}: not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if d is not None and d.ddp:
        if device.type == "mps":
            raise ConfigError("distributed training needs cuda (NCCL) or cpu (gloo), not mps")
        if device.type == "cuda":
            return torch.device("cuda", d.local_rank)
    return device


def setup_precision(device):
    """The recipe's precision: TF32 matmuls and bf16 autocast on CUDA (returns torch.bfloat16); plain fp32 on cpu and
    mps (returns None), where it is exact and reproducible."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
    return None


def autocast(device_type, dtype):
    """torch.autocast to dtype on device_type ("cuda", "cpu"...), a no-op when dtype is None (full precision)."""
    return torch.autocast(device_type=device_type, dtype=dtype, enabled=dtype is not None)


# Dense (no sparsity) bf16 tensor-core peak FLOP/s from NVIDIA's datasheets, by substring of the device name;
# the first match wins, so the more specific names come first.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("GH200", 989e12),
    ("H200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
)


def peak_flops(device):
    """The bf16 dense peak FLOP/s of a torch.device, or None where it is unknown (CPU, MPS, an unlisted GPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return peak_flops_of(torch.cuda.get_device_name(device))


def peak_flops_of(name):
    """The bf16 dense peak FLOP/s of a GPU by its name, or None for an unlisted one."""
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


# -----------------------------------------------------------------------------
# memory: what a device can still give, what training a micro-batch takes, and the largest micro-batch that fits.
# Out of memory, a GPU raises OutOfMemoryError, so there a trial step decides; on cpu (the kernel's OOM killer) and
# mps the process dies instead, so there an estimate is held against the memory available.

GB = 1e9  # the unit of the messages


def cgroup_memory_left(proc_cgroup="/proc/self/cgroup", cgroup_fs="/sys/fs/cgroup"):
    """Bytes left under the memory limit of this process's cgroup (a container, a batch job), or None without a
    limit: the limit less the usage, the inactive page cache not counted (the kernel drops it before it kills)."""
    try:
        with open(proc_cgroup) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    left = None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2
            root, limit_file, usage_file, inactive_key = cgroup_fs, "memory.max", "memory.current", "inactive_file"
        elif "memory" in controllers.split(","):  # cgroup v1
            root, limit_file, usage_file, inactive_key = (os.path.join(cgroup_fs, "memory"), "memory.limit_in_bytes",
                                                          "memory.usage_in_bytes", "total_inactive_file")
        else:
            continue
        # the path is the cgroup as the host names it; inside a container, the container's own is mounted at the root
        for directory in dict.fromkeys((root + path.rstrip("/"), root)):
            try:
                with open(os.path.join(directory, limit_file)) as f:
                    limit = f.read().strip()
                with open(os.path.join(directory, usage_file)) as f:
                    usage = int(f.read())
                with open(os.path.join(directory, "memory.stat")) as f:
                    inactive = int(dict(line.split() for line in f).get(inactive_key, 0))
                limit = None if limit == "max" else int(limit)
            except (OSError, ValueError):
                continue
            if limit is not None and limit < 2**60:  # v1 writes "no limit" as a huge number
                here = limit - (usage - inactive)
                left = here if left is None else min(left, here)
            break
    return left


def available_memory(device):
    """(bytes this process can still allocate on device, words that follow "N GB" to say where the figure comes
    from), for cpu and mps.

    cpu: Linux's MemAvailable (free memory and the caches the kernel can drop), or what the cgroup's limit leaves where
    that is less; off Linux, the physical memory (macOS compresses and swaps before it kills). mps: Metal's recommended
    working set less what is allocated on it. Raises ConfigError where neither is known."""
    if torch.device(device).type == "mps":
        return (torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory(),
                "left of Metal's recommended working set")
    try:
        with open("/proc/meminfo") as f:
            info = {key: value.split() for key, value in (line.split(":", 1) for line in f)}
        available, where = int(info["MemAvailable"][0]) * 1024, "available per /proc/meminfo"  # kB
    except (OSError, KeyError, ValueError):
        try:
            available, where = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "of physical memory"
        except (AttributeError, ValueError, OSError):
            raise ConfigError("--batch_size=auto: cannot tell how much memory this machine has; "
                              "pass --batch_size=N") from None
    left = cgroup_memory_left()
    if left is not None and left < available:
        available, where = left, "left under the cgroup's memory limit"
    return max(available, 0), where


def memory_budget(device, extra=0):
    """(bytes, description) that this process may plan to use on cpu / mps: available_memory, plus `extra` bytes it
    holds now and frees before training, shared equally by the processes of a torchrun launch on this machine
    (LOCAL_WORLD_SIZE), which draw on the same memory."""
    available, where = available_memory(device)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    text = f"{(available + extra) / GB:.1f} GB {where}"
    text += f", the checkpoint's {extra / GB:.1f} GB (freed once loaded) included" if extra else ""
    text += f", shared by {local} processes" if local > 1 else ""
    return (available + extra) // local, text


def train_memory_bytes(config, n_params, batch_size, block_size, attention_matrix=False):
    """Estimated peak memory in bytes of training a GPT (config: a model.GPTConfig) of n_params parameters on
    micro-batches of batch_size sequences of block_size tokens: fp32, eager, AdamW. An upper bound, for cpu and mps;
    attention_matrix: attention computes each head's (T, T) matrix (mps: no flash kernel for training there).

    - 24 bytes a parameter: fp32 weights, gradients and AdamW's two moments (16), and the step's parameter-sized
      transients (the foreach AdamW update's intermediates, the tied embedding's dense gradient): measured 5-6 bytes a
      parameter at small batches, 8 counted.
    - per token, in fp32 floats (C = n_embd, V = vocab_size): each block keeps for backward its input, the two norms'
      outputs, q/k/v (3 C), the attention's output, the residual between attention and MLP (8 C in all; 2 C more
      where qk_norm or rope make new q and k), and the MLP's hidden activations: GELU's input and output, ReLU^2's two
      (8 C), SwiGLU's gate/value pair, gate activation and product (4 x hidden). Measured, a block takes 1.7-1.9 times
      what it keeps (the gradients of the block being backpropagated, the allocator's slack): twice is counted. The
      head: ln_f's input and output (2 C); the logits (V; train_step holds them through backward), log-softmax's
      output (V) and, in backward, its gradient and the logits' (2 V), measured 4.1 V: 5 V counted, one more with
      the soft-cap (its tanh's output).
    - 256 MiB for the runtime's workspaces and the allocator's arenas.
    Calibrated against bench.py on CPU: 1.2-1.6 times the growth of its peak RSS over the RSS before setup, at the
    shapes measured (tests/test_memory.py checks one)."""
    C, V = config.n_embd, config.vocab_size
    if config.mlp == "swiglu":
        mlp = 4 * (-(-8 * C // (3 * 64)) * 64)  # model.MLP's hidden size: 8/3 C rounded up to a multiple of 64
    else:
        mlp = 8 * C
    block = 8 * C + mlp + (2 * C if config.qk_norm or config.pos_emb == "rope" else 0)
    if attention_matrix:
        block += config.n_head * block_size  # each token's row of softmax(q k^T / sqrt(hs)), in every head
    head = 2 * C + (5 + (config.logit_softcap > 0)) * V
    return 24 * n_params + 4 * batch_size * block_size * (2 * config.n_layer * block + head) + 256 * 2**20


def fits_on_gpu(model, batch_size, block_size, reserve_bytes, autocast_dtype):
    """Whether training model on micro-batches of batch_size sequences fits in its GPU's memory next to reserve_bytes
    more (what the run holds besides: AdamW's moments, allocated by the first step; DDP's buckets; headroom): one
    forward and backward of the eager model (torch.compile's needs no more) on token 0 under the run's autocast, with
    reserve_bytes held meanwhile. Everything it allocates is freed again, the gradients too."""
    device = next(model.parameters()).device
    reserve = idx = logits = loss = None
    try:
        reserve = torch.empty(reserve_bytes, dtype=torch.uint8, device=device)
        idx = torch.zeros((batch_size, block_size), dtype=torch.long, device=device)  # no RNG drawn: the run's stays
        with autocast(device.type, autocast_dtype):
            logits, loss = model(idx, idx)  # held through backward, as train_step holds them
        loss.backward()
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        del reserve, idx, logits, loss  # what the attempt held (a failed one's graph left with the exception)
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the next, smaller try starts from a clean cache
            torch.cuda.reset_peak_memory_stats(device)  # bench.py reports the run's peak, not the trial's


def largest_fitting(candidates, fits, first=None):
    """(the first size of candidates, largest first, for which fits(size) is true, or None; the sizes tried that did
    not fit, in order). first (a resumed run's micro-batch) is tried before them, and if it does not fit, only the
    smaller candidates: a size that fits is taken to make every smaller one fit."""
    order = list(candidates) if first is None else [first] + [size for size in candidates if size < first]
    rejected = []
    for size in order:
        if fits(size):
            return size, rejected
        rejected.append(size)
    return None, rejected
