r"""Train GPT-2 (124M) on FineWeb-Edu 10B with the GPT-3 small recipe, on 1 to N GPUs, with running evals.

    python fineweb.py                                          # once: tokenize FineWeb-Edu into edu_fineweb10B/
    python train_gpt2.py                                       # one GPU (or mps / cpu)
    torchrun --standalone --nproc_per_node=8 train_gpt2.py     # 8 GPUs on one node
    python train_gpt2.py --recipe=fast                         # the modern recipe: fewer steps to GPT-2's val loss

Every default below is an option (--help lists them). Stopped any way (Ctrl-C, kill -9), the same command continues
from the newest checkpoint in log_dir, as an unbroken run would have. `python plot.py log/log.txt` draws the log.
"""

import contextlib
import dataclasses
import glob
import json
import os
import sys
import time
from bisect import bisect_right

import numpy as np
import tiktoken
import torch
import torch.distributed as dist

import hellaswag
from checkpoints import (append_log, compare_configs, failure_context, find_checkpoint, load_optimizer_state,
                         locked_run_dir, model_from_checkpoint, pretrained_weights, prepare_log_dir,
                         save_run_checkpoint, set_rng_state)
from files import REFERENCES, shard_pattern
from guards import check_config, check_finite, check_same_step, check_start, fit_micro_batch, model_config
from model import GPT, NANOCHAT_SWITCHES, PADDED_VOCAB_SIZE
from optim import configure_optimizers, due, get_lr, get_muon_momentum, train_step
from options import ConfigError, help_text, option, parse
from runtime import (StopSignal, Writes, autocast, dist_from_env, get_device, init_distributed, peak_flops,
                     peak_memory_bytes, script_main, setup_precision, step_progress, wrap_ddp)

SCRIPT = "train_gpt2.py"
MAKE_SHARDS = "make them with `python fineweb.py`"


def auto_or_int(text):
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise ValueError("expected 'auto' or int") from None


# --size: GPT-2's shapes, (n_layer, n_head, n_embd), and for --recipe=gpt2 the max_lr and batch (tokens) of the GPT-3
# nearest in size (GPT-3 paper, Table 2.1: 125M, 350M, 760M, 1.3B); small is TrainConfig's defaults
SIZES = {"small": (12, 12, 768, 6e-4, 2**19), "medium": (24, 16, 1024, 3e-4, 2**19),
         "large": (36, 20, 1280, 2.5e-4, 2**19), "xl": (48, 25, 1600, 2e-4, 2**20)}
WARMUP_TOKENS = 375_000_000  # GPT-3's warmup, whatever the batch
EPOCH_TOKENS = 10_000_000_000  # one epoch of FineWeb-Edu 10B


@dataclasses.dataclass
class TrainConfig:
    recipe: str = option("gpt2", "gpt2: GPT-3 small's, the defaults below; fast: the modern one (listed at the end)",
                         section="recipe")
    data_dir: str = option(os.path.join(os.path.dirname(os.path.abspath(__file__)), "edu_fineweb10B"),
                           "fineweb.py's token shards", section="data and output")
    log_dir: str = option("log", "log.txt, config.json and checkpoints model_NNNNN.pt")
    n_layer: int = option(12, "transformer blocks", section="model: GPT-2 small")
    n_head: int = option(12, "attention heads (n_embd must be a multiple)")
    n_embd: int = option(768, "width of the residual stream")
    size: str = option("small", "GPT-2's shape (small, medium, large, xl: listed at the end)", choices=tuple(SIZES))
    vocab_size: int = option(PADDED_VOCAB_SIZE, "rows of the token embedding: GPT-2's 50257 padded to 393 * 128")
    block_size: int = option(1024, "sequence length T")
    init_from: str = option("scratch", "or a GPT-2 to start from: gpt2, gpt2-medium..., a transformers directory")
    norm: str = option("layernorm", "layernorm | rmsnorm | rmsnorm_nogain (no gains)",
                       section="model: architecture switches, GPT-2's by default")
    norm_eps: float = option(1e-5, "the eps of every norm, QK-norm's too")
    embed_norm: bool = option(False, "a norm right after the token embedding")
    mlp: str = option("gelu", "gelu | swiglu | relu2")
    pos_emb: str = option("learned", "learned | rope")
    qk_norm: bool = option(False, "RMS-normalize each head's q and k")
    tie_embeddings: bool = option(True, "one matrix for the token embedding and the output head")
    bias: bool = option(True, "biases in the linear layers and layer norms")
    logit_softcap: float = option(0.0, "cap * tanh(logits / cap) (0: off)")
    zero_init: bool = option(False, "residual projections (and an untied head) start at zero")
    init: str = option("gpt2", "gpt2: N(0, 0.02) | nanochat: its init_weights, for an untied head (model.py)")
    batch_size: int | str = option("auto", "micro-batch per process; auto: the largest up to 64 that fits in memory",
                                   type=auto_or_int, metavar="auto|int", section="batch: total_batch_size tokens = "
                                   "batch_size * block_size * processes * grad_accum_steps")
    total_batch_size: int = option(524288, "2**19 tokens, GPT-3 small's 0.5M batch")
    optimizer: str = option("adamw", "adamw | muon (Muon for the blocks' matrices, AdamW for the rest)",
                            section="optimizer: AdamW, linear warmup then cosine decay to min_lr (GPT-3 small's)")
    max_lr: float = option(6e-4, "peak learning rate, reached at the end of warmup (muon: the matrices')")
    min_lr: float = option(6e-5, "learning rate at max_steps and after (max_lr / 10)")
    embedding_lr: float = option(0.2, "muon only: the AdamW peak lr of the token (and position) embeddings")
    head_lr: float = option(0.004, "muon only: the AdamW peak lr of the output head")
    scalar_lr: float = option(0.04, "muon only: the AdamW peak lr of norm gains and biases")
    muon_momentum_warmup: int = option(0, "muon only: steps of Muon's momentum rising 0.85 -> 0.95 (0: 0.95 all along)")
    schedule: str = option("cosine", "cosine | warmdown (constant, then linear to min_lr over warmdown_frac)")
    warmdown_frac: float = option(0.4, "warmdown only: the fraction of max_steps spent decaying to min_lr")
    warmup_steps: int = option(WARMUP_TOKENS // 2**19, "GPT-3 warms up over 375M tokens: 375e6 / 2**19")
    max_steps: int = option(EPOCH_TOKENS // 2**19, "10B tokens / 2**19 tokens per step: one epoch of FineWeb-Edu 10B")
    weight_decay: float = option(0.1, "on matrices and embeddings only (muon: on the matrices only)")
    beta1: float = option(0.9, "AdamW's betas and eps (GPT-3's)")
    beta2: float = option(0.95, "")
    eps: float = option(1e-8, "")
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0: no clipping)")
    val_every: int = option(250, "val loss", section="evals and checkpoints, every N steps and at the last (0: never)")
    val_tokens: int = option(10485760, "val tokens from the val shard, for any number of processes (160 x 64K)")
    hellaswag_every: int = option(250, "HellaSwag acc_norm")
    hellaswag_data: str = option("", "a local hellaswag_val.jsonl, or \"\" to download it once")
    hellaswag_limit: int = option(0, "score the first N examples only (0: all 10,042)")
    sample_every: int = option(250, "text samples from the model")
    sample_prompt: str = option("Hello, I'm a language model,", "what they continue (empty: <|endoftext|>)")
    num_samples: int = option(4, "samples each time")
    sample_length: int = option(32, "new tokens per sample")
    checkpoint_every: int = option(1000, "for an exact resume (Ctrl-C and SIGTERM save one, and the last step)")
    keep_checkpoints: int = option(3, "the newest N checkpoints are kept (0: all)")
    resume: str = option("auto", "auto: the newest checkpoint in log_dir, if any; a checkpoint; \"\": a fresh run")
    device: str = option("auto", "auto (cuda, then mps, then cpu), cuda, mps or cpu", section="system")
    compile: bool = option(True, "torch.compile the model (cuda and cpu; ignored on mps)")
    seed: int = option(1337, "the initial weights and the samples")
    wandb_log: bool = option(False, "also log to Weights & Biases (pip install wandb)")
    wandb_project: str = option("gpt2-fineweb-edu", "")
    wandb_run_name: str = option("", "\"\": wandb picks one")


def recipe_defaults(recipe, cfg):
    """{option: value} a recipe sets for a model as wide as cfg's. fast: modded-nanogpt's and nanochat's block and
    optimizer (docs/training.md); AdamW's lrs shrink as 1/sqrt(width), nanochat's rule, tuned at 768 wide."""
    if recipe == "gpt2":
        return {}
    if recipe != "fast":
        raise ConfigError(f"--recipe must be gpt2 or fast, got {recipe!r}")
    width_scale = (cfg.n_embd / 768) ** -0.5
    return dict(**NANOCHAT_SWITCHES, norm_eps=1e-6,  # nanochat's block, as transformers' NanoChatForCausalLM
                logit_softcap=15.0, zero_init=True, optimizer="muon", max_lr=0.02, min_lr=0.0,
                embedding_lr=0.2 * width_scale, head_lr=0.004 * width_scale, scalar_lr=0.04 * width_scale,
                weight_decay=0.0, beta1=0.8, beta2=0.95, eps=1e-10, schedule="warmdown", warmdown_frac=0.4,
                warmup_steps=0, muon_momentum_warmup=300)


def parse_config(argv):
    """TrainConfig from the options given; under --size or another --recipe, their defaults fill in the rest."""
    cfg, given = parse(TrainConfig, argv)
    if cfg.size == "small" and cfg.recipe == "gpt2":
        return cfg  # GPT-3 small's recipe: TrainConfig's defaults, bit for bit
    return size_and_recipe(cfg, given)


def size_and_recipe(cfg, given):
    """cfg with the size's defaults (--size), then the recipe's (its lrs follow the size's width), under given."""
    sized = {}
    if cfg.size != "small":  # small: TrainConfig's defaults, bit for bit (6e-4 / 10 is not the float 6e-5)
        n_layer, n_head, n_embd, lr, batch = SIZES[cfg.size]
        sized = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd)
        if cfg.recipe == "gpt2":
            sized.update(max_lr=lr, min_lr=lr / 10, total_batch_size=batch, warmup_steps=WARMUP_TOKENS // batch,
                         max_steps=EPOCH_TOKENS // batch)
    cfg = dataclasses.replace(cfg, **{k: v for k, v in sized.items() if k not in given})
    return dataclasses.replace(cfg, **{k: v for k, v in recipe_defaults(cfg.recipe, cfg).items() if k not in given})


# -----------------------------------------------------------------------------
# data: the uint16 token shards as one stream, read through memory maps

class TokenStream:
    """The shards of one split as one circular stream: a batch can span two shards (nothing is skipped at a shard's
    end), and a run longer than the data starts over at the first token (a second epoch) without a seam."""

    def __init__(self, data_dir, split):
        pattern = shard_pattern(split)
        if not os.path.isdir(data_dir):
            raise ConfigError(f"data_dir {data_dir}: no such directory (expected {pattern} token shards; "
                              f"{MAKE_SHARDS})")
        self.paths = sorted(glob.glob(os.path.join(data_dir, pattern)))
        if not self.paths:
            raise ConfigError(f"data_dir {data_dir}: no {pattern} files (expected token shards; {MAKE_SHARDS})")
        self.shards = [load_shard(path) for path in self.paths]
        self.starts = np.cumsum([0] + [len(s) for s in self.shards]).tolist()  # stream position of each shard
        self.total = self.starts[-1]

    def read(self, start, n):
        """n tokens (uint16) from stream position start on, wrapping around at the end."""
        out = np.empty(n, dtype=np.uint16)
        filled, pos = 0, start % self.total
        while filled < n:
            i = bisect_right(self.starts, pos) - 1  # the shard holding pos
            take = min(n - filled, self.starts[i + 1] - pos)
            out[filled:filled + take] = self.shards[i][pos - self.starts[i]:pos - self.starts[i] + take]
            filled, pos = filled + take, (pos + take) % self.total
        return out

    def where(self, pos):
        """'file at token N' for a stream position, for error messages."""
        i = bisect_right(self.starts, pos % self.total) - 1
        return f"{self.paths[i]} at token {pos % self.total - self.starts[i]}"


def load_shard(path):
    """Memory-map one shard: a 1-D uint16 .npy of at least one token (nothing is read until it is sliced)."""
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:  # ValueError, OSError, EOFError...: not a plain .npy
        raise ConfigError(f"{path}: not a .npy token shard ({e}); {MAKE_SHARDS}") from None
    if not isinstance(tokens, np.ndarray) or tokens.dtype != np.uint16 or tokens.ndim != 1:
        got = (f"{tokens.dtype} array of shape {tokens.shape}" if isinstance(tokens, np.ndarray)
               else type(tokens).__name__)
        raise ConfigError(f"{path}: expected a 1-D uint16 array of GPT-2 tokens, got {got}; {MAKE_SHARDS}")
    if len(tokens) == 0:
        raise ConfigError(f"{path}: empty shard (0 tokens); {MAKE_SHARDS}")
    return tokens


def make_batch(stream, start, B, T, vocab_size, device):
    """Inputs x and targets y (B, T) on device from the B*T+1 tokens at start: y is x shifted by one, the next token."""
    buf = stream.read(start, B * T + 1)
    if int(buf.max()) >= vocab_size:  # a cheap check that spares an opaque device-side assert on CUDA
        bad = int(np.argmax(buf >= vocab_size))
        raise ConfigError(f"token id {buf[bad]} >= vocab_size {vocab_size} in {stream.where(start + bad)}",
                          every_rank=True)  # only this rank reads this chunk
    tokens = torch.from_numpy(buf.astype(np.int64))
    if device.type == "cuda":  # pinned host memory: the copy runs asynchronously, overlapping the GPU's work
        tokens = tokens.pin_memory().to(device, non_blocking=True)
    else:
        tokens = tokens.to(device)
    return tokens[:-1].view(B, T), tokens[1:].view(B, T)


class TrainLoader:
    """One rank's micro-batches, build-nanogpt's order: micro-step m of rank r of W takes the step's B*T chunk m*W + r,
    so W ranks see what one process accumulating W times as many sees. The position counts tokens: a checkpoint
    resumes on any number of ranks."""

    def __init__(self, stream, B, T, rank, world_size, vocab_size, device):
        self.stream, self.B, self.T, self.rank, self.world_size = stream, B, T, rank, world_size
        self.vocab_size, self.device = vocab_size, device
        self.position = 0  # stream position of the next group of W micro-batches
        self.prefetched = []  # the next step's micro-batches read ahead (position counts them)

    def next_batch(self):
        start = self.position + self.rank * self.B * self.T
        self.position += self.B * self.T * self.world_size
        return make_batch(self.stream, start, self.B, self.T, self.vocab_size, self.device)

    def prefetch(self, n):
        """Read the next step's n micro-batches now (while the device still runs this step): step_batches(n)
        returns them. A checkpoint taken meanwhile still holds the position before them."""
        self.prefetched = [self.next_batch() for _ in range(n)]

    def step_batches(self, n):
        """A step's n micro-batches: the prefetched ones, or read now."""
        batches, self.prefetched = self.prefetched or [self.next_batch() for _ in range(n)], []
        return batches

    def state_dict(self):
        position = self.position - len(self.prefetched) * self.B * self.T * self.world_size
        return {"position": position, "stream_tokens": self.stream.total}

    def load_state_dict(self, state):
        if state["stream_tokens"] != self.stream.total:
            raise ConfigError(f"the train shards hold {self.stream.total} tokens but the checkpoint was trained on "
                              f"{state['stream_tokens']}: the data changed, an exact resume is impossible")
        self.position, self.prefetched = state["position"], []


def open_data(cfg):
    """(train stream, val stream or None, HellaSwag examples), checked before anything is built (collective)."""
    train_stream = TokenStream(cfg.data_dir, "train")
    val_stream = TokenStream(cfg.data_dir, "val") if cfg.val_every else None
    if val_stream and val_stream.total < cfg.val_tokens + 1:
        raise ConfigError(f"data_dir {cfg.data_dir}: the val shard holds {val_stream.total} tokens, "
                          f"val_tokens={cfg.val_tokens} needs {cfg.val_tokens + 1}")
    examples = []
    if cfg.hellaswag_every:
        try:
            examples = hellaswag.load_examples(cfg.hellaswag_data or None, limit=cfg.hellaswag_limit or None,
                                               data_option="--hellaswag_data=FILE")
        except hellaswag.HellaSwagError as e:
            raise ConfigError(f"{e} (or --hellaswag_every=0 to skip HellaSwag)") from None
    return train_stream, val_stream, examples


def check_data_fits(cfg, train_stream):
    if train_stream.total < cfg.batch_size * cfg.block_size + 1:
        raise ConfigError(f"data_dir {cfg.data_dir}: the train shards hold {train_stream.total} tokens, fewer than "
                          f"one micro-batch needs ({cfg.batch_size} * {cfg.block_size} + 1)")


# -----------------------------------------------------------------------------
# the evaluations (the optimizer step itself is optim.train_step)

STOP_CHECK_CHUNKS = 8  # the val loss asks whether to stop every this many chunks (a collective under DDP)


@torch.no_grad()
def evaluate_loss(model, stream, *, n_chunks, B, T, vocab_size, device, autocast_dtype, rank, world_size,
                  stopping=lambda: 0):
    """Mean loss over the first n_chunks * B*T tokens of stream; rank r takes chunks r, r+W, ...: the same tokens
    and the same value (up to float rounding) for any number of ranks. model is not DDP-wrapped (nothing to sync).
    None if stopping() (collective: every rank calls it at the same chunks) says so first."""
    totals = torch.zeros(2, device=device)  # sum of chunk losses, number of chunks
    for j in range(-(-n_chunks // world_size)):  # every rank the same rounds, one with no chunk left idles its last
        if j % STOP_CHECK_CHUNKS == 0 and stopping():
            return None
        i = rank + j * world_size
        if i >= n_chunks:
            continue
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


def run_evals(s, d, step, due_now, val_stream, examples, enc, log, record, stopping=lambda: 0):
    """The evals due_now ({"val": bool, "hella": bool, "sample": bool}) of the model after `step` optimizer steps:
    logged, and recorded in log.txt (record(step, kind, value, format)). stopping() (StopSignal.agreed, collective)
    is asked before each and during the val loss: a stop request skips the rest (torchrun and most schedulers kill
    30 s after SIGTERM; a val pass alone can take longer)."""
    s.model.eval()
    try:
        evals_until_stopped(s, d, step, due_now, val_stream, examples, enc, log, record, stopping)
    finally:
        s.model.train()


def evals_until_stopped(s, d, step, due_now, val_stream, examples, enc, log, record, stopping):
    """run_evals' evals, in eval mode; returns at the first stopping() that says stop."""
    cfg, device, gpt2, gpt3 = s.cfg, s.device, REFERENCES["gpt2"], REFERENCES["gpt3"]
    t0 = time.perf_counter()
    if due_now["val"]:
        val_loss = evaluate_loss(s.model, val_stream, n_chunks=cfg.val_tokens // (cfg.batch_size * cfg.block_size),
                                 B=cfg.batch_size, T=cfg.block_size, vocab_size=cfg.vocab_size, device=device,
                                 autocast_dtype=s.autocast_dtype, rank=d.rank, world_size=d.world_size,
                                 stopping=stopping)
        if val_loss is None:
            return
        log(f"step {step:5d} | val loss {val_loss:.4f} (GPT-2 124M: {gpt2['val']})")
        record(step, "val", val_loss, ".4f")
    if due_now["hella"] and not stopping():
        # the eager model: HellaSwag's batches vary in T, and through the compiled one they would add a graph per
        # length to the cache that GPT.forward's training graph shares (and its recompile limit)
        result = hellaswag.evaluate(s.raw_model, examples, device=device, autocast_dtype=s.autocast_dtype, rank=d.rank,
                                    world_size=d.world_size)
        log(f"step {step:5d} | HellaSwag acc_norm {result.correct_norm}/{result.n} = {result.acc_norm:.4f} "
            f"(GPT-2 124M: {gpt2['hella']}, GPT-3 124M: {gpt3['hella']})")
        record(step, "hella", result.acc_norm, ".4f")
    if due_now["sample"] and not stopping() and d.master:
        for i, text in enumerate(sample(s.raw_model, enc, prompt=cfg.sample_prompt, num_samples=cfg.num_samples,
                                        length=cfg.sample_length, seed=cfg.seed, device=device,
                                        autocast_dtype=s.autocast_dtype)):
            log(f"step {step:5d} | sample {i}: {text!r}")
    log(f"step {step:5d} | evals took {time.perf_counter() - t0:.1f} s")


# -----------------------------------------------------------------------------
# setup: device, precision, model, micro-batch, optimizer, compile, DDP

@dataclasses.dataclass
class Setup:
    cfg: TrainConfig  # the options in force: the architecture is the model's own after a resume or init_from
    device: torch.device
    autocast_dtype: torch.dtype | None  # bf16 on CUDA, None (fp32) elsewhere
    grad_accum_steps: int
    raw_model: GPT  # the plain module: checkpoints, sampling and HellaSwag
    model: torch.nn.Module  # raw_model, maybe compiled for the training shape: the val loss (same shape, no grad)
    train_model: torch.nn.Module  # model, DDP-wrapped in a distributed run: the train step
    optimizer: torch.optim.Optimizer


def start_ranks(cfg, d, checkpoint=None):
    """This rank's device; under torchrun the process group joined and the ranks' resumed step checked to agree."""
    device = get_device(cfg.device, d)
    if d.ddp:
        init_distributed(d, device)
        check_same_step(checkpoint["step"] if checkpoint else 0, device)
    return device


def setup(cfg, d, device, checkpoint=None, checkpoint_path=None, log=print):
    """Everything a training step needs: precision, model, micro-batch, optimizer, torch.compile, DDP."""
    autocast_dtype = setup_precision(device)
    # the weights the run starts from: the checkpoint's, GPT-2's (init_from), or None for a fresh init
    start = checkpoint or (pretrained_weights(cfg.init_from) if cfg.init_from != "scratch" else None)
    if start:
        cfg = check_start(cfg, start, checkpoint_path, log)  # the architecture of the model it starts from
    if cfg.batch_size == "auto":
        cfg = fit_micro_batch(cfg, d, device, autocast_dtype, start, log)
    torch.manual_seed(cfg.seed)  # the same init on every rank (DDP also broadcasts rank 0's weights)
    raw_model = model_from_checkpoint(start, checkpoint_path) if start else GPT(model_config(cfg))
    raw_model.to(device)
    optimizer = configure_optimizers(raw_model, cfg, device.type, verbose=d.master)
    if checkpoint:
        load_optimizer_state(optimizer, checkpoint["optimizer"])
    if cfg.compile and device.type == "mps":
        log("note: torch.compile is not used on mps")
    # dynamic=False: kernels for the one (B, T) of training (the step-0 evals' shapes would make them dynamic)
    model = torch.compile(raw_model, dynamic=False) if cfg.compile and device.type != "mps" else raw_model
    train_model = wrap_ddp(model, d, device) if d.ddp else model
    grad_accum_steps = cfg.total_batch_size // (cfg.batch_size * cfg.block_size * d.world_size)
    return Setup(cfg=cfg, device=device, autocast_dtype=autocast_dtype, grad_accum_steps=grad_accum_steps,
                 raw_model=raw_model, model=model, train_model=train_model, optimizer=optimizer)


# -----------------------------------------------------------------------------
# the run

def format_mfu(flops_per_token, tokens_per_sec, peak, world_size):
    """Model FLOPs utilization: the FLOP/s the model's math needs over the GPUs' bf16 peak ("n/a" where unknown)."""
    return f"{flops_per_token * tokens_per_sec / (peak * world_size):.1%}" if peak else "n/a"


def train(cfg, d):
    """Train with cfg on this process's share of the ranks d; returns the exit code."""
    def log(message):
        if d.master:
            print(message, flush=True)

    check_config(cfg, d.world_size)
    resume_path, checkpoint = find_checkpoint(cfg.log_dir, cfg.resume, log)
    device = start_ranks(cfg, d, checkpoint)  # before the early return below: every rank joins the step check
    start_step = checkpoint["step"] if checkpoint else 0
    if start_step >= cfg.max_steps:
        log(f"{resume_path} is at step {start_step}, max_steps is {cfg.max_steps}: nothing to do")
        return 0
    train_stream, val_stream, examples = open_data(cfg)  # the data before the model: a bad path fails in a second
    s = setup(cfg, d, device, checkpoint, resume_path, log)
    cfg, raw_model = s.cfg, s.raw_model
    check_data_fits(cfg, train_stream)
    loader = TrainLoader(train_stream, cfg.batch_size, cfg.block_size, d.rank, d.world_size, cfg.vocab_size, device)
    if checkpoint:
        resume(checkpoint, resume_path, loader, cfg, device, log)
        del checkpoint  # the optimizer and model hold copies; free ~3x the model's size of host memory
    enc = tiktoken.get_encoding("gpt2") if cfg.sample_every else None
    # rank 0's files: one that cannot be written (a full disk) stops every rank, one line naming the last checkpoint
    writes = Writes(d.ddp, context=lambda step: failure_context(cfg.log_dir, step))
    log_path, wandb = None, None
    if d.master:
        log_path, wandb = writes.write(start_step, start_log, s, d, start_step) or (None, None)

    def record(step, kind, value, fmt, **extra):
        if d.master:
            writes.write(step, append_log, log_path, step, kind, value, fmt)
            if wandb:
                wandb.log({kind: value, **extra}, step=step)

    def save(step):
        return writes.write(step, save_run_checkpoint, cfg.log_dir, step, keep=cfg.keep_checkpoints, master=d.master,
                            log=log, raw_model=raw_model, optimizer=s.optimizer, loader=loader,
                            train_config=dataclasses.asdict(cfg), device=device)

    flops_per_token, peak = raw_model.flops_per_token(cfg.block_size), peak_flops(device)
    step_times = []  # seconds of each train step of this process (evals and checkpoints excluded)
    log(f"total batch {cfg.total_batch_size:,} tokens = {cfg.batch_size} x {cfg.block_size} x {d.world_size} "
        f"process(es) x {s.grad_accum_steps} micro-steps; {raw_model.num_params():,} parameters on {device}")
    with StopSignal(writes) as stop:  # SIGINT / SIGTERM: finish the step, save, exit
        for step in range(start_step, cfg.max_steps + 1):
            last = step == cfg.max_steps
            # --- evaluations of the model as it is after `step` optimizer steps
            due_now = {kind: due(step, every, last) for kind, every in (("val", cfg.val_every), ("hella",
                       cfg.hellaswag_every), ("sample", cfg.sample_every))}
            if any(due_now.values()):
                run_evals(s, d, step, due_now, val_stream, examples, enc, log, record,
                          stopping=lambda: stop.agreed(device, d.ddp))
                # a stop asked for during the evals: the state of `step` steps saved now, the evals rerun on resume
                if code := stop.stop_at(step, save, SCRIPT, stop.agreed(device, d.ddp), d, device):
                    return code
            # --- checkpoint (not at the step just resumed from: that checkpoint exists); the last step's always
            if step > start_step and (last or due(step, cfg.checkpoint_every, last)):
                save(step)
            if last:
                break
            # --- one optimizer step
            t0 = time.perf_counter()
            batches = loader.step_batches(s.grad_accum_steps)
            lr = get_lr(step, max_lr=cfg.max_lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps,
                        max_steps=cfg.max_steps, schedule=cfg.schedule, warmdown_frac=cfg.warmdown_frac)
            momentum = get_muon_momentum(step, cfg.muon_momentum_warmup) if cfg.optimizer == "muon" else None
            # under DDP the stop request rides on the loss's all-reduce: no collective of its own each step
            flags = stop.flags(device) if d.ddp else None
            loss, grad_norm = train_step(s.train_model, s.optimizer, batches, lr=lr, grad_clip=cfg.grad_clip,
                                         device_type=device.type, autocast_dtype=s.autocast_dtype, ddp=d.ddp,
                                         momentum=momentum, also_reduce=flags)
            if step + 1 < cfg.max_steps:  # the host reads and copies the next step's input while the device works
                loader.prefetch(s.grad_accum_steps)
            loss, grad_norm = loss.item(), grad_norm.item()  # waits for the device: the step is done
            dt = time.perf_counter() - t0
            step_times.append(dt)
            if not check_finite(loss, grad_norm, step, cfg.log_dir, d.master, SCRIPT):
                return 1
            tokens_per_sec = cfg.total_batch_size / dt
            progress, eta = step_progress(step, cfg.max_steps, step_times)
            log(f"step {progress} | loss {loss:.6f} | lr {lr:.4e} | norm {grad_norm:.4f} | {dt * 1000:.1f} ms | "
                f"{tokens_per_sec:,.0f} tok/s | MFU {format_mfu(flops_per_token, tokens_per_sec, peak, d.world_size)}"
                f" | {eta}")
            record(step, "train", loss, ".6f", lr=lr, grad_norm=grad_norm, tokens_per_sec=tokens_per_sec)
            # --- a stop request (any rank's): the state after this step is saved, a rerun continues from it
            signum = stop.from_flags(flags) if d.ddp else stop.signum  # the same on every rank
            if code := stop.stop_at(step + 1, save, SCRIPT, signum, d, device):
                return code
    writes.agreed(device)  # the last checkpoint written on rank 0, or every rank stops with its error
    log(speed_summary(step_times, cfg.total_batch_size, flops_per_token, peak, d.world_size, device))
    if wandb:
        wandb.finish()
    return 0


def resume(checkpoint, path, loader, cfg, device, log):
    """Continue where the checkpoint stopped: the loader's position and the RNG; logs the options that changed."""
    loader.load_state_dict(checkpoint["loader"])
    set_rng_state(checkpoint["rng"], device)
    changed = compare_configs(checkpoint["train_config"], dataclasses.asdict(cfg))
    log(f"resuming from {path} at step {checkpoint['step']}" +
        (f"; changed options: {'; '.join(changed)}" if changed else ""))


def start_log(s, d, start_step):
    """Rank 0's log_dir, before the first step: the resolved config printed and in config.json, log.txt cut back to
    the resumed step (then appended), wandb if asked for. Returns (log.txt's path, the wandb module or None)."""
    cfg, device = s.cfg, s.device
    resolved = {"train_config": dataclasses.asdict(cfg), "model_config": dataclasses.asdict(s.raw_model.config),
                "world_size": d.world_size, "grad_accum_steps": s.grad_accum_steps, "device": str(device),
                "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
                "torch": torch.__version__, "num_params": s.raw_model.num_params(),
                "compile": s.model is not s.raw_model,
                "autocast_dtype": str(s.autocast_dtype) if s.autocast_dtype else "float32"}
    print(json.dumps(resolved, indent=2))
    return prepare_log_dir(cfg.log_dir, start_step, resolved), start_wandb(cfg) if cfg.wandb_log else None


def start_wandb(cfg):
    import wandb  # optional, imported only when asked for

    wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or None, config=dataclasses.asdict(cfg))
    return wandb


def speed_summary(step_times, tokens_per_step, flops_per_token, peak, world_size, device):
    """The mean speed of a run's steps, the first of this process left out (torch.compile's work and warm-up)."""
    steady = step_times[1:] or step_times
    tokens_per_sec = tokens_per_step * len(steady) / sum(steady)
    return (f"done: {len(steady)} steps averaged {1000 * sum(steady) / len(steady):.1f} ms/step, "
            f"{tokens_per_sec:,.0f} tok/s, MFU {format_mfu(flops_per_token, tokens_per_sec, peak, world_size)}, "
            f"peak memory {peak_memory_bytes(device) / 2**30:.2f} GiB (the first step of this process excluded: "
            "warm-up, and torch.compile's work when on)")


def run(cfg, d):
    """Rank 0 holds log_dir's lock from the start: a second run into the same log_dir stops there."""
    with locked_run_dir(cfg.log_dir) if d.master else contextlib.nullcontext():
        return train(cfg, d)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        return print_help()
    d = dist_from_env()
    return script_main(SCRIPT, d, lambda: run(parse_config(argv), d))


def print_help():
    fast = recipe_defaults("fast", TrainConfig())
    print(help_text(TrainConfig, SCRIPT, __doc__) + "\n\n  --recipe=fast sets (for the default n_embd 768; the AdamW "
          "lrs scale as (768 / n_embd) ** 0.5):\n    " +
          " ".join(f"--{k}={v:g}" if isinstance(v, float) else f"--{k}={v}" for k, v in fast.items()))
    print("\n  --size sets GPT-2's n_layer/n_head/n_embd:\n    " +
          ", ".join(f"{k} {n_layer}/{n_head}/{n_embd}" for k, (n_layer, n_head, n_embd, _, _) in SIZES.items()) +
          "\n  and, under --recipe=gpt2, GPT-3's max_lr and batch for it (min_lr = max_lr / 10, warmup_steps and "
          "max_steps for 375M and 10B tokens):\n    " +
          ", ".join(f"{k} {lr:g} {batch / 2**20:g}M" for k, (*_, lr, batch) in SIZES.items()) + " tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
