"""What guards a training run, one call each from its story: the options, the model it starts from, the micro-batch
that fits in memory, the ranks' agreement, the stop on a non-finite loss."""

import contextlib
import dataclasses
import importlib.util
import math
import os
import sys

import torch
import torch.distributed as dist

from checkpoints import checkpoint_config, list_checkpoints
from model import GPT, GPT2_VOCAB_SIZE, GPTConfig
from optim import train_step
from options import ConfigError

GB = 1e9  # the unit of the messages
MAX_AUTO_BATCH_SIZE = 64  # build-nanogpt's 64 x 1024 tokens fill an H100: a larger micro-batch buys no speed


def check_ranges(cfg, positive=(), non_negative=()):
    """ConfigError for the first option of positive not > 0 or of non_negative < 0, then AdamW's and the device's."""
    for name in (*positive, *non_negative):
        value, strict = getattr(cfg, name), name in positive
        if value < 0 or (strict and value == 0):
            raise ConfigError(f"--{name} must be {'>' if strict else '>='} 0, got {value}")
    if not (0 <= cfg.beta1 < 1 and 0 <= cfg.beta2 < 1 and cfg.eps > 0):
        raise ConfigError(f"need 0 <= beta1, beta2 < 1 and eps > 0, got {cfg.beta1}, {cfg.beta2}, {cfg.eps}")
    if not 0 < cfg.max_lr or cfg.min_lr > cfg.max_lr:
        raise ConfigError(f"need 0 <= min_lr <= max_lr and max_lr > 0, got min_lr={cfg.min_lr} max_lr={cfg.max_lr}")
    if cfg.device not in ("auto", "cuda", "mps", "cpu"):
        raise ConfigError(f"--device must be auto, cuda, mps or cpu, got {cfg.device!r}")


def check_config(cfg, world_size):
    """ConfigError for a setting that can't work, before anything is built; else grad_accum_steps (None for auto)."""
    auto = cfg.batch_size == "auto"  # then some micro-batch must split the batch: 1 does if any does
    if not auto and cfg.batch_size <= 0:
        raise ConfigError(f"--batch_size must be 'auto' or > 0, got {cfg.batch_size!r}")
    check_ranges(cfg, positive=("n_layer", "n_head", "n_embd", "vocab_size", "block_size", "total_batch_size",
                                "max_steps", "num_samples", "sample_length"),
                 non_negative=("warmup_steps", "val_every", "hellaswag_every", "hellaswag_limit", "sample_every",
                               "checkpoint_every", "keep_checkpoints", "weight_decay", "grad_clip", "min_lr",
                               "embedding_lr", "head_lr", "scalar_lr", "muon_momentum_warmup", "logit_softcap"))
    try:  # the architecture switches, checked by the model's own config
        model_config(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.optimizer not in ("adamw", "muon") or cfg.schedule not in ("cosine", "warmdown"):
        raise ConfigError(f"need --optimizer adamw or muon and --schedule cosine or warmdown, got {cfg.optimizer!r} "
                          f"and {cfg.schedule!r}")
    if not 0 <= cfg.warmdown_frac <= 1:
        raise ConfigError(f"--warmdown_frac must be in [0, 1], got {cfg.warmdown_frac}")
    if not cfg.init_from:
        raise ConfigError("--init_from must be 'scratch' or a GPT-2 model name / directory")
    if cfg.val_every and cfg.val_tokens <= 0:
        raise ConfigError(f"--val_tokens must be > 0, got {cfg.val_tokens}")
    B, T = (1 if auto else cfg.batch_size), cfg.block_size
    tail = " (--batch_size=auto: not even for batch_size 1)" if auto else ""
    if cfg.total_batch_size % (B * T * world_size):
        raise ConfigError(f"total_batch_size {cfg.total_batch_size} is not a multiple of batch_size * block_size * "
                          f"processes = {B} * {T} * {world_size} = {B * T * world_size}{tail}")
    if cfg.val_every and cfg.val_tokens % (B * T):
        raise ConfigError(f"val_tokens {cfg.val_tokens} is not a multiple of batch_size * block_size = {B * T}{tail}")
    # sampling and HellaSwag speak GPT-2 BPE: a scratch model needs every GPT-2 token id (from_pretrained's has them)
    if cfg.init_from == "scratch" and cfg.vocab_size < GPT2_VOCAB_SIZE and (cfg.sample_every or cfg.hellaswag_every):
        raise ConfigError(f"vocab_size {cfg.vocab_size} < {GPT2_VOCAB_SIZE} (GPT-2's tokenizer): "
                          "sampling and HellaSwag need the GPT-2 vocabulary; set --sample_every=0 --hellaswag_every=0")
    if cfg.wandb_log and importlib.util.find_spec("wandb") is None:
        raise ConfigError("--wandb_log=true needs wandb: pip install wandb")
    return None if auto else cfg.total_batch_size // (B * T * world_size)


# -----------------------------------------------------------------------------
# the model a run starts from

def model_fields(cfg):
    """GPTConfig's fields among the options, block_size aside: a run may train on shorter sequences than its model's."""
    return [f.name for f in dataclasses.fields(GPTConfig) if f.name != "block_size" and hasattr(cfg, f.name)]


def model_config(cfg):
    """The GPTConfig of a fresh model of the options' architecture."""
    return GPTConfig(block_size=cfg.block_size, **{k: getattr(cfg, k) for k in model_fields(cfg)})


def check_start(cfg, start, source, log=print):
    """cfg with the architecture of the model the run starts from, start: a checkpoint being resumed (its
    architecture and optimizer must be the options') or GPT-2's weights (init_from: its architecture replaces the
    options'). source names start in the errors."""
    config = checkpoint_config(start, source)
    fields = model_fields(cfg)
    if "train_config" in start and cfg.init_from == "scratch":
        differ = [f"{k}={getattr(cfg, k)} (checkpoint: {getattr(config, k)})" for k in fields
                  if getattr(config, k) != getattr(cfg, k)]
        # --recipe=fast's block before nanochat's (transformers' NanoChatForCausalLM): what resumes its checkpoints
        earlier = dict(norm="rmsnorm", norm_eps=1e-5, embed_norm=False)
        if (differ and cfg.recipe == "fast" and all(getattr(config, k) == v for k, v in earlier.items())
                and all(getattr(config, k) == getattr(cfg, k) for k in fields if k not in earlier)):
            resume = " ".join(f"--{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in earlier.items())
            resume += " --muon_momentum_warmup=0"  # nor did its Muon warm up its momentum: the run continues as it was
            raise ConfigError(f"{source}: trained with the earlier --recipe=fast block (RMSNorm with gains, eps "
                              f"1e-5, no embedding norm), not today's nanochat block: resume it with --recipe=fast "
                              f"{resume}")
        if differ:
            raise ConfigError(f"{source}: the checkpoint's model differs from the options: {', '.join(differ)}")
    if "train_config" not in start:
        log(f"init_from={cfg.init_from}: the model's own architecture replaces {'/'.join(fields)}")
    if "optimizer" in start and start["train_config"].get("optimizer", "adamw") != cfg.optimizer:
        raise ConfigError(f"{source}: trained with --optimizer={start['train_config'].get('optimizer', 'adamw')}, "
                          f"not {cfg.optimizer}: its optimizer state is that optimizer's (pick another --log_dir for "
                          "a new run)")
    if cfg.block_size > config.block_size:
        raise ConfigError(f"{source}: block_size {cfg.block_size} > the model's {config.block_size} positions")
    return dataclasses.replace(cfg, **{k: getattr(config, k) for k in fields})


def check_same_step(start_step, device):
    """Every rank reads log_dir itself: on several nodes without a shared log_dir they would resume different steps
    (or some none) and train replicas that silently drift apart. Collective: every rank calls it."""
    steps = torch.tensor([start_step, -start_step], device=device)
    dist.all_reduce(steps, op=dist.ReduceOp.MAX)  # [max, -min]
    if steps[0].item() != -steps[1].item():
        raise ConfigError(f"the ranks found different checkpoints to resume (steps {-steps[1].item()} to "
                          f"{steps[0].item()}): log_dir must be one directory that every node shares")


def check_finite(loss, grad_norm, step, log_dir, master, script):
    """Whether a step's loss and gradient norm are finite; if not, rank 0 prints one line naming the step and the last
    checkpoint (left as it is), and the loop stops with exit code 1."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return True
    saved = list_checkpoints(log_dir)
    last_good = f"the last checkpoint is {saved[-1][1]}" if saved else "no checkpoint was saved"
    if master:
        print(f"{script}: error: step {step}: non-finite loss {loss} / grad norm {grad_norm}; stopped, {last_good}",
              file=sys.stderr, flush=True)
    return False


# -----------------------------------------------------------------------------
# the micro-batch: the largest that fits, gradient accumulation making up the batch. A GPU out of memory raises, so
# trial steps decide there; on cpu and mps the kernel kills the process instead, so an estimate decides there.

def splits_batch(cfg, world_size, batch_size):
    """Whether batch_size sequences make up total_batch_size in whole micro-steps (and val_tokens in whole batches)."""
    return (cfg.total_batch_size % (batch_size * cfg.block_size * world_size) == 0
            and not (cfg.val_every and cfg.val_tokens % (batch_size * cfg.block_size)))


def batch_size_candidates(cfg, world_size):
    """The micro-batches --batch_size=auto chooses from, largest first."""
    return [b for b in range(MAX_AUTO_BATCH_SIZE, 0, -1) if splits_batch(cfg, world_size, b)]


def fit_micro_batch(cfg, d, device, autocast_dtype, start=None, log=print):
    """cfg with --batch_size=auto resolved, logged with why: the largest candidate that fits, a resume's own first."""
    T, config = cfg.block_size, checkpoint_config(start) if start else model_config(cfg)
    kept = start.get("train_config", {}).get("batch_size") if start else None
    first = kept if isinstance(kept, int) and splits_batch(cfg, d.world_size, kept) else None
    measure = gpu_trial if device.type == "cuda" else memory_estimate
    fits, why_not, why_fits = measure(config, T, device, autocast_dtype, start)
    own, rejected = largest_fitting(batch_size_candidates(cfg, d.world_size), fits, first)
    chosen = smallest_of_ranks(own, device) if d.ddp else own  # the ranks must cut the batch alike
    if chosen is None:
        raise ConfigError(f"--batch_size=auto: even one sequence of {T} tokens {why_not(None)}; train a smaller model "
                          "or shorter sequences (--block_size)")
    why = f"{rejected[-1]} {why_not(rejected[-1])}" if rejected else why_fits(chosen)
    why += f"; another rank can take only {chosen}" if chosen != own else ""
    if kept is not None:
        why = resumed_why(kept, first, chosen, why)
    steps = cfg.total_batch_size // (chosen * T * d.world_size)
    log(f"micro-batch {chosen} (auto: {why}) x {steps} accumulation steps")
    return dataclasses.replace(cfg, batch_size=chosen)


def smallest_of_ranks(batch_size, device):
    """The smallest of the ranks' choices, None if one rank has none. Collective."""
    smallest = torch.tensor(batch_size or 0, device=device)
    dist.all_reduce(smallest, op=dist.ReduceOp.MIN)
    return smallest.item() or None


def resumed_why(kept, first, chosen, why):
    """Why a resumed run takes chosen, its checkpoint's micro-batch being kept (first: kept if it splits the batch):
    another split of the batch changes the losses in their last bits."""
    if chosen == kept:
        return "the checkpoint's, which still fits: the resume stays exact"
    return (f"the checkpoint's {kept} {'no longer fits' if first else 'no longer splits the batch'}: the losses will "
            f"differ from an unbroken run's in the last bits; {why}")


def gpu_trial(config, T, device, autocast_dtype, start):
    """(fits, why_not, why_fits) by trial steps, 5% of the GPU held back for fragmentation and the evals' shapes."""
    reserve = torch.cuda.get_device_properties(device).total_memory // 20
    none_fits = f"runs out of GPU memory in a trial step (with {reserve / GB:.1f} GB reserved as headroom)"
    return (lambda b: fits_on_gpu(config, b, T, reserve, autocast_dtype, device),
            lambda b: "ran out of GPU memory in a trial step" if b else none_fits,
            lambda b: "a trial step fits in GPU memory")


def memory_estimate(config, T, device, autocast_dtype, start):
    """(fits, why_not, why_fits) by train_memory_bytes against memory_budget; start (freed once it is in the model)
    counts as available."""
    budget, where = memory_budget(device, extra=sum(tensor_storages(start).values()) if start else 0)
    with torch.device("meta"):  # the shapes alone: nothing is allocated
        n_params = GPT(config).num_params()

    def need(b):  # b None: the smallest, 1
        return train_memory_bytes(config, n_params, b or 1, T, attention_matrix=device.type == "mps")
    return (lambda b: need(b) <= budget, lambda b: f"would need ~{need(b) / GB:.1f} GB, {where}",
            lambda b: f"needs ~{need(b) / GB:.1f} GB, {where}")


def largest_fitting(candidates, fits, first=None):
    """(the first of candidates, largest first, that fits, or None; the sizes tried that did not). first (a resumed
    run's) is tried before them, then only the smaller ones: a size that fits is taken to make every smaller one fit."""
    order = candidates if first is None else [first] + [size for size in candidates if size < first]
    rejected = []
    for size in order:
        if fits(size):
            return size, rejected
        rejected.append(size)
    return None, rejected


def fits_on_gpu(config, batch_size, block_size, reserve_bytes, autocast_dtype, device):
    """Whether train_step on two micro-batches of batch_size sequences, with AdamW, fits in the GPU next to
    reserve_bytes more (eager: torch.compile's step needs no more). All it allocates is freed again."""
    reserve = model = optimizer = idx = None
    try:
        reserve = torch.empty(reserve_bytes, dtype=torch.uint8, device=device)
        with torch.device(device):
            model = GPT(config)
        model.chunked_loss = False  # the plain soft-capped loss, as torch.compile runs it: the larger of the two
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.0, fused=device.type == "cuda" or None)
        idx = torch.zeros((batch_size, block_size), dtype=torch.long, device=device)  # token 0: no RNG drawn
        train_step(model, optimizer, [(idx, idx)] * 2, lr=0.0, grad_clip=1.0, device_type=device.type,
                   autocast_dtype=autocast_dtype, ddp=False)
        return True
    except RuntimeError as e:
        if not is_out_of_memory(e):
            raise
        return False
    finally:
        del reserve, model, optimizer, idx  # what the attempt held (a failed one's graph left with the exception)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the next, smaller try starts from a clean cache
            torch.cuda.reset_peak_memory_stats(device)  # the run's peak is reported, not the trial's


def is_out_of_memory(error):
    """Whether a trial step's exception means the GPU ran out of memory; any other error is a bug, and propagates."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    # what CUDA and its libraries say when memory runs out outside the caching allocator (which raises the above)
    messages = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED",
                "CUDNN_STATUS_NOT_ENOUGH_WORKSPACE", "cudaErrorMemoryAllocation")
    return isinstance(error, RuntimeError) and any(m.lower() in str(error).lower() for m in messages)


def cgroup_memory_left(proc_cgroup="/proc/self/cgroup", cgroup_fs="/sys/fs/cgroup"):
    """Bytes left under this process's cgroup memory limit (a container, a batch job), or None without one: the limit
    less the usage, the inactive page cache not counted (the kernel drops it before it kills)."""
    left = None
    with contextlib.suppress(OSError):
        for line in read_text(proc_cgroup).splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers == "":  # v2
                root, limit_file, usage_file, inactive = cgroup_fs, "memory.max", "memory.current", "inactive_file"
            elif "memory" in controllers.split(","):  # v1
                root, limit_file, usage_file, inactive = (os.path.join(cgroup_fs, "memory"), "memory.limit_in_bytes",
                                                          "memory.usage_in_bytes", "total_inactive_file")
            else:
                continue
            # the path is the cgroup as the host names it; in a container its own cgroup is mounted at the root
            for directory in dict.fromkeys((root + path.rstrip("/"), root)):
                try:
                    stat = dict(line.split() for line in read_text(directory, "memory.stat").splitlines())
                    text = read_text(directory, limit_file).strip()
                    limit = None if text == "max" else int(text)
                    used = int(read_text(directory, usage_file)) - int(stat.get(inactive, 0))
                except (OSError, ValueError):
                    continue
                if limit is not None and limit < 2**60:  # v1 writes "no limit" as a huge number
                    left = limit - used if left is None else min(left, limit - used)
                break
    return left


def read_text(*path):
    with open(os.path.join(*path)) as f:
        return f.read()


def available_memory(device):
    """(bytes this process can still allocate on cpu or mps, where that figure comes from): Linux's MemAvailable or
    what the cgroup's limit leaves, if less; the physical memory elsewhere; Metal's recommended working set on mps."""
    if torch.device(device).type == "mps":
        return (torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory(),
                "left of Metal's recommended working set")
    try:
        info = dict(line.split(":", 1) for line in read_text("/proc/meminfo").splitlines())
        available, where = int(info["MemAvailable"].split()[0]) * 1024, "available per /proc/meminfo"  # kB
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
    """(bytes, description) this process may plan to use on cpu / mps: available_memory plus `extra` it holds now and
    frees before training, shared by the processes of a torchrun launch on this machine (LOCAL_WORLD_SIZE)."""
    available, where = available_memory(device)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    text = f"{(available + extra) / GB:.1f} GB {where}"
    text += f", the checkpoint's {extra / GB:.1f} GB (freed once loaded) included" if extra else ""
    text += f", shared by {local} processes" if local > 1 else ""
    return (available + extra) // local, text


def tensor_storages(obj):
    """{address: bytes} of the tensor storages in nested dicts, lists and tuples; shared ones (tied wte) once."""
    if isinstance(obj, torch.Tensor):
        return {obj.untyped_storage().data_ptr(): obj.untyped_storage().nbytes()}
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    return {address: n for item in items for address, n in tensor_storages(item).items()}


def train_memory_bytes(config, n_params, batch_size, block_size, attention_matrix=False):
    """An upper bound on the peak bytes of training a GPT of config (n_params parameters) on batch_size sequences of
    block_size tokens, fp32, eager, AdamW (calibrated in docs/training.md): 24 bytes a parameter, twice what each block
    keeps for backward a token, the head's logits and their gradients, 256 MiB of workspaces. attention_matrix: each
    head's (T, T) softmax is stored (mps: no flash attention for training)."""
    C, V = config.n_embd, config.vocab_size
    mlp = 4 * (-(-8 * C // (3 * 64)) * 64) if config.mlp == "swiglu" else 8 * C  # swiglu: model.MLP's hidden size
    block = 8 * C + mlp + (2 * C if config.qk_norm or config.pos_emb == "rope" else 0)
    if attention_matrix:
        block += config.n_head * block_size
    head = 2 * C * (1 + config.embed_norm) + (5 + (config.logit_softcap > 0)) * V  # ln_f's (and ln_emb's) too
    return 24 * n_params + 4 * batch_size * block_size * (2 * config.n_layer * block + head) + 256 * 2**20
