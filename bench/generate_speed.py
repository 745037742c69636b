"""
Tokens/s of GPT.generate with the KV cache (prompt run once, then one token per step) against without it (the whole
sequence fed again at every step, as generate did before): same random-weight model, same prompt, greedy, so the two
outputs must be the same tokens.

    python -m bench.generate_speed                      # CPU: 6 layers x 384, 64-token prompt, 256 new tokens
    python -m bench.generate_speed --device cuda --n_layer 12 --n_head 12 --n_embd 768 --batch_size 8  # GPT-2 small
    python -m bench.generate_speed --pos_emb rope       # any GPTConfig switch: --qk_norm, --mlp relu2, ...

Each way is timed over one run after an untimed warm-up of a few tokens. Without the cache, step t costs a forward pass
over prompt_len + t tokens, lm_head included at every position, so the speed-up grows with the length; with it, every
step costs one token's pass plus attention over the cached keys. Past block_size both ways do full passes.
"""

import sys
import time
from dataclasses import dataclass

import torch

from model import GPT, GPT2_VOCAB_SIZE, PADDED_VOCAB_SIZE, GPTConfig
from options import ConfigError, at_least, option, run
from runtime import get_device

SCRIPT = "bench.generate_speed"


def timed_generate(model, prompt, new_tokens, use_cache, device):
    """(output tokens, seconds) of one greedy generate, after an untimed warm-up of 4 tokens (allocator, kernels)."""
    model.generate(prompt, 4, temperature=0, use_cache=use_cache)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model.generate(prompt, new_tokens, temperature=0, use_cache=use_cache)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


@dataclass
class GenerateBenchConfig:
    n_layer: int = option(6, "transformer blocks (random weights)", type=at_least(1))
    n_head: int = option(6, "attention heads", type=at_least(1))
    n_embd: int = option(384, "embedding width", type=at_least(1))
    block_size: int = option(1024, "the context: past it both ways do full passes", type=at_least(1))
    vocab_size: int = option(PADDED_VOCAB_SIZE, "GPT-2's, padded as in training", type=at_least(GPT2_VOCAB_SIZE))
    pos_emb: str = option("learned", "learned or rope")
    qk_norm: bool = option(False, "RMS-normalize q and k")
    mlp: str = option("gelu", "gelu, swiglu or relu2")
    prompt_len: int = option(64, "tokens of the random prompt", type=at_least(1))
    new_tokens: int = option(256, "tokens generated after it, greedily", type=at_least(1))
    batch_size: int = option(1, "prompts generated together", type=at_least(1))
    device: str = option("cpu", "cpu, cuda or mps (bf16 autocast on cuda)")


def bench_generate(args):
    device = get_device(args.device)
    try:
        config = GPTConfig(block_size=args.block_size, vocab_size=args.vocab_size, n_layer=args.n_layer,
                           n_head=args.n_head, n_embd=args.n_embd, pos_emb=args.pos_emb, qk_norm=args.qk_norm,
                           mlp=args.mlp)
    except ValueError as e:  # GPTConfig's checks
        raise ConfigError(str(e)) from None
    torch.manual_seed(0)
    model = GPT(config).to(device).eval()
    prompt = torch.randint(0, GPT2_VOCAB_SIZE, (args.batch_size, args.prompt_len), device=device)
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    print(f"{device} ({torch.get_num_threads()} threads), GPT {config.n_layer}L/{config.n_head}H/{config.n_embd}d "
          f"block {config.block_size} ({model.num_params() / 1e6:.1f}M params), batch {args.batch_size}, "
          f"prompt {args.prompt_len} + {args.new_tokens} new tokens, greedy, "
          f"{'bf16 autocast' if autocast_dtype else 'fp32'}")
    results = {}
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        for use_cache in (True, False):
            results[use_cache] = timed_generate(model, prompt, args.new_tokens, use_cache, device)
    tokens = args.batch_size * args.new_tokens
    for use_cache, name in ((True, "KV cache"), (False, "no cache")):
        seconds = results[use_cache][1]
        print(f"{name}: {1000 * seconds / tokens:8.2f} ms/token {tokens / seconds:10.1f} tokens/s")
    print(f"speed-up: {results[False][1] / results[True][1]:.2f}x")
    cached, uncached = results[True][0], results[False][0]
    if torch.equal(cached, uncached):
        print("greedy outputs equal: yes")
    else:
        first = (cached != uncached).any(dim=0).nonzero()[0].item() - args.prompt_len
        print(f"greedy outputs equal: NO, first difference at new token {first}")
    return 0


def main(argv=None):
    return run(SCRIPT, __doc__, GenerateBenchConfig, argv, bench_generate)


if __name__ == "__main__":
    sys.exit(main())
