r"""Train GPT-2 (124M) on FineWeb-Edu 10B on 1 to N GPUs, the GPT-3 small recipe, with exact resume and running evals.

    python fineweb.py                                          # once: tokenize FineWeb-Edu into edu_fineweb10B/
    python train_gpt2.py                                       # one GPU (or mps / cpu)
    torchrun --standalone --nproc_per_node=8 train_gpt2.py     # 8 GPUs on one node
    python train_gpt2.py --n_layer=4 --n_head=4 --n_embd=64 --block_size=64 --batch_size=16 \
        --total_batch_size=1024 --max_steps=400 --val_tokens=16384 --compile=false   # laptop size (CPU, mps)

Every default below is an option: `--name=value`. Stop it any time (Ctrl-C, kill -9, a lost node) and run the same
command again: `resume=auto` continues from the newest checkpoint in log_dir with the losses a run never stopped
would have had. log_dir/log.txt keeps build-nanogpt's format; `python plot.py log/log.txt` draws it.
"""

import contextlib
import dataclasses
import glob
import importlib.util
import inspect
import json
import math
import os
import re
import sys
import time
from bisect import bisect_right
from dataclasses import dataclass

import numpy as np
import tiktoken
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import hellaswag
from model import GPT, GPT2_VOCAB_SIZE, GPTConfig, default_device, peak_flops
from plot import REFERENCES


@dataclass
class TrainConfig:
    # data and output
    # edufineweb_{train,val}_NNNNNN.npy token shards: by default where fineweb.py writes them, next to this script
    data_dir: str = os.path.join(os.path.dirname(os.path.abspath(__file__)), "edu_fineweb10B")
    log_dir: str = "log"  # log.txt, config.json and checkpoints model_NNNNN.pt
    # model: GPT-2 small; the vocabulary is GPT-2's 50257 padded to 50304 = 393 * 128, a friendlier size for the GPU
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    vocab_size: int = 50304
    block_size: int = 1024  # sequence length T
    init_from: str = "scratch"  # "scratch", or a GPT-2 to start from: gpt2, gpt2-medium..., a transformers directory
    # batch: total_batch_size tokens per optimizer step = batch_size * block_size * processes * grad_accum_steps
    batch_size: int = 64  # micro-batch per process, in sequences
    total_batch_size: int = 524288  # 2**19 tokens, GPT-3 small's 0.5M batch
    # optimizer: AdamW, linear warmup then cosine decay to min_lr at max_steps (GPT-3 small's schedule)
    max_lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int = 715  # GPT-3 warms up over 375M tokens: 375e6 / 2**19
    max_steps: int = 19073  # 10B tokens / 2**19 tokens per step: one epoch of FineWeb-Edu 10B
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # clip the global gradient norm to this (0: no clipping)
    # evaluation and checkpoints, every N steps and at the last step (0: never; the final checkpoint is always saved)
    val_every: int = 250
    val_tokens: int = 10485760  # validation tokens from the val shard, whatever the number of processes (160 x 64K)
    hellaswag_every: int = 250
    hellaswag_data: str = ""  # a local hellaswag_val.jsonl, or "" to download it once
    hellaswag_limit: int = 0  # score the first N examples only (0: all 10,042)
    sample_every: int = 250
    sample_prompt: str = "Hello, I'm a language model,"
    num_samples: int = 4
    sample_length: int = 32  # new tokens per sample
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3  # the newest N checkpoints are kept (0: all)
    resume: str = "auto"  # "auto": the newest checkpoint in log_dir if any; a checkpoint path; "": a fresh run
    # system
    device: str = "auto"  # auto (cuda, then mps, then cpu), cuda, mps or cpu
    compile: bool = True  # torch.compile the model (cuda and cpu; ignored on mps)
    seed: int = 1337
    wandb_log: bool = False
    wandb_project: str = "gpt2-fineweb-edu"
    wandb_run_name: str = ""


SHARD_GLOB = "edufineweb_{split}_*.npy"
CHECKPOINT_RE = re.compile(r"^model_(\d+)\.pt$")
PARTIAL_RE = re.compile(r"^\.model_\d+\.pt\.tmp$")  # what a kill during a checkpoint save leaves behind
MAKE_SHARDS_HINT = "make them with `python fineweb.py`"
ERROR_PREFIX = "train_gpt2.py: error:"


class ConfigError(ValueError):
    """A bad option, data directory or checkpoint; main() prints it as one line and exits with code 2."""

    every_rank = False  # True for what only one rank may see (its own chunk of data): that rank reports it too


# -----------------------------------------------------------------------------
# configuration: defaults above, `--name=value` on the command line

def parse_bool(text):
    value = text.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise ValueError("expected true/false/1/0")


def parse_args(argv, config_class=TrainConfig):
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


def usage(config_class=TrainConfig):
    """--help: the docstring, then every option with its default, type and comment, under the section comments of
    config_class (its source is the one place the options are described)."""
    lines = [__doc__.strip(), "", "options (--name=value), the defaults at the top of train_gpt2.py:"]
    defaults = {f.name: f for f in dataclasses.fields(config_class)}
    for line in inspect.getsource(config_class).splitlines():
        code, _, comment = line.strip().partition("# ")
        name = code.split(":", 1)[0]
        if not code:  # a section comment
            lines.append(f"  {comment}" if comment else "")
        elif name in defaults:
            f = defaults[name]
            lines.append(f"    --{name}={f.default!r} ({f.type.__name__})" + (f"  {comment}" if comment else ""))
    return "\n".join(lines)


def check_config(cfg, world_size):
    """Raise ConfigError for a setting that can't work; return grad_accum_steps."""
    positive = ("n_layer", "n_head", "n_embd", "vocab_size", "block_size", "batch_size", "total_batch_size",
                "max_steps", "num_samples", "sample_length")
    non_negative = ("warmup_steps", "val_every", "hellaswag_every", "hellaswag_limit", "sample_every",
                    "checkpoint_every", "keep_checkpoints", "weight_decay", "grad_clip", "min_lr")
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"--{name} must be > 0, got {getattr(cfg, name)}")
    for name in non_negative:
        if getattr(cfg, name) < 0:
            raise ConfigError(f"--{name} must be >= 0, got {getattr(cfg, name)}")
    if not 0 < cfg.max_lr or not cfg.min_lr <= cfg.max_lr:
        raise ConfigError(f"need 0 <= min_lr <= max_lr and max_lr > 0, got min_lr={cfg.min_lr} max_lr={cfg.max_lr}")
    if not (0 <= cfg.beta1 < 1 and 0 <= cfg.beta2 < 1 and cfg.eps > 0):
        raise ConfigError(f"need 0 <= beta1, beta2 < 1 and eps > 0, got {cfg.beta1}, {cfg.beta2}, {cfg.eps}")
    if cfg.n_embd % cfg.n_head:
        raise ConfigError(f"n_embd ({cfg.n_embd}) must be divisible by n_head ({cfg.n_head})")
    if cfg.device not in ("auto", "cuda", "mps", "cpu"):
        raise ConfigError(f"--device must be auto, cuda, mps or cpu, got {cfg.device!r}")
    if not cfg.init_from:
        raise ConfigError("--init_from must be 'scratch' or a GPT-2 model name / directory")
    tokens_per_micro_step = cfg.batch_size * cfg.block_size * world_size
    if cfg.total_batch_size % tokens_per_micro_step:
        raise ConfigError(f"total_batch_size {cfg.total_batch_size} is not a multiple of batch_size * block_size * "
                          f"processes = {cfg.batch_size} * {cfg.block_size} * {world_size} = {tokens_per_micro_step}")
    if cfg.val_every and cfg.val_tokens % (cfg.batch_size * cfg.block_size):
        raise ConfigError(f"val_tokens {cfg.val_tokens} is not a multiple of batch_size * block_size = "
                          f"{cfg.batch_size * cfg.block_size}")
    if cfg.val_every and cfg.val_tokens <= 0:
        raise ConfigError(f"--val_tokens must be > 0, got {cfg.val_tokens}")
    # sampling and HellaSwag speak GPT-2 BPE: a scratch model needs every GPT-2 token id (from_pretrained's has them)
    if cfg.init_from == "scratch" and cfg.vocab_size < GPT2_VOCAB_SIZE and (cfg.sample_every or cfg.hellaswag_every):
        raise ConfigError(f"vocab_size {cfg.vocab_size} < {GPT2_VOCAB_SIZE} (GPT-2's tokenizer): "
                          "sampling and HellaSwag need the GPT-2 vocabulary; set --sample_every=0 --hellaswag_every=0")
    if cfg.wandb_log and importlib.util.find_spec("wandb") is None:
        raise ConfigError("--wandb_log=true needs wandb: pip install wandb")
    return cfg.total_batch_size // tokens_per_micro_step


def get_lr(step, *, max_lr, min_lr, warmup_steps, max_steps):
    """Learning rate of optimizer step `step` (0-based): linear warmup to max_lr, then cosine decay to min_lr."""
    if step < warmup_steps:
        # (step + 1): step 0 already learns at max_lr / warmup_steps, and step warmup_steps - 1 at max_lr
        return max_lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    decay_ratio = (step - warmup_steps) / (max_steps - warmup_steps)  # 0 -> 1
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # 1 -> 0
    return min_lr + coeff * (max_lr - min_lr)


# -----------------------------------------------------------------------------
# data: the uint16 token shards as one stream, read through memory maps

class TokenStream:
    """The shards of one split as a single circular token stream: position p is token p mod (total tokens) of the
    concatenated shards, so a batch can span two shards (nothing is skipped at a shard's end) and a run longer than
    the data starts over at the first token (a second epoch) without a seam."""

    def __init__(self, data_dir, split):
        pattern = SHARD_GLOB.format(split=split)
        if not os.path.isdir(data_dir):
            raise ConfigError(f"data_dir {data_dir}: no such directory (expected {pattern} token shards; "
                              f"{MAKE_SHARDS_HINT})")
        self.paths = sorted(glob.glob(os.path.join(data_dir, pattern)))
        if not self.paths:
            raise ConfigError(f"data_dir {data_dir}: no {pattern} files (expected token shards; {MAKE_SHARDS_HINT})")
        self.shards = [load_shard(path) for path in self.paths]
        self.starts = np.cumsum([0] + [len(s) for s in self.shards]).tolist()  # stream position of each shard
        self.total = self.starts[-1]

    def read(self, start, n):
        """n tokens (uint16) from stream position start on, wrapping around at the end."""
        out = np.empty(n, dtype=np.uint16)
        filled = 0
        pos = start % self.total
        while filled < n:
            i = bisect_right(self.starts, pos) - 1  # the shard holding pos
            offset = pos - self.starts[i]
            take = min(n - filled, len(self.shards[i]) - offset)
            out[filled:filled + take] = self.shards[i][offset:offset + take]
            filled += take
            pos = (pos + take) % self.total
        return out

    def where(self, pos):
        """'file at token N' for a stream position, for error messages."""
        pos %= self.total
        i = bisect_right(self.starts, pos) - 1
        return f"{self.paths[i]} at token {pos - self.starts[i]}"


def load_shard(path):
    """Memory-map one shard: a 1-D uint16 .npy of at least one token (nothing is read until it is sliced)."""
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:  # numpy raises ValueError, OSError, EOFError... for a file that is not a plain .npy
        raise ConfigError(f"{path}: not a .npy token shard ({e}); {MAKE_SHARDS_HINT}") from None
    if not isinstance(tokens, np.ndarray) or tokens.dtype != np.uint16 or tokens.ndim != 1:
        got = (f"{tokens.dtype} array of shape {tokens.shape}" if isinstance(tokens, np.ndarray)
               else type(tokens).__name__)
        raise ConfigError(f"{path}: expected a 1-D uint16 array of GPT-2 tokens, got {got}; {MAKE_SHARDS_HINT}")
    if len(tokens) == 0:
        raise ConfigError(f"{path}: empty shard (0 tokens); {MAKE_SHARDS_HINT}")
    return tokens


def make_batch(stream, start, B, T, vocab_size, device):
    """Inputs x and targets y (B, T) long on device, from the B*T+1 tokens at stream position start:
    y is x shifted by one token, each position's next token."""
    buf = stream.read(start, B * T + 1)
    if int(buf.max()) >= vocab_size:  # a cheap check that spares an opaque device-side assert on CUDA
        bad = int(np.argmax(buf >= vocab_size))
        error = ConfigError(f"token id {buf[bad]} >= vocab_size {vocab_size} in {stream.where(start + bad)}")
        error.every_rank = True
        raise error
    tokens = torch.from_numpy(buf.astype(np.int64))
    if device.type == "cuda":
        # pinned host memory lets the copy run asynchronously, overlapping the GPU's work
        tokens = tokens.pin_memory().to(device, non_blocking=True)
    else:
        tokens = tokens.to(device)
    return tokens[:-1].view(B, T), tokens[1:].view(B, T)


class TrainLoader:
    """Micro-batches of the train stream for one rank.

    The global order is build-nanogpt's: the stream is cut into consecutive chunks of B*T tokens (each read with one
    extra token for the last target); micro-step m of rank r in a run of W ranks takes chunk m*W + r of its step.
    So W ranks accumulating A micro-steps each see exactly the chunks, in the same order, that one process
    accumulating W*A micro-steps sees. The position is a token count shared by all ranks (step * total_batch_size
    between steps), so a checkpoint resumes on any number of ranks.
    """

    def __init__(self, stream, B, T, rank, world_size, vocab_size, device):
        self.stream, self.B, self.T = stream, B, T
        self.rank, self.world_size = rank, world_size
        self.vocab_size, self.device = vocab_size, device
        self.position = 0  # stream position of the first chunk of the next group of W micro-batches

    def next_batch(self):
        start = self.position + self.rank * self.B * self.T
        self.position += self.B * self.T * self.world_size
        return make_batch(self.stream, start, self.B, self.T, self.vocab_size, self.device)

    def state_dict(self):
        return {"position": self.position, "stream_tokens": self.stream.total}

    def load_state_dict(self, state):
        if state["stream_tokens"] != self.stream.total:
            raise ConfigError(f"the train shards hold {self.stream.total} tokens but the checkpoint was trained on "
                              f"{state['stream_tokens']}: the data changed, an exact resume is impossible")
        self.position = state["position"]


# -----------------------------------------------------------------------------
# one optimizer step, and the evaluations

def setup_precision(device):
    """The recipe's precision: TF32 matmuls and bf16 autocast on CUDA (returns torch.bfloat16); plain fp32 on cpu and
    mps (returns None), where it is exact and reproducible."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
    return None


def autocast_context(device_type, autocast_dtype):
    if autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=autocast_dtype)


def train_step(model, optimizer, batches, *, lr, grad_clip, device_type, autocast_dtype, ddp):
    """One optimizer step over the micro-batches [(x, y), ...] (each (B, T) on the model's device).

    model is the module to train, wrapped in DistributedDataParallel when ddp is True. Returns (loss, grad_norm), two
    0-dim tensors on the device: the mean loss over all micro-batches of all ranks, and the gradient norm before
    clipping (grad_clip 0: no clipping). Nothing here waits for the device: call .item() when you need the numbers.
    """
    optimizer.zero_grad(set_to_none=True)
    grad_accum_steps = len(batches)
    loss_accum = torch.zeros((), device=batches[0][0].device)
    for micro_step, (x, y) in enumerate(batches):
        # DDP all-reduces the gradients during backward; the micro-steps before the last only accumulate locally,
        # so skip their communication and sync once, on the last micro-step, with the summed gradients
        last = micro_step == grad_accum_steps - 1
        with model.no_sync() if ddp and not last else contextlib.nullcontext():
            with autocast_context(device_type, autocast_dtype):
                _, loss = model(x, y)
            # The loss is the mean over one micro-batch's B*T tokens, and backward() adds each micro-step's
            # gradient to .grad. The sum of grad_accum_steps means is grad_accum_steps times too large: dividing
            # each loss by grad_accum_steps turns the sum into the mean over the whole batch, the gradient that a
            # single batch of grad_accum_steps * B sequences would give.
            loss = loss / grad_accum_steps
            loss_accum += loss.detach()  # a device tensor: no host sync in the loop
            loss.backward()
    if ddp:
        # DDP averaged the gradients over ranks; average the logged loss too (SUM / N: gloo has no AVG)
        dist.all_reduce(loss_accum, op=dist.ReduceOp.SUM)
        loss_accum /= dist.get_world_size()
    # With max_norm=inf the clip coefficient clamps to 1: the gradients stay as they are, the norm is still measured.
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    return loss_accum, grad_norm


@torch.no_grad()
def evaluate_loss(model, stream, *, n_chunks, B, T, vocab_size, device, autocast_dtype, rank, world_size):
    """Mean loss over the first n_chunks * B*T tokens of stream; rank r takes chunks r, r+W, ...: the same tokens
    and the same value (up to float rounding) for any number of ranks. model is not DDP-wrapped (nothing to sync)."""
    totals = torch.zeros(2, device=device)  # sum of chunk losses, number of chunks
    for i in range(rank, n_chunks, world_size):
        x, y = make_batch(stream, i * B * T, B, T, vocab_size, device)
        with autocast_context(device.type, autocast_dtype):
            _, loss = model(x, y)
        totals[0] += loss.float()
        totals[1] += 1
    if world_size > 1:
        dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    # every chunk has B*T tokens, so the mean of the chunk means is the mean over all tokens
    return (totals[0] / totals[1]).item()


def sample(model, enc, *, prompt, num_samples, length, seed, device, autocast_dtype):
    """num_samples continuations of prompt (top-k 50). A generator of its own: the training RNG stays untouched, and
    the same seed every time makes samples of different steps differ by the model only."""
    idx = torch.tensor([enc.encode_ordinary(prompt)] * num_samples, dtype=torch.long, device=device)
    # a CPU generator: model.generate draws on the generator's device, so one kind serves cuda, mps and cpu
    generator = torch.Generator().manual_seed(seed)
    with autocast_context(device.type, autocast_dtype):
        out = model.generate(idx, length, top_k=50, generator=generator)
    return [enc.decode(row) for row in out.tolist()]


# -----------------------------------------------------------------------------
# checkpoints and the log

def atomic_write(path, write):
    """Call write(file) on a temporary file next to path, then rename it into place: a kill at any moment leaves
    either the old file or the complete new one, never a half-written file under the real name."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    # persist the rename itself (the directory entry); best effort where directories can't be opened
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def list_checkpoints(log_dir):
    """[(step, path)] of the checkpoints in log_dir, oldest first."""
    if not os.path.isdir(log_dir):
        return []
    found = [(int(m.group(1)), os.path.join(log_dir, name))
             for name in os.listdir(log_dir) if (m := CHECKPOINT_RE.match(name))]
    return sorted(found)


def rng_state(device):
    """The torch RNG states as tensors (loadable with weights_only=True). Training draws no random numbers (no
    dropout, and sampling has its own generator); they are saved so that a model with randomness resumes exactly."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    elif device.type == "mps" and "mps" in state:
        torch.mps.set_rng_state(state["mps"])


def save_checkpoint(path, *, raw_model, optimizer, step, loader, cfg, device):
    checkpoint = {
        "model": raw_model.state_dict(),  # the plain module: no "module." (DDP) or "_orig_mod." (compile) prefixes
        "optimizer": optimizer.state_dict(),
        "step": step,  # optimizer steps done: the run continues with step `step`
        "loader": loader.state_dict(),
        "rng": rng_state(device),
        "config": dataclasses.asdict(raw_model.config),  # GPTConfig: what hellaswag.py --model needs to rebuild it
        "train_config": dataclasses.asdict(cfg),
    }
    atomic_write(path, lambda f: torch.save(checkpoint, f))


def load_checkpoint(path):
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a missing file, not a zip/pickle, a foreign object: one line, not their traceback
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"{path}: cannot load the checkpoint: {first_line}") from None
    keys = {"model", "optimizer", "step", "loader", "rng", "config", "train_config"}
    if not isinstance(checkpoint, dict) or not keys <= checkpoint.keys():
        raise ConfigError(f"{path}: not a train_gpt2.py checkpoint (expected the keys {', '.join(sorted(keys))})")
    return checkpoint


def read_log_lines(path, before_step):
    """The complete lines of a log whose step is < before_step (a line cut off by a kill has no newline)."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")[:-1]  # the last element is "" or an unfinished line
    kept = []
    for line in lines:
        first = line.split(" ", 1)[0]
        if first.isdigit() and int(first) < before_step:
            kept.append(line + "\n")
    return kept


def compare_configs(saved, current):
    """The options that differ from the checkpoint's, as 'name: old -> new' (resume and paths aside)."""
    ignore = {"resume", "log_dir", "data_dir", "hellaswag_data"}
    return [f"{k}: {saved[k]!r} -> {v!r}" for k, v in current.items()
            if k not in ignore and k in saved and saved[k] != v]


# -----------------------------------------------------------------------------
# the run

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


def pick_device(name, d):
    if name == "auto":
        name = default_device()
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device=cuda but torch sees no CUDA GPU")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device=mps but MPS is not available")
    if name == "mps" and d.ddp:
        raise ConfigError("distributed training needs cuda (NCCL) or cpu (gloo), not mps")
    if name == "cuda":
        return torch.device("cuda", d.local_rank)
    return torch.device(name)


def build_model(cfg, checkpoint, log):
    """The GPT to train: the checkpoint's architecture on resume, GPT-2 weights for init_from, else a fresh init."""
    if checkpoint is not None:
        try:
            model_config = GPTConfig.from_dict(checkpoint["config"])
        except (TypeError, ValueError) as e:
            raise ConfigError(f"the checkpoint's model config is unusable: {e}") from None
        if cfg.init_from == "scratch":
            asked = {k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_embd", "vocab_size")}
            differ = [f"{k}={v} (checkpoint: {getattr(model_config, k)})" for k, v in asked.items()
                      if getattr(model_config, k) != v]
            if differ:
                raise ConfigError(f"the checkpoint's model differs from the options: {', '.join(differ)}")
        model = GPT(model_config)
        try:
            model.load_state_dict(checkpoint["model"])
        except RuntimeError as e:  # missing / unexpected / misshapen tensors
            raise ConfigError(f"the checkpoint's weights don't fit its config: {str(e).splitlines()[0]}") from None
        return model
    if cfg.init_from == "scratch":
        return GPT(GPTConfig(block_size=cfg.block_size, vocab_size=cfg.vocab_size, n_layer=cfg.n_layer,
                             n_head=cfg.n_head, n_embd=cfg.n_embd))
    try:
        model = GPT.from_pretrained(cfg.init_from)
    except ValueError as e:
        raise ConfigError(f"--init_from={cfg.init_from}: {e}") from None
    log(f"init_from={cfg.init_from}: the model's own architecture replaces n_layer/n_head/n_embd/vocab_size")
    return model


def find_checkpoint(cfg):
    """(path, checkpoint) to resume from, or (None, None) for a fresh run: resume=auto takes the newest checkpoint
    of log_dir (a fresh run if there is none), a path takes that one, "" refuses a log_dir that holds checkpoints."""
    existing = list_checkpoints(cfg.log_dir)
    if cfg.resume == "auto":
        path = existing[-1][1] if existing else None
    elif cfg.resume:
        path = cfg.resume
    elif existing:
        raise ConfigError(f"log_dir {cfg.log_dir} already holds checkpoints ({os.path.basename(existing[-1][1])}): "
                          "continue with --resume=auto, or pick another --log_dir")
    else:
        path = None
    if path is None:
        return None, None
    checkpoint = load_checkpoint(path)
    if any(step > checkpoint["step"] for step, _ in existing):
        raise ConfigError(f"log_dir {cfg.log_dir} holds checkpoints newer than step {checkpoint['step']} of {path}: "
                          "move them away or pick another --log_dir (a resumed run would mix two histories)")
    return path, checkpoint


def check_same_step(start_step, device):
    """Every rank reads log_dir itself: on several nodes without a shared log_dir they would resume different steps
    (or some none) and train replicas that silently drift apart. Collective: every rank calls it."""
    steps = torch.tensor([start_step, -start_step], device=device)
    dist.all_reduce(steps, op=dist.ReduceOp.MAX)  # [max, -min]
    if steps[0].item() != -steps[1].item():
        raise ConfigError(f"the ranks found different checkpoints to resume (steps {-steps[1].item()} to "
                          f"{steps[0].item()}): log_dir must be one directory that every node shares")


def open_data(cfg):
    """(train stream, val stream or None, HellaSwag examples): everything a run reads, checked before it starts.
    Every rank maps the shards; each reads only its own chunks."""
    train_stream = TokenStream(cfg.data_dir, "train")
    if train_stream.total < cfg.batch_size * cfg.block_size + 1:
        raise ConfigError(f"data_dir {cfg.data_dir}: the train shards hold {train_stream.total} tokens, fewer than "
                          f"one micro-batch needs ({cfg.batch_size} * {cfg.block_size} + 1)")
    val_stream = None
    if cfg.val_every:
        val_stream = TokenStream(cfg.data_dir, "val")
        if val_stream.total < cfg.val_tokens + 1:
            raise ConfigError(f"data_dir {cfg.data_dir}: the val shard holds {val_stream.total} tokens, "
                              f"val_tokens={cfg.val_tokens} needs {cfg.val_tokens + 1}")
    examples = []
    if cfg.hellaswag_every:
        try:
            examples = hellaswag.load_examples(cfg.hellaswag_data or None, limit=cfg.hellaswag_limit or None)
        except hellaswag.HellaSwagError as e:
            raise ConfigError(f"{e} (here: --hellaswag_data=FILE, or --hellaswag_every=0 to skip HellaSwag)") from None
    return train_stream, val_stream, examples


def prepare_log_dir(log_dir, start_step, resolved):
    """Create log_dir, drop half-written checkpoints, write config.json, and cut log.txt back to the lines before
    start_step (a resumed run redoes everything from start_step on, that step's evals included: no duplicates).
    Returns the path of log.txt."""
    os.makedirs(log_dir, exist_ok=True)
    for name in os.listdir(log_dir):  # what a kill during a save left (as large as a whole checkpoint)
        if PARTIAL_RE.match(name):
            os.remove(os.path.join(log_dir, name))
    text = json.dumps(resolved, indent=2) + "\n"
    atomic_write(os.path.join(log_dir, "config.json"), lambda f: f.write(text.encode()))
    log_path = os.path.join(log_dir, "log.txt")
    kept = read_log_lines(log_path, start_step)
    atomic_write(log_path, lambda f: f.write("".join(kept).encode()))
    return log_path


def format_ms(seconds):
    return f"{seconds * 1000:.1f} ms"


def format_mfu(flops_per_token, tokens_per_sec, peak, world_size):
    """Model FLOPs utilization: the FLOP/s the model's math needs over the GPUs' bf16 peak ("n/a" where unknown)."""
    return f"{flops_per_token * tokens_per_sec / (peak * world_size):.1%}" if peak else "n/a"


def run(cfg, d):
    """Train with cfg on this process's share of the ranks d; returns the exit code."""
    grad_accum_steps = check_config(cfg, d.world_size)
    device = pick_device(cfg.device, d)
    if d.ddp:
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group(backend="nccl", device_id=device)
        else:
            dist.init_process_group(backend="gloo")

    def log(message):
        if d.master:
            print(message, flush=True)

    autocast_dtype = setup_precision(device)
    use_compile = cfg.compile and device.type != "mps"
    if cfg.compile and not use_compile:
        log("note: torch.compile is not used on mps")

    resume_path, checkpoint = find_checkpoint(cfg)
    start_step = checkpoint["step"] if checkpoint else 0
    if d.ddp:
        check_same_step(start_step, device)
    if checkpoint and start_step >= cfg.max_steps:
        log(f"{resume_path} is at step {start_step}, max_steps is {cfg.max_steps}: nothing to do")
        return 0
    train_stream, val_stream, examples = open_data(cfg)

    # model and optimizer
    torch.manual_seed(cfg.seed)  # the same init on every rank (DDP also broadcasts rank 0's weights)
    try:
        raw_model = build_model(cfg, checkpoint, log)
    except ConfigError as e:
        raise ConfigError(f"{resume_path}: {e}" if checkpoint else str(e)) from None
    if cfg.init_from != "scratch":
        mc = raw_model.config
        cfg = dataclasses.replace(cfg, n_layer=mc.n_layer, n_head=mc.n_head, n_embd=mc.n_embd, vocab_size=mc.vocab_size)
    if cfg.block_size > raw_model.config.block_size:
        raise ConfigError(f"block_size {cfg.block_size} > the model's {raw_model.config.block_size} positions")
    raw_model.to(device)
    optimizer = raw_model.configure_optimizers(weight_decay=cfg.weight_decay, learning_rate=cfg.max_lr,
                                               betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, device_type=device.type,
                                               verbose=d.master)
    loader = TrainLoader(train_stream, cfg.batch_size, cfg.block_size, d.rank, d.world_size, cfg.vocab_size, device)
    if checkpoint:
        # load_state_dict would also restore the checkpoint's hyperparameters and flags (weight_decay, betas, eps,
        # fused...): keep the ones just built from the current options and device, as "changed options" promises.
        # Before loading, because `fused` decides where the `step` tensors go (the param's device for fused AdamW).
        saved = checkpoint["optimizer"]
        for saved_group, group in zip(saved["param_groups"], optimizer.param_groups):
            saved_group.update({k: v for k, v in group.items() if k != "params"})
        optimizer.load_state_dict(saved)
        loader.load_state_dict(checkpoint["loader"])
        set_rng_state(checkpoint["rng"], device)
        changed = compare_configs(checkpoint["train_config"], dataclasses.asdict(cfg))
        log(f"resuming from {resume_path} at step {start_step}" +
            (f"; changed options: {'; '.join(changed)}" if changed else ""))
        del checkpoint  # the optimizer and model hold copies; free ~3x the model's size of host memory
    # raw_model: the plain module (checkpoints, sampling); model: maybe compiled (evals); train_model: maybe DDP
    model = torch.compile(raw_model) if use_compile else raw_model
    train_model = DDP(model, device_ids=[d.local_rank] if device.type == "cuda" else None) if d.ddp else model
    enc = tiktoken.get_encoding("gpt2") if cfg.sample_every else None

    # log_dir: config.json, log.txt (cut back to the resumed step, then appended), checkpoints
    log_path = os.path.join(cfg.log_dir, "log.txt")
    if d.master:
        resolved = {"train_config": dataclasses.asdict(cfg), "model_config": dataclasses.asdict(raw_model.config),
                    "world_size": d.world_size, "grad_accum_steps": grad_accum_steps, "device": str(device),
                    "num_params": raw_model.num_params(), "compile": use_compile,
                    "autocast_dtype": str(autocast_dtype) if autocast_dtype else "float32"}
        print(json.dumps(resolved, indent=2))
        prepare_log_dir(cfg.log_dir, start_step, resolved)
    wandb = None
    if cfg.wandb_log and d.master:
        import wandb  # optional dependency, imported only when asked for

        wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or None, config=dataclasses.asdict(cfg))

    def record(step, kind, value, fmt):
        """One build-nanogpt log line (appended and flushed at once: a kill loses at most the line being written)."""
        if d.master:
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(f"{step} {kind} {value:{fmt}}\n")
            if wandb:
                wandb.log({kind: value}, step=step)

    def due(step, every, last):
        return every > 0 and (step % every == 0 or last)

    gpt2, gpt3 = REFERENCES["gpt2"], REFERENCES["gpt3"]
    flops_per_token = raw_model.flops_per_token(cfg.block_size)
    peak = peak_flops(device)
    tokens_per_micro_batch = cfg.batch_size * cfg.block_size
    step_times = []  # seconds of each train step of this process (evals and checkpoints excluded)
    log(f"total batch {cfg.total_batch_size:,} tokens = {cfg.batch_size} x {cfg.block_size} x {d.world_size} "
        f"process(es) x {grad_accum_steps} micro-steps; {raw_model.num_params():,} parameters on {device}")
    for step in range(start_step, cfg.max_steps + 1):
        last = step == cfg.max_steps
        # --- evaluations of the model as it is after `step` optimizer steps
        if due(step, cfg.val_every, last) or due(step, cfg.hellaswag_every, last) or due(step, cfg.sample_every, last):
            model.eval()
            t0 = time.perf_counter()
            if due(step, cfg.val_every, last):
                val_loss = evaluate_loss(model, val_stream, n_chunks=cfg.val_tokens // tokens_per_micro_batch,
                                         B=cfg.batch_size, T=cfg.block_size, vocab_size=cfg.vocab_size, device=device,
                                         autocast_dtype=autocast_dtype, rank=d.rank, world_size=d.world_size)
                log(f"step {step:5d} | val loss {val_loss:.4f} (GPT-2 124M: {gpt2['val']})")
                record(step, "val", val_loss, ".4f")
            if due(step, cfg.hellaswag_every, last):
                result = hellaswag.evaluate(model, examples, device=device, autocast_dtype=autocast_dtype,
                                            rank=d.rank, world_size=d.world_size)
                log(f"step {step:5d} | HellaSwag acc_norm {result.correct_norm}/{result.n} = {result.acc_norm:.4f} "
                    f"(GPT-2 124M: {gpt2['hella']}, GPT-3 124M: {gpt3['hella']})")
                record(step, "hella", result.acc_norm, ".4f")
            if due(step, cfg.sample_every, last) and d.master:
                for i, text in enumerate(sample(raw_model, enc, prompt=cfg.sample_prompt, num_samples=cfg.num_samples,
                                                length=cfg.sample_length, seed=cfg.seed, device=device,
                                                autocast_dtype=autocast_dtype)):
                    log(f"step {step:5d} | sample {i}: {text!r}")
            model.train()
            log(f"step {step:5d} | evals took {time.perf_counter() - t0:.1f} s")
        # --- checkpoint (not at the step just resumed from: that checkpoint exists)
        if step > start_step and (due(step, cfg.checkpoint_every, last) or last) and d.master:
            path = os.path.join(cfg.log_dir, f"model_{step:05d}.pt")
            save_checkpoint(path, raw_model=raw_model, optimizer=optimizer, step=step, loader=loader, cfg=cfg,
                            device=device)
            if cfg.keep_checkpoints:
                for _, old in list_checkpoints(cfg.log_dir)[:-cfg.keep_checkpoints]:
                    os.remove(old)
            log(f"step {step:5d} | saved {path}")
        if last:
            break
        # --- one optimizer step
        t0 = time.perf_counter()
        batches = [loader.next_batch() for _ in range(grad_accum_steps)]
        lr = get_lr(step, max_lr=cfg.max_lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps,
                    max_steps=cfg.max_steps)
        loss, grad_norm = train_step(train_model, optimizer, batches, lr=lr, grad_clip=cfg.grad_clip,
                                     device_type=device.type, autocast_dtype=autocast_dtype, ddp=d.ddp)
        loss, grad_norm = loss.item(), grad_norm.item()  # waits for the device: the step is done
        dt = time.perf_counter() - t0
        step_times.append(dt)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            saved = list_checkpoints(cfg.log_dir)
            last_good = f"the last checkpoint is {saved[-1][1]}" if saved else "no checkpoint was saved"
            if d.master:
                print(f"{ERROR_PREFIX} step {step}: non-finite loss {loss} / grad norm {grad_norm}; stopped, "
                      f"{last_good}", file=sys.stderr, flush=True)
            return 1
        tokens_per_sec = cfg.total_batch_size / dt
        log(f"step {step:5d} | loss {loss:.6f} | lr {lr:.4e} | norm {grad_norm:.4f} | {format_ms(dt)} | "
            f"{tokens_per_sec:,.0f} tok/s | MFU {format_mfu(flops_per_token, tokens_per_sec, peak, d.world_size)}")
        record(step, "train", loss, ".6f")
        if wandb:
            wandb.log({"lr": lr, "grad_norm": grad_norm, "tokens_per_sec": tokens_per_sec}, step=step)

    # the first step of a process includes torch.compile's work and warm-up: leave it out of the average
    steady = step_times[1:] or step_times
    if steady:
        mean = sum(steady) / len(steady)
        tokens_per_sec = cfg.total_batch_size / mean
        log(f"done: {len(steady)} steps averaged {format_ms(mean)}/step, {tokens_per_sec:,.0f} tok/s, "
            f"MFU {format_mfu(flops_per_token, tokens_per_sec, peak, d.world_size)} "
            "(the first step of this process excluded: warm-up, and torch.compile's work when on)")
    if wandb:
        wandb.finish()
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(usage())
        return 0
    d = dist_from_env()
    try:
        return run(parse_args(argv), d)
    except ConfigError as e:
        if d.master or e.every_rank:
            print(f"{ERROR_PREFIX} {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
