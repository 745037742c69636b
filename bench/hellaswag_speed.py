"""
Examples/s of hellaswag.evaluate (batched, logits at the scored positions only) against scoring one example at a
time as the reference script does (a forward pass of 4 rows per example, logits everywhere): same model, same
generated examples, one timed run each.

    python -m bench.hellaswag_speed                            # CPU, a small random GPT (4 layers, 128 wide)
    python -m bench.hellaswag_speed --device cuda --n 2048     # GPT-2 small (124M, random weights) under bf16 autocast
    python -m bench.hellaswag_speed --device cuda --compile

The examples are random words from GPT-2's vocabulary with HellaSwag's lengths (context 10-80 tokens, endings 5-30),
so the numbers need no download; the two runs must agree on the counts.
"""

import random
import sys
import time
from dataclasses import dataclass
from functools import partial

import tiktoken
import torch
from torch.nn import functional as F

import hellaswag
from model import GPT, GPTConfig
from options import at_least, option, run
from runtime import get_device

SCRIPT = "bench.hellaswag_speed"


def generate_examples(n, enc, seed=0):
    rng = random.Random(seed)
    words = [t for t in (enc.decode([i]) for i in range(enc.n_vocab)) if t[:1] == " " and t[1:].isalpha()]

    def text(lo, hi):
        return "".join(rng.choice(words) for _ in range(rng.randint(lo, hi))).strip()

    return [{"ctx": text(10, 80), "endings": [text(5, 30) + "." for _ in range(4)], "label": rng.randrange(4)}
            for _ in range(n)]


@torch.no_grad()
def one_at_a_time(model, examples, *, device, autocast_dtype, enc):
    """The reference script's way, written out independently: one forward pass per example, its 4 rows padded to the
    longest of them, logits at every position, each ending's loss summed over its tokens. -> (n, correct, norm)."""
    correct = correct_norm = 0
    for example in examples:
        ctx_tokens, endings = hellaswag.render_example(example, enc)
        rows = [ctx_tokens + ending for ending in endings]
        T = max(len(row) for row in rows)
        idx = torch.zeros((len(rows), T), dtype=torch.long)
        scored = torch.zeros((len(rows), T), dtype=torch.bool)  # the ending tokens
        for i, row in enumerate(rows):
            idx[i, :len(row)] = torch.tensor(row)
            scored[i, len(ctx_tokens):len(row)] = True
        idx, scored = idx.to(device), scored.to(device)
        with torch.autocast(device_type=device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits, _ = model(idx)  # (4, T, V)
        losses = F.cross_entropy(logits[:, :-1, :enc.n_vocab].float().flatten(0, 1), idx[:, 1:].flatten(),
                                 reduction="none").view(len(rows), T - 1)  # token t + 1 scored by logits t
        total = (losses * scored[:, 1:]).sum(dim=1)  # (4,)
        correct += int(total.argmin()) == example["label"]
        correct_norm += int((total / scored[:, 1:].sum(dim=1)).argmin()) == example["label"]
    return len(examples), correct, correct_norm


def timed(score, examples, **kwargs):
    """(counts, examples/s) of one call of score, after an untimed call on a few examples (allocator, kernels)."""
    score(examples[:8], **kwargs)
    t0 = time.perf_counter()
    counts = score(examples, **kwargs)  # host ints: the GPU is done
    return counts, len(examples) / (time.perf_counter() - t0)


@dataclass
class HellaSwagBenchConfig:
    device: str = option("cpu", "cpu, cuda or mps (cuda: GPT-2 small under bf16 autocast)")
    n: int = option(None, "examples (default: 64 on CPU, 2048 on GPU)", type=at_least(1))
    batch_size: int = option(16, "hellaswag.evaluate's batch_size, in examples", type=at_least(1))
    compile: bool = option(False, "torch.compile the model (both runs)")


def bench_hellaswag(args):
    device = get_device(args.device)
    gpu = device.type == "cuda"
    n = args.n or (2048 if gpu else 64)
    enc = tiktoken.get_encoding("gpt2")
    torch.manual_seed(0)
    config = GPTConfig() if gpu else GPTConfig(block_size=256, n_layer=4, n_head=4, n_embd=128)
    model = GPT(config).to(device).eval()
    if args.compile:
        model = torch.compile(model)
    autocast_dtype = torch.bfloat16 if gpu else None
    examples = generate_examples(n, enc)
    print(f"{device} ({torch.get_num_threads()} threads), GPT {config.n_layer}L/{config.n_head}H/{config.n_embd}d "
          f"({model.num_params() / 1e6:.1f}M params), {n} generated examples, "
          f"{'bf16 autocast' if autocast_dtype else 'fp32'}{', compiled' if args.compile else ''}")

    def batched_eval(examples):
        r = hellaswag.evaluate(model, examples, device=device, autocast_dtype=autocast_dtype,
                               batch_size=args.batch_size)
        return r.n, r.correct, r.correct_norm

    batched, batched_rate = timed(batched_eval, examples)
    single, single_rate = timed(partial(one_at_a_time, model, device=device, autocast_dtype=autocast_dtype, enc=enc),
                                examples)
    if batched != single:
        print(f"counts differ (n, correct, correct_norm): batched {batched}, one at a time {single}")
    print(f"batched (batch_size {args.batch_size}): {batched_rate:8.1f} examples/s")
    print(f"one example at a time:    {single_rate:8.1f} examples/s")
    print(f"speedup: {batched_rate / single_rate:.2f}x")
    return 0


def main(argv=None):
    return run(SCRIPT, __doc__, HellaSwagBenchConfig, argv, bench_hellaswag)


if __name__ == "__main__":
    sys.exit(main())
