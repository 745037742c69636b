"""The process a script runs in: its rank in a distributed run, its device and precision, and how it stops.

    python -c "import runtime; print(runtime.get_device('auto'), runtime.peak_flops('cpu'))"
"""

import inspect
import os
import resource
import signal
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from files import WriteError
from options import ConfigError


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
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl", device_id=device)
    else:
        dist.init_process_group(backend="gloo")


def wrap_ddp(model, d, device):
    """model in DistributedDataParallel: gradients as views of the all-reduce buckets (no second copy), and no buffer
    broadcast before each forward (the only buffers, the rotary tables, are the same on every rank)."""
    newer = "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
    no_buffer_sync = {"forward_sync_buffers": False} if newer else {"broadcast_buffers": False}
    return DDP(model, device_ids=[d.local_rank] if device.type == "cuda" else None, gradient_as_bucket_view=True,
               **no_buffer_sync)


class StopSignal:
    """Ctrl-C or SIGTERM (preemption) in the `with` block: save after the step, exit; a second Ctrl-C stops at once."""

    SIGNALS, REPEAT_AFTER = (signal.SIGINT, signal.SIGTERM), 1.0  # seconds: torchrun forwards one Ctrl-C twice

    def __init__(self, writes=None):
        self.signum, self.first_at, self.previous = 0, 0.0, {}  # the first signal received (0: none), when
        self.writes = writes or Writes(ddp=False)  # its failure travels in the same all-reduce as the signal

    def __enter__(self):
        self.previous = {signum: signal.signal(signum, self.handle) for signum in self.SIGNALS}
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
        return self.stop_at(step + 1, save, script, self.agreed(device, d.ddp), d, device)

    def stop_at(self, steps_done, save, script, signum, d, device):
        """With signum (agreed()'s) set: save the state of steps_done steps, say so and return 128 + signum; else 0."""
        return self.stop_now(steps_done, save, script, signum, d, device) if signum else 0

    def stop_now(self, steps_done, save, script, signum, d, device):
        path = save(steps_done)
        self.writes.agreed(device)  # not "saved" if rank 0 could not
        if d.master:
            print(f"{script}: stopped at step {steps_done} ({signal.Signals(signum).name}); saved {path}; run the "
                  "same command to continue", file=sys.stderr, flush=True)
        return 128 + signum

    def flags(self, device):
        """[SIGINT received, SIGTERM received, rank 0's writes failed] on device, to be summed over the ranks
        (train_step's also_reduce). Filled by kernels, not copied from the host: a pageable host-to-device copy would
        wait for the device."""
        flags = torch.zeros(len(self.SIGNALS) + 1, device=device)
        if self.signum:
            flags[self.SIGNALS.index(self.signum)].fill_(1.0)
        if self.writes.failed:
            flags[-1].fill_(1.0)
        return flags

    def from_flags(self, flags):
        """The signal number of flags summed over the ranks (SIGTERM over SIGINT, as agreed()'s MAX), or 0; every
        rank stops (Writes.stop) if rank 0's writes failed."""
        *received, failed = flags.tolist()
        if failed:
            self.writes.stop()
        return max((signum for signum, n in zip(self.SIGNALS, received) if n > 0), default=0)

    def agreed(self, device, ddp):
        """The stop signal's number or 0, the same on every rank: collective in a distributed run, after every step."""
        return self.agreed_by_all(device) if ddp else self.signum

    def agreed_by_all(self, device):
        flag = torch.tensor([self.signum, self.writes.failed], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        signum, failed = flag.tolist()
        if failed:
            self.writes.stop()
        return signum


class PeerWriteError(Exception):
    """Raised on the ranks that write nothing when rank 0 could not write a file: they stop too (rank 0 says why)."""


class Writes:
    """Rank 0's writes: a WriteError raised at once, or held in a distributed run until all ranks agree to stop."""

    def __init__(self, ddp, context=None):
        self.ddp, self.context, self.error = ddp, context, None  # context(step): what a failure at step adds

    @property
    def failed(self):
        return int(self.error is not None)

    def write(self, step, fn, *args, **kwargs):
        """fn(*args, **kwargs), the writes at `step`, unless an earlier write failed (None then)."""
        if self.error is None:
            try:
                return fn(*args, **kwargs)
            except WriteError as e:
                self.failed_at(step, e)

    def failed_at(self, step, error):
        """A write at step failed: raised at once in one process, held until the next agreement in a distributed run."""
        if self.context and not error.context:
            error.context = self.context(step)
        if not self.ddp:
            raise error
        self.error = error

    def agreed(self, device):
        """Stop every rank if rank 0's writes failed. Collective in a distributed run."""
        if not self.ddp:
            return
        flag = torch.tensor([self.failed], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            self.stop()

    def stop(self):
        raise self.error if self.error is not None else PeerWriteError()


def script_main(script, d, work):
    """work()'s exit code; a ConfigError one line and 2, a WriteError one line and 1, a Ctrl-C before training (or a
    second one) one line and 130; the ranks leave the process group together."""
    together = False
    try:
        code = work()
        together = True  # every rank got here: a normal end, or one stop step agreed by all
        return code
    except ConfigError as e:
        if d.master or e.every_rank:
            print(f"{script}: error: {e}", file=sys.stderr, flush=True)
        return 2
    except WriteError as e:  # a full disk, say: nothing half-written is left, the rerun continues from a checkpoint
        print(f"{script}: error: {e}", file=sys.stderr, flush=True)
        return 1
    except PeerWriteError:  # rank 0 could not write a file and said so
        return 1
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

def default_device():
    return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"


def get_device(name, d=None):
    """The torch.device of a --device value ("auto": cuda, then mps, then cpu), checked to exist here (ConfigError)."""
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
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return rank_device(device, d) if d is not None and d.ddp else device


def rank_device(device, d):
    """A distributed run's device: each process takes the GPU of its local rank; mps has no collectives."""
    if device.type == "mps":
        raise ConfigError("distributed training needs cuda (NCCL) or cpu (gloo), not mps")
    return torch.device("cuda", d.local_rank) if device.type == "cuda" else device


def setup_precision(device):
    """TF32 matmuls and bf16 autocast on CUDA (returns torch.bfloat16); fp32 on cpu and mps (None): exact there."""
    if device.type != "cuda":
        return None
    torch.set_float32_matmul_precision("high")
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else None


def autocast(device_type, dtype):
    """torch.autocast to dtype, a no-op when dtype is None (full precision)."""
    return torch.autocast(device_type=device_type, dtype=dtype, enabled=dtype is not None)


# Dense bf16 peak FLOP/s (GeForce: fp32 accumulation) by device-name substring, first match winning; see docs/speed.md
PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("GH200", 989e12),  # "H100": SXM
                   ("H200 NVL", 835e12), ("H200", 989e12), ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12),
                   ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12), ("RTX 4090", 165e12),
                   ("RTX 4080 SUPER", 104.5e12), ("RTX 4080", 97.5e12), ("RTX 4070 Ti SUPER", 88.2e12),
                   ("RTX 4070 Ti", 80.2e12), ("RTX 4070 SUPER", 71.0e12), ("RTX 4070", 58.3e12),
                   ("RTX 3090 Ti", 79.8e12), ("RTX 3090", 71e12), ("RTX 3080 Ti", 68.0e12), ("RTX 3080", 59.5e12))


def peak_memory_bytes(device):
    """The run's peak memory so far: the CUDA caching allocator's high-water mark, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # macOS counts bytes, Linux KiB


def peak_flops(device):
    """The bf16 dense peak FLOP/s of a torch.device, or None where it is unknown (CPU, MPS, an unlisted GPU)."""
    device = torch.device(device)
    return peak_flops_of(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def peak_flops_of(name):
    """The bf16 dense peak FLOP/s of a GPU by its name, or None for an unlisted one (a laptop GPU too: the same name
    as a desktop card's, at far lower clocks and power)."""
    name = name.lower()
    if "laptop" in name:
        return None
    return next((flops for key, flops in PEAK_BF16_FLOPS if key.lower() in name), None)


# -----------------------------------------------------------------------------

def step_progress(step, max_steps, step_times):
    """("STEP/MAX", "ETA 3m12s") after step `step` (0-based): the mean step time times the steps left (the first step,
    compile's and warm-up's, left out once there are others; evals and checkpoints not counted)."""
    steady = step_times[1:] or step_times
    left = max_steps - step - 1
    return f"{step:5d}/{max_steps}", f"ETA {format_duration(left * sum(steady) / len(steady))}"


def format_duration(seconds):
    """42s, 3m12s, 5h07m: two units at most, the larger first."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"
