"""Any GPT-2 scored on HellaSwag's 10,042 validation examples as build-nanogpt scores it, batched (docs/evaluation.md).

    python hellaswag.py --model gpt2 --limit 1000    # a hub id, a transformers directory, or a run of this project
"""

import dataclasses
import http.client
import itertools
import math
import os
import sys
import time
import urllib.request

import numpy as np
import tiktoken
import torch
import torch.distributed as dist
from torch.nn import functional as F
from tqdm import tqdm

from checkpoints import load_model
from files import JSONLinesError, WriteError, atomic_write, jsonl_records
from model import GPT2_VOCAB_SIZE
from options import ConfigError, at_least, option, run
from runtime import autocast, get_device

VAL_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
CACHE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hellaswag")
NUM_ENDINGS = 4
PAD_MULTIPLE, SCORED_MULTIPLE = 32, 8  # a batch's T and scored positions round up to these: few shapes to compile


class HellaSwagError(ValueError):
    """Bad or unreachable HellaSwag data; the message is one line naming the file (and line) and the problem."""


@dataclasses.dataclass
class HellaSwagResult:
    n: int  # examples scored
    correct: int  # whose ending of the lowest total loss is the right one (acc)
    correct_norm: int  # whose ending of the lowest mean loss per token is (acc_norm)

    @property
    def acc(self):
        return self.correct / self.n

    @property
    def acc_norm(self):
        return self.correct_norm / self.n

    def __str__(self):
        return f"hellaswag: n={self.n} acc={self.acc:.4f} acc_norm={self.acc_norm:.4f}"


# -----------------------------------------------------------------------------
# data: download, parse, validate

def download(url, path, chunk_size=1 << 20, data_option="--data FILE"):
    """Fetch url into path atomically (files.atomic_write): an interrupted download leaves no truncated file.
    data_option: the calling command's own option for a local copy, which a failed download tells the user to pass.
    Raises HellaSwagError if the download fails, WriteError if the file cannot be written (a full disk, say)."""
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    except OSError as e:
        raise WriteError.of(path, e) from None

    def write(f):
        with urllib.request.urlopen(url, timeout=60) as resp:
            total = int(resp.headers.get("Content-Length") or 0)
            with tqdm(total=total or None, unit="B", unit_scale=True, unit_divisor=1024,
                      desc=f"downloading {os.path.basename(path)}") as bar:
                while chunk := resp.read(chunk_size):
                    f.write(chunk)
                    bar.update(len(chunk))
            if total and f.tell() != total:
                raise OSError(f"got {f.tell()} of {total} bytes")

    try:
        atomic_write(path, write)  # a WriteError passes: the network is fine, the disk is not
    except (OSError, http.client.HTTPException, ValueError) as e:  # URLError, HTTPError, timeouts, a cut, a bad URL
        reason = getattr(e, "reason", None) or e
        raise HellaSwagError(f"could not download {url}: {reason}; "
                             f"pass {data_option} with a local copy of {os.path.basename(path)}") from None


def fetch(url, cache_dir, data_option="--data FILE"):
    """Path of the cached copy of url in cache_dir, downloaded first if missing. In a distributed run every rank must
    call this: rank 0 downloads while the others wait at a barrier (one download, not one per GPU). A rank that still
    finds no file after it (a node without the shared file system) downloads its own copy."""
    path = os.path.join(cache_dir, url.rsplit("/", 1)[-1])
    distributed = dist.is_available() and dist.is_initialized()
    error = None
    if not os.path.exists(path) and (not distributed or dist.get_rank() == 0):
        try:
            download(url, path, data_option=data_option)
        except (HellaSwagError, WriteError) as e:
            error = e  # reach the barrier anyway: the other ranks must not wait forever
    if distributed:
        dist.barrier()
    if error is not None:
        raise error
    if not os.path.exists(path):
        download(url, path, data_option=data_option)
    return path


def check_example(example, where):
    """Raise HellaSwagError unless example is a HellaSwag record: `ctx` text, exactly 4 `endings`, `label` in 0-3."""
    if not isinstance(example, dict):
        raise HellaSwagError(f"{where}: expected a JSON object, got {type(example).__name__}")
    if missing := [key for key in ("ctx", "endings", "label") if key not in example]:
        raise HellaSwagError(f"{where}: record without {', '.join(repr(key) for key in missing)}")
    ctx, endings, label = example["ctx"], example["endings"], example["label"]
    if not isinstance(ctx, str) or not ctx.strip():
        raise HellaSwagError(f"{where}: 'ctx' must be non-empty text, got {ctx!r}")
    if not isinstance(endings, list) or len(endings) != NUM_ENDINGS:
        got = len(endings) if isinstance(endings, list) else type(endings).__name__
        raise HellaSwagError(f"{where}: expected {NUM_ENDINGS} endings, got {got}")
    if not all(isinstance(ending, str) for ending in endings):
        raise HellaSwagError(f"{where}: every ending must be text")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < NUM_ENDINGS:
        raise HellaSwagError(f"{where}: label must be an integer 0-{NUM_ENDINGS - 1}, got {label!r}")
    return example


def load_examples(path=None, *, cache_dir=None, limit=None, url=VAL_URL, data_option="--data FILE"):
    """The first `limit` (None: all) records, each checked, of the HellaSwag .jsonl at path, else of the validation
    split fetched into cache_dir (collective); a failed download names data_option, the caller's option for a copy."""
    if path is None:
        path = fetch(url, cache_dir or CACHE_DIR, data_option)
    try:
        examples = [check_example(record, where) for where, record in itertools.islice(jsonl_records(path), limit)]
    except JSONLinesError as e:
        raise HellaSwagError(str(e)) from None
    except OSError as e:
        raise HellaSwagError(f"{path}: cannot read: {e.strerror or e}") from None
    if not examples:
        raise HellaSwagError(f"{path}: no examples")
    return examples


# -----------------------------------------------------------------------------
# rendering and batching

def render_example(example, enc):
    """(context tokens, [tokens of " " + ending for each ending]). The space goes with the ending because GPT-2's BPE
    attaches the space before a word to that word's token; encode_ordinary is encode for this text (no special
    tokens in HellaSwag) and never raises on a stray "<|endoftext|>"."""
    ctx_tokens = enc.encode_ordinary(example["ctx"])
    return ctx_tokens, [enc.encode_ordinary(" " + ending) for ending in example["endings"]]


def make_row(ctx_tokens, ending_tokens, block_size):
    """One input row (context + ending) and the position of its first scored token: the ending tokens row[first:]
    are scored, each by the logits of the position before it. A row longer than block_size loses its first tokens
    (context) and keeps the ending; that never happens to HellaSwag at GPT-2's 1024."""
    row = ctx_tokens + ending_tokens
    cut = max(0, len(row) - block_size)
    return row[cut:], max(len(ctx_tokens) - cut, 1)  # the first token has no predecessor: never scored


def bucket(length, multiple, cap):
    """length rounded up to a multiple of `multiple`, at most cap: the T of a forward pass whose longest row has
    `length` tokens, or its E, the scored positions of its rows (a pass of dummy rows only counts as length 1)."""
    return min(multiple * math.ceil(max(length, 1) / multiple), cap)


def render_rows(examples, enc, block_size, n_rows, pad_multiple):
    """The 4 rows of every example, sorted longest first, and n_rows - 4 * len(examples) dummy rows after them, as
    numpy int64 arrays (built with a few vectorized operations: no per-row tensor work in the batch loop):
        tokens  (n_rows, W)  each row's tokens, then zeros (padding after a row: causal attention never sees it)
        cols    (n_rows, E)  the positions t whose logits are scored (0 where a row has fewer than E)
        targets (n_rows, E)  the token each of them is scored on, row[t + 1] (-1: not scored)
        lengths (n_rows,)    row lengths (0: dummy row)
        order   (R,)         the slot, 4 * example + ending, of each of the R real rows
    W is the longest row rounded up as a forward pass would be; E the most scored tokens of a row.
    Rows of about the same length then share a forward pass (little padding) and an out-of-memory shows up at once."""
    rows, firsts = [], []
    for example in examples:
        ctx_tokens, endings = render_example(example, enc)
        for ending_tokens in endings:
            row, first = make_row(ctx_tokens, ending_tokens, block_size)
            rows.append(row)
            firsts.append(first)
    lengths = np.array([len(row) for row in rows], dtype=np.int64)  # (R,)
    firsts = np.array(firsts, dtype=np.int64)  # (R,)
    n_scored = lengths - firsts  # (R,)
    W = bucket(int(lengths.max(initial=0)), pad_multiple, block_size)
    E = int(n_scored.max(initial=1))
    R = len(rows)
    tokens = np.zeros((n_rows, W), dtype=np.int64)
    # a boolean mask assigns in row-major order: row by row, exactly as the rows are concatenated
    tokens[:R][np.arange(W) < lengths[:, None]] = np.fromiter(itertools.chain.from_iterable(rows), np.int64,
                                                               count=int(lengths.sum()))
    j = np.arange(E)  # (E,)
    scored = j < n_scored[:, None]  # (R, E)
    cols = np.zeros((n_rows, E), dtype=np.int64)
    cols[:R] = np.where(scored, firsts[:, None] - 1 + j, 0)
    targets = np.full((n_rows, E), -1, dtype=np.int64)
    # row[t + 1] where scored (cols + 1); elsewhere an in-range index (cols + 0 = 0) whose token is then dropped
    targets[:R] = np.where(scored, np.take_along_axis(tokens[:R], cols[:R] + scored, axis=1), -1)
    order = np.argsort(-lengths, kind="stable")  # (R,) longest first, ties in example order
    lengths = np.concatenate([lengths[order], np.zeros(n_rows - R, dtype=np.int64)])
    tokens[:R], cols[:R], targets[:R] = tokens[order], cols[order], targets[order]
    return tokens, cols, targets, lengths, order


_rendered = {}  # render_rows' arrays for the examples list last scored: {"examples": list, "key": ..., "rows": ...}


def rendered_rows(examples, share, enc, block_size, n_rows, pad_multiple, ranks):
    """render_rows(share, ...), computed once for the same examples list (the same object: a training run scores
    the one it loaded at every eval, 10,042 examples tokenized once) and the same shapes. The arrays are only
    read (each eval copies them to the device). A list changed in place after its first eval is not seen: pass a
    new list."""
    key = (block_size, n_rows, pad_multiple, ranks)
    if _rendered.get("examples") is not examples or _rendered.get("key") != key:
        rows = render_rows(share, enc, block_size, n_rows, pad_multiple)
        _rendered.update(examples=examples, key=key, rows=rows)  # holds the list: its id cannot be reused meanwhile
    return _rendered["rows"]


def _block_size(model):
    """model.config.block_size through the DistributedDataParallel (.module) and torch.compile (._orig_mod) wrappers."""
    while not hasattr(model, "config"):
        model = getattr(model, "module", None) or getattr(model, "_orig_mod")
    return model.config.block_size


@torch.no_grad()
def evaluate(model, examples, *, device, batch_size=16, autocast_dtype=None, rank=0, world_size=1, progress=False,
             pad_multiple=PAD_MULTIPLE):
    """Score HellaSwag examples with model, called as `logits, _ = model(idx, positions=cols)` (model.GPT's forward:
    logits at the scored positions only); it may be compiled or wrapped in DDP.
    batch_size is in examples: a forward pass takes 4 * batch_size rows. Rank r scores examples[r::world_size]; every
    rank runs the same number of forward passes of the same batch size (DDP-safe) and the counts are summed over
    ranks, so every rank returns the result for all examples. autocast_dtype (e.g. torch.bfloat16 on CUDA) runs the
    forward under autocast; None runs it in the model's dtype. The caller sets model.eval()/train()."""
    if not examples:
        raise ValueError("no HellaSwag examples to score")
    device = torch.device(device)
    enc = tiktoken.get_encoding("gpt2")
    block_size = _block_size(model)
    share = examples[rank::world_size]
    per_rank = NUM_ENDINGS * math.ceil(len(examples) / world_size)  # rows of the largest share
    batch_rows = min(NUM_ENDINGS * batch_size, per_rank)  # a fixed batch dimension, no larger than needed
    n_batches = math.ceil(per_rank / batch_rows)  # the same on every rank: a rank out of rows runs dummy rows
    tokens, cols, targets, lengths, order = rendered_rows(examples, share, enc, block_size, n_batches * batch_rows,
                                                          pad_multiple, (rank, world_size))
    n_scored = (targets >= 0).sum(axis=1)  # (rows,) ending tokens scored per row
    # Everything goes to the device once, and a batch is a slice of it: the loop below neither copies from the host
    # nor waits for the device (no .item(), no boolean indexing), so the GPU runs the forward passes back to back.
    tokens, cols, targets = (torch.from_numpy(a).to(device) for a in (tokens, cols, targets))
    losses = torch.zeros(len(lengths), device=device)  # (rows,) summed loss over each row's ending tokens
    bar = tqdm(total=len(order), unit="row", desc="hellaswag", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(lengths), batch_rows):
        end = start + batch_rows
        T = bucket(int(lengths[start]), pad_multiple, block_size)  # rows are sorted: the first is the longest
        # the most scored tokens of a row in this batch, rounded up (at most the width of cols)
        E = bucket(int(n_scored[start:end].max()), SCORED_MULTIPLE, cols.size(1))
        with autocast(device.type, autocast_dtype):
            logits, _ = model(tokens[start:end, :T], positions=cols[start:end, :E])  # (batch_rows, E, V)
        # the softmax over the tokenizer's n_vocab ids (a model with a padded vocabulary, 50304, has extra logits
        # that are no tokens), in float32
        picked = logits[..., :enc.n_vocab].float()
        token_losses = F.cross_entropy(picked.flatten(0, 1), targets[start:end, :E].flatten(), ignore_index=-1,
                                       reduction="none")  # (batch_rows * E,) 0 where not scored
        losses[start:end] = token_losses.view(batch_rows, E).sum(dim=1)  # a plain sum: deterministic, unlike atomics
        bar.update(max(0, min(end, len(order)) - start))  # (on a GPU it runs ahead of the work queued)
    bar.close()
    inverse = torch.from_numpy(np.argsort(order)).to(device)  # (examples * 4,) the sorted row of each slot
    totals = losses[inverse].view(-1, NUM_ENDINGS)  # (examples, 4) summed loss over each ending's tokens
    means = totals / torch.from_numpy(n_scored).to(device)[inverse].view(-1, NUM_ENDINGS)  # mean loss per token
    labels = torch.tensor([example["label"] for example in share], dtype=torch.long, device=device)
    counts = torch.stack([labels.new_tensor(len(share)), (totals.argmin(dim=1) == labels).sum(),
                          (means.argmin(dim=1) == labels).sum()])  # n, correct, correct_norm
    if world_size > 1:
        dist.all_reduce(counts)
    n, correct, correct_norm = counts.tolist()
    return HellaSwagResult(n, correct, correct_norm)


# -----------------------------------------------------------------------------
# command line

@dataclasses.dataclass
class HellaSwagConfig:
    model: str = option(None, "hub id (gpt2, gpt2-xl...), transformers directory or train_gpt2.py checkpoint (.pt)")
    data: str = option(None, f"a local hellaswag_val.jsonl (default: download once into {CACHE_DIR})")
    limit: int = option(None, "score the first N examples only (default: all)", type=at_least(1))
    batch_size: int = option(16, "examples per forward pass (4 rows each)", type=at_least(1))
    device: str = option("auto", "auto (cuda, then mps, then cpu), cuda, mps or cpu")
    dtype: str = option("auto", "autocast dtype; auto is bfloat16 on CUDA, float32 elsewhere (the reference is "
                                "fp32/tf32)", choices=("auto", "bfloat16", "float32"))


def score(cfg):
    if cfg.model is None:
        raise ConfigError("--model is required: a hub id, a transformers directory or a train_gpt2.py checkpoint")
    device = get_device(cfg.device)
    examples = load_examples(cfg.data, limit=cfg.limit)
    model = load_model(cfg.model)[0].to(device).eval()
    if model.config.vocab_size < GPT2_VOCAB_SIZE:  # GPT-2's token ids would index past its embedding
        raise ConfigError(f"{cfg.model}: vocab_size {model.config.vocab_size} < {GPT2_VOCAB_SIZE}: HellaSwag is "
                          "scored with GPT-2's tokenizer, which needs every GPT-2 token id")
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    torch.set_float32_matmul_precision("high")  # the reference numbers were measured with TF32 matmuls
    print(f"{cfg.model}: {model.num_params():,} parameters, {len(examples)} examples, {device}, {dtype}")
    t0 = time.time()
    result = evaluate(model, examples, device=device, batch_size=cfg.batch_size,
                      autocast_dtype=torch.bfloat16 if dtype == "bfloat16" else None, progress=True)
    dt = time.time() - t0
    print(f"{result.n / dt:.1f} examples/s ({dt:.1f} s)")
    print(result)


def main(argv=None):
    return run("hellaswag.py", __doc__, HellaSwagConfig, argv, score, errors=(HellaSwagError,))


if __name__ == "__main__":
    sys.exit(main())
