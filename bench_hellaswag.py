"""
Examples/s of hellaswag.evaluate, batched, against scoring one example at a time as the reference script does (a
forward pass of 4 unpadded rows per example): same model, same generated examples, one timed run each.

    python bench_hellaswag.py                                  # CPU, a small random GPT (4 layers, 128 wide)
    python bench_hellaswag.py --device cuda --n 2048           # GPT-2 small (124M, random weights) under bf16 autocast
    python bench_hellaswag.py --device cuda --compile

The examples are random words from GPT-2's vocabulary with HellaSwag's lengths (context 10-80 tokens, endings 5-30),
so the numbers need no download; the two runs must agree on the counts.
"""

import argparse
import random
import time

import tiktoken
import torch

import hellaswag
from model import GPT, GPTConfig


def generate_examples(n, enc, seed=0):
    rng = random.Random(seed)
    words = [t for t in (enc.decode([i]) for i in range(enc.n_vocab)) if t[:1] == " " and t[1:].isalpha()]

    def text(lo, hi):
        return "".join(rng.choice(words) for _ in range(rng.randint(lo, hi))).strip()

    return [{"ctx": text(10, 80), "endings": [text(5, 30) + "." for _ in range(4)], "label": rng.randrange(4)}
            for _ in range(n)]


def timed(model, examples, device, autocast_dtype, **kwargs):
    """(result, examples/s) of one evaluate call, after an untimed call on a few examples (allocator, kernels)."""
    hellaswag.evaluate(model, examples[:8], device=device, autocast_dtype=autocast_dtype, **kwargs)
    t0 = time.perf_counter()
    result = hellaswag.evaluate(model, examples, device=device, autocast_dtype=autocast_dtype, **kwargs)
    return result, len(examples) / (time.perf_counter() - t0)  # evaluate returns host ints: the GPU is done


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n", type=int, default=None, help="examples (default: 64 on CPU, 2048 on GPU)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (both runs)")
    args = parser.parse_args()
    device = torch.device(args.device)
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
    batched, batched_rate = timed(model, examples, device, autocast_dtype, batch_size=args.batch_size)
    single, single_rate = timed(model, examples, device, autocast_dtype, batch_size=1, pad_multiple=1)
    if (batched.correct, batched.correct_norm) != (single.correct, single.correct_norm):
        print(f"counts differ: batched {batched}, one at a time {single}")
    print(f"batched (batch_size {args.batch_size}): {batched_rate:8.1f} examples/s")
    print(f"one example at a time:    {single_rate:8.1f} examples/s")
    print(f"speedup: {batched_rate / single_rate:.2f}x")


if __name__ == "__main__":
    main()
