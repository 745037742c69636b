r"""Train GPT-2 (124M) on FineWeb-Edu 10B on 1 to N GPUs, the GPT-3 small recipe, with exact resume and running evals.

    python fineweb.py                                          # once: tokenize FineWeb-Edu into edu_fineweb10B/
    python train_gpt2.py                                       # one GPU (or mps / cpu)
    torchrun --standalone --nproc_per_node=8 train_gpt2.py     # 8 GPUs on one node
    python train_gpt2.py --data_dir=my_shards --n_layer=4 --n_head=4 --n_embd=64 --block_size=64 --batch_size=16 \
        --total_batch_size=1024 --max_steps=400 --val_tokens=16384 --compile=false   # laptop size (CPU, mps)

Every default below is an option: `--name=value`. Stop it any time (Ctrl-C, kill -9, a lost node) and run the same
command again: `resume=auto` continues from the newest checkpoint in log_dir with the losses a run never stopped
would have had. log_dir/log.txt keeps build-nanogpt's format; `python plot.py log/log.txt` draws it.
"""

import contextlib
import dataclasses
import glob
import importlib.util
import json
import math
import os
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
from checkpoints import (append_log, compare_configs, find_checkpoint, list_checkpoints, load_optimizer_state,
                         locked_run_dir, model_from_checkpoint, prepare_log_dir, save_run_checkpoint, set_rng_state)
from fineweb import shard_pattern
from model import GPT, GPT2_VOCAB_SIZE, REFERENCES, GPTConfig
from runtime import (GB, ConfigError, StopSignal, autocast, dist_from_env, fits_on_gpu, get_device, init_distributed,
                     largest_fitting, memory_budget, option, parse_args, peak_flops, script_main, setup_precision,
                     train_memory_bytes, usage)


def auto_or_int(text):
    """--batch_size's values: "auto" or a whole number of sequences."""
    return "auto" if text.strip().lower() == "auto" else int(text)


auto_or_int.__name__ = "'auto' or int"  # how --help and parse_args' errors name an option's type


@dataclass
class TrainConfig:
    recipe: str = option("gpt2", "gpt2: the GPT-3 small recipe, every default below; fast: the modern recipe, "
                                 "whose defaults are listed at the end (an option given explicitly still wins)",
                         section="recipe")
    data_dir: str = option(os.path.join(os.path.dirname(os.path.abspath(__file__)), "edu_fineweb10B"),
                           "edufineweb_{train,val}_NNNNNN.npy token shards: by default where fineweb.py writes them, "
                           "next to this script", section="data and output")
    log_dir: str = option("log", "log.txt, config.json and checkpoints model_NNNNN.pt")
    n_layer: int = option(12, "transformer blocks",
                          section="model: GPT-2 small; the vocabulary is GPT-2's 50257 padded to 50304 = 393 * 128, a "
                                  "friendlier size for the GPU")
    n_head: int = option(12, "attention heads (n_embd must be a multiple)")
    n_embd: int = option(768, "width of the residual stream")
    vocab_size: int = option(50304, "rows of the token embedding (GPT-2's 50257, padded)")
    block_size: int = option(1024, "sequence length T")
    init_from: str = option("scratch", "\"scratch\", or a GPT-2 to start from: gpt2, gpt2-medium..., a transformers "
                                       "directory")
    norm: str = option("layernorm", "layernorm | rmsnorm", section="model: architecture switches, GPT-2's by default "
                                                                   "(model.GPTConfig)")
    mlp: str = option("gelu", "gelu | swiglu | relu2")
    pos_emb: str = option("learned", "learned | rope")
    qk_norm: bool = option(False, "RMS-normalize each head's q and k")
    tie_embeddings: bool = option(True, "one matrix for the token embedding and the output head")
    bias: bool = option(True, "biases in the linear layers and layer norms")
    logit_softcap: float = option(0.0, "cap * tanh(logits / cap) (0: off)")
    zero_init: bool = option(False, "residual projections (and an untied head) start at zero")
    batch_size: auto_or_int = option("auto", "micro-batch per process, in sequences; auto: the largest one up to 64 "
                                             "that fits in memory (a resumed run keeps its own while it fits)",
                                     section="batch: total_batch_size tokens per optimizer step = batch_size * "
                                             "block_size * processes * grad_accum_steps")
    total_batch_size: int = option(524288, "2**19 tokens, GPT-3 small's 0.5M batch")
    optimizer: str = option("adamw", "adamw | muon (Muon for the blocks' matrices, AdamW for the rest)",
                            section="optimizer: AdamW, linear warmup then cosine decay to min_lr at max_steps "
                                    "(GPT-3 small's schedule)")
    max_lr: float = option(6e-4, "peak learning rate, reached at the end of warmup (muon: the matrices')")
    min_lr: float = option(6e-5, "learning rate at max_steps and after (max_lr / 10)")
    embedding_lr: float = option(0.2, "muon only: the AdamW peak lr of the token (and position) embeddings")
    head_lr: float = option(0.004, "muon only: the AdamW peak lr of the output head")
    scalar_lr: float = option(0.04, "muon only: the AdamW peak lr of norm gains and biases")
    schedule: str = option("cosine", "cosine (warmup, cosine decay) | warmdown (warmup, constant, then linear decay "
                                     "over the last warmdown_frac of the steps)")
    warmdown_frac: float = option(0.4, "warmdown only: the fraction of max_steps spent decaying to min_lr")
    warmup_steps: int = option(715, "GPT-3 warms up over 375M tokens: 375e6 / 2**19")
    max_steps: int = option(19073, "10B tokens / 2**19 tokens per step: one epoch of FineWeb-Edu 10B")
    weight_decay: float = option(0.1, "on matrices and embeddings only (muon: on the matrices only)")
    beta1: float = option(0.9, "AdamW's betas and eps (GPT-3's)")
    beta2: float = option(0.95, "")
    eps: float = option(1e-8, "")
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0: no clipping)")
    val_every: int = option(250, "val loss", section="evaluation and checkpoints, every N steps and at the last step "
                                                     "(0: never; the final checkpoint is always saved)")
    val_tokens: int = option(10485760, "validation tokens from the val shard, whatever the number of processes "
                                       "(160 x 64K)")
    hellaswag_every: int = option(250, "HellaSwag acc_norm")
    hellaswag_data: str = option("", "a local hellaswag_val.jsonl, or \"\" to download it once")
    hellaswag_limit: int = option(0, "score the first N examples only (0: all 10,042)")
    sample_every: int = option(250, "text samples from the model")
    sample_prompt: str = option("Hello, I'm a language model,", "what the samples continue (empty: from <|endoftext|>)")
    num_samples: int = option(4, "samples each time")
    sample_length: int = option(32, "new tokens per sample")
    checkpoint_every: int = option(1000, "for an exact resume (Ctrl-C and SIGTERM save one too)")
    keep_checkpoints: int = option(3, "the newest N checkpoints are kept (0: all)")
    resume: str = option("auto", "\"auto\": the newest checkpoint in log_dir if any; a checkpoint path; \"\": a fresh "
                                 "run")
    device: str = option("auto", "auto (cuda, then mps, then cpu), cuda, mps or cpu", section="system")
    compile: bool = option(True, "torch.compile the model (cuda and cpu; ignored on mps)")
    seed: int = option(1337, "the initial weights and the samples")
    wandb_log: bool = option(False, "also log to Weights & Biases (pip install wandb)")
    wandb_project: str = option("gpt2-fineweb-edu", "")
    wandb_run_name: str = option("", "\"\": wandb picks one")


def recipe_defaults(recipe, cfg):
    """{option: value} that a recipe sets instead of TrainConfig's defaults, for a model as wide as cfg's.

    fast: the modern small-model recipe of modded-nanogpt and nanochat. The block: RMSNorm without biases, rotary
    positions, RMS-normalized q and k, ReLU² MLP, a logit soft-cap, an untied head, residual projections and head
    starting at zero. The optimizer: Muon for the blocks' matrices (its lr is max_lr), AdamW (betas 0.8, 0.95) for the
    embeddings, the head and the vectors, no weight decay. The schedule: no warmup, constant, then a linear warmdown
    to 0 over the last 40% of the steps. AdamW's lrs shrink as 1/sqrt(width) (nanochat's rule, lrs tuned at 768
    wide), so the same --recipe=fast serves a laptop-size model and GPT-2 small and beyond."""
    if recipe == "gpt2":
        return {}
    if recipe != "fast":
        raise ConfigError(f"--recipe must be gpt2 or fast, got {recipe!r}")
    width_scale = (cfg.n_embd / 768) ** -0.5
    return dict(norm="rmsnorm", mlp="relu2", pos_emb="rope", qk_norm=True, tie_embeddings=False, bias=False,
                logit_softcap=15.0, zero_init=True,
                optimizer="muon", max_lr=0.02, min_lr=0.0, embedding_lr=0.2 * width_scale,
                head_lr=0.004 * width_scale, scalar_lr=0.04 * width_scale, weight_decay=0.0, beta1=0.8, beta2=0.95,
                eps=1e-10, schedule="warmdown", warmdown_frac=0.4, warmup_steps=0)


def parse_config(argv):
    """The TrainConfig of `--name=value` arguments: TrainConfig's defaults, replaced by the recipe's (--recipe),
    replaced by the options given."""
    cfg = parse_args(argv, TrainConfig)
    given = {arg[2:].split("=", 1)[0] for arg in argv}
    return dataclasses.replace(cfg, **{k: v for k, v in recipe_defaults(cfg.recipe, cfg).items() if k not in given})


# the TrainConfig fields that are the model's architecture (GPTConfig's), taken from the model on resume/init_from;
# block_size stays the option: the training sequence length may be shorter than the model's positions
MODEL_FIELDS = [f.name for f in dataclasses.fields(GPTConfig)
                if f.name in {g.name for g in dataclasses.fields(TrainConfig)} and f.name != "block_size"]
MAKE_SHARDS_HINT = "make them with `python fineweb.py`"
SCRIPT = "train_gpt2.py"


def check_config(cfg, world_size):
    """Raise ConfigError for a setting that can't work; return grad_accum_steps (None for --batch_size=auto, which
    setup resolves)."""
    auto = cfg.batch_size == "auto"
    if not auto and not (isinstance(cfg.batch_size, int) and cfg.batch_size > 0):
        raise ConfigError(f"--batch_size must be 'auto' or > 0, got {cfg.batch_size!r}")
    positive = ("n_layer", "n_head", "n_embd", "vocab_size", "block_size", "total_batch_size", "max_steps",
                "num_samples", "sample_length")
    non_negative = ("warmup_steps", "val_every", "hellaswag_every", "hellaswag_limit", "sample_every",
                    "checkpoint_every", "keep_checkpoints", "weight_decay", "grad_clip", "min_lr", "embedding_lr",
                    "head_lr", "scalar_lr", "logit_softcap")
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
    try:  # the architecture switches, checked by the model's own config
        GPTConfig(block_size=cfg.block_size, **{k: getattr(cfg, k) for k in MODEL_FIELDS})
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.optimizer not in ("adamw", "muon") or cfg.schedule not in ("cosine", "warmdown"):
        raise ConfigError(f"need --optimizer adamw or muon and --schedule cosine or warmdown, got {cfg.optimizer!r} "
                          f"and {cfg.schedule!r}")
    if not 0 <= cfg.warmdown_frac <= 1:
        raise ConfigError(f"--warmdown_frac must be in [0, 1], got {cfg.warmdown_frac}")
    if cfg.device not in ("auto", "cuda", "mps", "cpu"):
        raise ConfigError(f"--device must be auto, cuda, mps or cpu, got {cfg.device!r}")
    if not cfg.init_from:
        raise ConfigError("--init_from must be 'scratch' or a GPT-2 model name / directory")
    # auto: some micro-batch must split the batch, so at least 1 (which splits it if any does)
    batch_size = 1 if auto else cfg.batch_size
    tail = " (--batch_size=auto: not even for batch_size 1)" if auto else ""
    tokens_per_micro_step = batch_size * cfg.block_size * world_size
    if cfg.total_batch_size % tokens_per_micro_step:
        raise ConfigError(f"total_batch_size {cfg.total_batch_size} is not a multiple of batch_size * block_size * "
                          f"processes = {batch_size} * {cfg.block_size} * {world_size} = {tokens_per_micro_step}"
                          + tail)
    if cfg.val_every and cfg.val_tokens % (batch_size * cfg.block_size):
        raise ConfigError(f"val_tokens {cfg.val_tokens} is not a multiple of batch_size * block_size = "
                          f"{batch_size * cfg.block_size}" + tail)
    if cfg.val_every and cfg.val_tokens <= 0:
        raise ConfigError(f"--val_tokens must be > 0, got {cfg.val_tokens}")
    # sampling and HellaSwag speak GPT-2 BPE: a scratch model needs every GPT-2 token id (from_pretrained's has them)
    if cfg.init_from == "scratch" and cfg.vocab_size < GPT2_VOCAB_SIZE and (cfg.sample_every or cfg.hellaswag_every):
        raise ConfigError(f"vocab_size {cfg.vocab_size} < {GPT2_VOCAB_SIZE} (GPT-2's tokenizer): "
                          "sampling and HellaSwag need the GPT-2 vocabulary; set --sample_every=0 --hellaswag_every=0")
    if cfg.wandb_log and importlib.util.find_spec("wandb") is None:
        raise ConfigError("--wandb_log=true needs wandb: pip install wandb")
    return None if auto else cfg.total_batch_size // tokens_per_micro_step


# --batch_size=auto tries at most the recipe's micro-batch, build-nanogpt's 64 x 1024 tokens: it fills an H100, so a
# larger one would buy no speed, only memory (and larger eval batches)
MAX_AUTO_BATCH_SIZE = 64


def splits_batch(cfg, world_size, batch_size):
    """Whether micro-batches of batch_size sequences make up total_batch_size in whole micro-steps of every process
    (and val_tokens in whole batches, where val is on)."""
    return (cfg.total_batch_size % (batch_size * cfg.block_size * world_size) == 0
            and not (cfg.val_every and cfg.val_tokens % (batch_size * cfg.block_size)))


def batch_size_candidates(cfg, world_size):
    """The micro-batches --batch_size=auto chooses from, largest first."""
    return [b for b in range(MAX_AUTO_BATCH_SIZE, 0, -1) if splits_batch(cfg, world_size, b)]


def get_lr(step, *, max_lr, min_lr, warmup_steps, max_steps, schedule="cosine", warmdown_frac=0.0):
    """Learning rate of optimizer step `step` (0-based): linear warmup to max_lr, then cosine decay to min_lr at
    max_steps; or, for schedule "warmdown", max_lr until the last warmdown_frac of the steps, then linear to min_lr."""
    if step < warmup_steps:
        # (step + 1): step 0 already learns at max_lr / warmup_steps, and step warmup_steps - 1 at max_lr
        return max_lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    if schedule == "warmdown":
        decay_start = max_steps - round(warmdown_frac * max_steps)
        if step < decay_start:
            return max_lr
        return max_lr + (step - decay_start) / (max_steps - decay_start) * (min_lr - max_lr)  # max_lr -> min_lr
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
        pattern = shard_pattern(split)
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
            with autocast(device_type, autocast_dtype):
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
        group["lr"] = lr * group.get("lr_scale", 1.0)  # Muon+AdamW: each group its own peak (model.MuonAdamW)
    optimizer.step()
    return loss_accum, grad_norm


def finite_or_reported(loss, grad_norm, step, log_dir, master, script):
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


@torch.no_grad()
def evaluate_loss(model, stream, *, n_chunks, B, T, vocab_size, device, autocast_dtype, rank, world_size):
    """Mean loss over the first n_chunks * B*T tokens of stream; rank r takes chunks r, r+W, ...: the same tokens
    and the same value (up to float rounding) for any number of ranks. model is not DDP-wrapped (nothing to sync)."""
    totals = torch.zeros(2, device=device)  # sum of chunk losses, number of chunks
    for i in range(rank, n_chunks, world_size):
        x, y = make_batch(stream, i * B * T, B, T, vocab_size, device)
        with autocast(device.type, autocast_dtype):
            _, loss = model(x, y)
        totals[0] += loss.float()
        totals[1] += 1
    if world_size > 1:
        dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    # every chunk has B*T tokens, so the mean of the chunk means is the mean over all tokens
    return (totals[0] / totals[1]).item()


def sample(model, enc, *, prompt, num_samples, length, seed, device, autocast_dtype):
    """num_samples continuations of prompt (top-k 50). A generator of its own: the training RNG stays untouched, and
    the same seed every time makes samples of different steps differ by the model only. An empty prompt starts from
    <|endoftext|>, a document boundary, as GPT-2's unconditional samples do."""
    tokens = enc.encode_ordinary(prompt) or [enc.eot_token]
    idx = torch.tensor([tokens] * num_samples, dtype=torch.long, device=device)
    # a CPU generator: model.generate draws on the generator's device, so one kind serves cuda, mps and cpu
    generator = torch.Generator().manual_seed(seed)
    with autocast(device.type, autocast_dtype):
        out = model.generate(idx, length, top_k=50, generator=generator)
    return [enc.decode(row) for row in out.tolist()]


# -----------------------------------------------------------------------------
# setup: device, precision, model, optimizer, compile, DDP (bench.py builds its step with the same function)

@dataclass
class Setup:
    cfg: TrainConfig  # the options in force: the architecture is the model's own after a resume or init_from
    device: torch.device
    autocast_dtype: torch.dtype | None  # bf16 on CUDA, None (fp32) elsewhere
    grad_accum_steps: int
    raw_model: GPT  # the plain module: checkpoints and sampling
    model: torch.nn.Module  # raw_model, maybe compiled: the evals
    train_model: torch.nn.Module  # model, DDP-wrapped in a distributed run: the train step
    optimizer: torch.optim.Optimizer


def build_model(cfg, checkpoint, log):
    """(the GPT to train, the options in force): the checkpoint's model on resume, GPT-2 weights for init_from (whose
    architecture replaces the options'), else a fresh init of the options' architecture."""
    if checkpoint is not None:
        model = model_from_checkpoint(checkpoint)
        if cfg.init_from == "scratch":
            differ = [f"{k}={getattr(cfg, k)} (checkpoint: {getattr(model.config, k)})" for k in MODEL_FIELDS
                      if getattr(model.config, k) != getattr(cfg, k)]
            if differ:
                raise ConfigError(f"the checkpoint's model differs from the options: {', '.join(differ)}")
    elif cfg.init_from == "scratch":
        model = GPT(GPTConfig(block_size=cfg.block_size, **{k: getattr(cfg, k) for k in MODEL_FIELDS}))
    else:
        try:
            model = GPT.from_pretrained(cfg.init_from)
        except ValueError as e:
            raise ConfigError(f"--init_from={cfg.init_from}: {e}") from None
        log(f"init_from={cfg.init_from}: the model's own architecture replaces {'/'.join(MODEL_FIELDS)}")
    if cfg.block_size > model.config.block_size:
        raise ConfigError(f"block_size {cfg.block_size} > the model's {model.config.block_size} positions")
    return model, dataclasses.replace(cfg, **{k: getattr(model.config, k) for k in MODEL_FIELDS})


def check_same_step(start_step, device):
    """Every rank reads log_dir itself: on several nodes without a shared log_dir they would resume different steps
    (or some none) and train replicas that silently drift apart. Collective: every rank calls it."""
    steps = torch.tensor([start_step, -start_step], device=device)
    dist.all_reduce(steps, op=dist.ReduceOp.MAX)  # [max, -min]
    if steps[0].item() != -steps[1].item():
        raise ConfigError(f"the ranks found different checkpoints to resume (steps {-steps[1].item()} to "
                          f"{steps[0].item()}): log_dir must be one directory that every node shares")


def tensor_storages(obj):
    """{address: bytes} of the storages of the tensors in nested dicts, lists and tuples (a loaded checkpoint): one
    entry for a storage that several share (the tied wte / lm_head)."""
    if isinstance(obj, torch.Tensor):
        return {obj.untyped_storage().data_ptr(): obj.untyped_storage().nbytes()}
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    return {address: n for item in items for address, n in tensor_storages(item).items()}


def choose_batch_size(cfg, d, device, model, autocast_dtype, budget, kept, log):
    """cfg with --batch_size=auto resolved: the largest candidate micro-batch that fits, kept (a resumed run's own)
    tried first, since another split of the same batch changes the losses in their last bits and the resume would not
    be exact. On a GPU by trial steps of model (on the device); on cpu and mps by train_memory_bytes for model's shapes
    (it may be on the meta device) against budget, memory_budget's (bytes, description). The ranks all take the
    smallest of their choices. Logs the choice and why; raises ConfigError where not even one sequence fits."""
    T, n_params = cfg.block_size, model.num_params()
    if device.type == "cuda":
        # the run also holds AdamW's two moments (allocated by its first step) and, under DDP, buckets as large as the
        # gradients; 5% of the GPU is headroom for the allocator's fragmentation and the evals' other shapes
        reserve = (8 + 4 * d.ddp) * n_params + torch.cuda.get_device_properties(device).total_memory // 20

        def fits(b):
            return fits_on_gpu(model, b, T, reserve, autocast_dtype)
    else:
        def need(b):
            return train_memory_bytes(model.config, n_params, b, T, attention_matrix=device.type == "mps")

        def fits(b):
            return need(b) <= budget[0]
    first = kept if isinstance(kept, int) and splits_batch(cfg, d.world_size, kept) else None
    chosen, rejected = largest_fitting(batch_size_candidates(cfg, d.world_size), fits, first)
    own = chosen
    if d.ddp:  # the ranks must cut the batch alike: all take the smallest choice (0: none fits on some rank)
        smallest = torch.tensor(chosen or 0, device=device)
        dist.all_reduce(smallest, op=dist.ReduceOp.MIN)
        chosen = smallest.item() or None
    if chosen is None and device.type == "cuda":
        raise ConfigError(f"--batch_size=auto: even one sequence of {T} tokens runs out of GPU memory in a trial step "
                          f"(with {reserve / GB:.1f} GB reserved for the optimizer's state); train a smaller model or "
                          "shorter sequences (--block_size)")
    if chosen is None:
        raise ConfigError(f"--batch_size=auto: even one sequence of {T} tokens would need ~{need(1) / GB:.1f} GB, "
                          f"{budget[1]}; train a smaller model or shorter sequences (--block_size)")
    if device.type == "cuda":
        why = f"{rejected[-1]} ran out of GPU memory in a trial step" if rejected else "a trial step fits in GPU memory"
    else:
        why = (f"{rejected[-1]} would need ~{need(rejected[-1]) / GB:.1f} GB" if rejected else
               f"needs ~{need(chosen) / GB:.1f} GB") + f", {budget[1]}"
    if chosen != own:
        why += f"; another rank can take only {chosen}"
    if kept is not None and chosen == kept:
        why = "the checkpoint's, which still fits: the resume stays exact"
    elif kept is not None:
        why = (f"the checkpoint's {kept} {'no longer fits' if first else 'no longer splits the batch'}: the losses "
               f"will differ from an unbroken run's in the last bits; {why}")
    accum = cfg.total_batch_size // (chosen * T * d.world_size)
    log(f"micro-batch {chosen} (auto: {why}) x {accum} accumulation steps")
    return dataclasses.replace(cfg, batch_size=chosen)


def setup(cfg, d, checkpoint=None, checkpoint_path=None, log=print):
    """Everything a training step needs, for the ranks d: the device (the local rank's GPU) and its precision, the
    process group, the model (from checkpoint, read from checkpoint_path, with its optimizer state, if given), the
    optimizer, torch.compile and the DDP wrapper. Raises ConfigError."""
    check_config(cfg, d.world_size)
    device = get_device(cfg.device, d)
    init_distributed(d, device)
    if d.ddp:
        check_same_step(checkpoint["step"] if checkpoint else 0, device)
    autocast_dtype = setup_precision(device)
    # --batch_size=auto: on cpu and mps, an estimate against the memory available, read before the run allocates
    # anything; a checkpoint being resumed is freed once loaded into the model and optimizer, so it counts as available
    kept = checkpoint["train_config"].get("batch_size") if checkpoint is not None else None
    budget = None
    if cfg.batch_size == "auto" and device.type != "cuda":
        budget = memory_budget(device, extra=sum(tensor_storages(checkpoint).values()) if device.type == "cpu" else 0)
        if checkpoint is None and cfg.init_from == "scratch":
            # the shapes alone, on the meta device (no memory): a micro-batch that cannot fit is refused before the
            # weights take any
            with torch.device("meta"):
                shapes = GPT(GPTConfig(block_size=cfg.block_size, **{k: getattr(cfg, k) for k in MODEL_FIELDS}))
            cfg = choose_batch_size(cfg, d, device, shapes, autocast_dtype, budget, kept, log)
    torch.manual_seed(cfg.seed)  # the same init on every rank (DDP also broadcasts rank 0's weights)
    try:
        raw_model, cfg = build_model(cfg, checkpoint, log)
    except ConfigError as e:
        raise ConfigError(f"{checkpoint_path}: {e}" if checkpoint else str(e)) from None
    if budget is not None and cfg.batch_size == "auto":  # a resume, init_from: the architecture is known only now
        cfg = choose_batch_size(cfg, d, device, raw_model, autocast_dtype, budget, kept, log)
    raw_model.to(device)
    if cfg.batch_size == "auto":  # cuda: by trial steps on the device
        cfg = choose_batch_size(cfg, d, device, raw_model, autocast_dtype, None, kept, log)
    grad_accum_steps = cfg.total_batch_size // (cfg.batch_size * cfg.block_size * d.world_size)
    optimizer = raw_model.configure_optimizers(weight_decay=cfg.weight_decay, learning_rate=cfg.max_lr,
                                               betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, device_type=device.type,
                                               verbose=d.master, optimizer=cfg.optimizer, muon_lr=cfg.max_lr,
                                               embedding_lr=cfg.embedding_lr, head_lr=cfg.head_lr,
                                               scalar_lr=cfg.scalar_lr)
    if checkpoint is not None:
        trained_with = checkpoint["train_config"].get("optimizer", "adamw")
        if trained_with != cfg.optimizer:
            raise ConfigError(f"{checkpoint_path}: trained with --optimizer={trained_with}, not {cfg.optimizer}: its "
                              "optimizer state is that optimizer's (pick another --log_dir for a new run)")
        load_optimizer_state(optimizer, checkpoint["optimizer"])
    use_compile = cfg.compile and device.type != "mps"
    if cfg.compile and not use_compile:
        log("note: torch.compile is not used on mps")
    model = torch.compile(raw_model) if use_compile else raw_model
    train_model = DDP(model, device_ids=[d.local_rank] if device.type == "cuda" else None) if d.ddp else model
    return Setup(cfg=cfg, device=device, autocast_dtype=autocast_dtype, grad_accum_steps=grad_accum_steps,
                 raw_model=raw_model, model=model, train_model=train_model, optimizer=optimizer)


# -----------------------------------------------------------------------------
# the run

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


def format_ms(seconds):
    return f"{seconds * 1000:.1f} ms"


def format_mfu(flops_per_token, tokens_per_sec, peak, world_size):
    """Model FLOPs utilization: the FLOP/s the model's math needs over the GPUs' bf16 peak ("n/a" where unknown)."""
    return f"{flops_per_token * tokens_per_sec / (peak * world_size):.1%}" if peak else "n/a"


def due(step, every, last):
    """Whether a periodic task (every N steps, 0: never) runs at step: at its multiples and at the last step."""
    return every > 0 and (step % every == 0 or last)


def run(cfg, d):
    """Train with cfg on this process's share of the ranks d; returns the exit code. Rank 0 holds log_dir's lock
    from the start: a second run into the same log_dir stops there."""
    with locked_run_dir(cfg.log_dir) if d.master else contextlib.nullcontext():
        return train(cfg, d)


def train(cfg, d):
    def log(message):
        if d.master:
            print(message, flush=True)

    resume_path, checkpoint = find_checkpoint(cfg.log_dir, cfg.resume, log)
    s = setup(cfg, d, checkpoint, resume_path, log)
    cfg, device, raw_model = s.cfg, s.device, s.raw_model
    start_step = checkpoint["step"] if checkpoint else 0
    if start_step >= cfg.max_steps:
        log(f"{resume_path} is at step {start_step}, max_steps is {cfg.max_steps}: nothing to do")
        return 0
    train_stream, val_stream, examples = open_data(cfg)
    loader = TrainLoader(train_stream, cfg.batch_size, cfg.block_size, d.rank, d.world_size, cfg.vocab_size, device)
    if checkpoint:
        loader.load_state_dict(checkpoint["loader"])
        set_rng_state(checkpoint["rng"], device)
        changed = compare_configs(checkpoint["train_config"], dataclasses.asdict(cfg))
        log(f"resuming from {resume_path} at step {start_step}" +
            (f"; changed options: {'; '.join(changed)}" if changed else ""))
        del checkpoint  # the optimizer and model hold copies; free ~3x the model's size of host memory
    enc = tiktoken.get_encoding("gpt2") if cfg.sample_every else None

    # log_dir: config.json, log.txt (cut back to the resumed step, then appended), checkpoints
    log_path = None
    if d.master:
        resolved = {"train_config": dataclasses.asdict(cfg), "model_config": dataclasses.asdict(raw_model.config),
                    "world_size": d.world_size, "grad_accum_steps": s.grad_accum_steps, "device": str(device),
                    "num_params": raw_model.num_params(), "compile": s.model is not raw_model,
                    "autocast_dtype": str(s.autocast_dtype) if s.autocast_dtype else "float32"}
        print(json.dumps(resolved, indent=2))
        log_path = prepare_log_dir(cfg.log_dir, start_step, resolved)
    wandb = None
    if cfg.wandb_log and d.master:
        import wandb  # optional dependency, imported only when asked for

        wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or None, config=dataclasses.asdict(cfg))

    def record(step, kind, value, fmt):
        if d.master:
            append_log(log_path, step, kind, value, fmt)
            if wandb:
                wandb.log({kind: value}, step=step)

    def save(step):
        return save_run_checkpoint(cfg.log_dir, step, keep=cfg.keep_checkpoints, master=d.master, log=log,
                                   raw_model=raw_model, optimizer=s.optimizer, loader=loader,
                                   train_config=dataclasses.asdict(cfg), device=device)

    gpt2, gpt3 = REFERENCES["gpt2"], REFERENCES["gpt3"]
    flops_per_token = raw_model.flops_per_token(cfg.block_size)
    peak = peak_flops(device)
    tokens_per_micro_batch = cfg.batch_size * cfg.block_size
    step_times = []  # seconds of each train step of this process (evals and checkpoints excluded)
    log(f"total batch {cfg.total_batch_size:,} tokens = {cfg.batch_size} x {cfg.block_size} x {d.world_size} "
        f"process(es) x {s.grad_accum_steps} micro-steps; {raw_model.num_params():,} parameters on {device}")
    with StopSignal() as stop:  # SIGINT / SIGTERM: finish the step, save, exit
        for step in range(start_step, cfg.max_steps + 1):
            last = step == cfg.max_steps
            # --- evaluations of the model as it is after `step` optimizer steps
            do_val, do_hella = due(step, cfg.val_every, last), due(step, cfg.hellaswag_every, last)
            do_sample = due(step, cfg.sample_every, last)
            if do_val or do_hella or do_sample:
                s.model.eval()
                t0 = time.perf_counter()
                if do_val:
                    val_loss = evaluate_loss(s.model, val_stream, n_chunks=cfg.val_tokens // tokens_per_micro_batch,
                                             B=cfg.batch_size, T=cfg.block_size, vocab_size=cfg.vocab_size,
                                             device=device, autocast_dtype=s.autocast_dtype, rank=d.rank,
                                             world_size=d.world_size)
                    log(f"step {step:5d} | val loss {val_loss:.4f} (GPT-2 124M: {gpt2['val']})")
                    record(step, "val", val_loss, ".4f")
                if do_hella:
                    result = hellaswag.evaluate(s.model, examples, device=device, autocast_dtype=s.autocast_dtype,
                                                rank=d.rank, world_size=d.world_size)
                    log(f"step {step:5d} | HellaSwag acc_norm {result.correct_norm}/{result.n} = "
                        f"{result.acc_norm:.4f} (GPT-2 124M: {gpt2['hella']}, GPT-3 124M: {gpt3['hella']})")
                    record(step, "hella", result.acc_norm, ".4f")
                if do_sample and d.master:
                    for i, text in enumerate(sample(raw_model, enc, prompt=cfg.sample_prompt,
                                                    num_samples=cfg.num_samples, length=cfg.sample_length,
                                                    seed=cfg.seed, device=device, autocast_dtype=s.autocast_dtype)):
                        log(f"step {step:5d} | sample {i}: {text!r}")
                s.model.train()
                log(f"step {step:5d} | evals took {time.perf_counter() - t0:.1f} s")
            # --- checkpoint (not at the step just resumed from: that checkpoint exists); the last step's always
            if step > start_step and (last or due(step, cfg.checkpoint_every, last)):
                save(step)
            if last:
                break
            # --- one optimizer step
            t0 = time.perf_counter()
            batches = [loader.next_batch() for _ in range(s.grad_accum_steps)]
            lr = get_lr(step, max_lr=cfg.max_lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps,
                        max_steps=cfg.max_steps, schedule=cfg.schedule, warmdown_frac=cfg.warmdown_frac)
            loss, grad_norm = train_step(s.train_model, s.optimizer, batches, lr=lr, grad_clip=cfg.grad_clip,
                                         device_type=device.type, autocast_dtype=s.autocast_dtype, ddp=d.ddp)
            loss, grad_norm = loss.item(), grad_norm.item()  # waits for the device: the step is done
            dt = time.perf_counter() - t0
            step_times.append(dt)
            if not finite_or_reported(loss, grad_norm, step, cfg.log_dir, d.master, SCRIPT):
                return 1
            tokens_per_sec = cfg.total_batch_size / dt
            log(f"step {step:5d} | loss {loss:.6f} | lr {lr:.4e} | norm {grad_norm:.4f} | {format_ms(dt)} | "
                f"{tokens_per_sec:,.0f} tok/s | MFU {format_mfu(flops_per_token, tokens_per_sec, peak, d.world_size)}")
            record(step, "train", loss, ".6f")
            if wandb:
                wandb.log({"lr": lr, "grad_norm": grad_norm, "tokens_per_sec": tokens_per_sec}, step=step)
            # --- a stop request (any rank's): the state after this step is saved, a rerun continues from it
            if code := stop.stop_after(step, save, SCRIPT, device, d):
                return code

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
        fast = recipe_defaults("fast", TrainConfig())
        print(usage(__doc__, TrainConfig, "at the top of train_gpt2.py") + "\n\n  --recipe=fast sets (for the default "
              "n_embd 768; the AdamW lrs scale as (768 / n_embd) ** 0.5):\n    " +
              " ".join(f"--{k}={v:g}" if isinstance(v, float) else f"--{k}={v}" for k, v in fast.items()))
        return 0
    d = dist_from_env()
    return script_main(SCRIPT, d, lambda: run(parse_config(argv), d))


if __name__ == "__main__":
    sys.exit(main())
