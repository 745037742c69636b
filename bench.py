"""Training speed of train_gpt2.py's own step on random tokens: ms/step, tokens/s, MFU and peak memory.

    python bench.py                                   # GPT-2 small, 524,288 tokens a step, the largest micro-batch
                                                      # up to 64 x 1024 that fits (train_gpt2.py's --batch_size=auto)
    python bench.py --batch_size=32 --compile=false   # any train_gpt2.py option, to measure one lever at a time
    python bench.py --device=cpu --n_layer=2 --n_head=2 --n_embd=64 --block_size=64 --batch_size=4 \
        --total_batch_size=256 --compile=false --steps=3

The model, optimizer, precision and step function are train_gpt2.py's (imported, not copied), so what this measures
is what a training run gets, minus data loading and evals. The first `warmup` steps (torch.compile, cuDNN/cuBLAS
autotuning, allocator growth) are not timed.
"""

import dataclasses
import resource
import statistics
import sys
import time
from dataclasses import dataclass

import torch

import train_gpt2
from runtime import ConfigError, dist_from_env, option, parse_args, peak_flops


@dataclass
class BenchConfig:
    steps: int = option(10, "timed optimizer steps")
    warmup: int = option(3, "untimed steps first")


def split_args(argv):
    """(bench options, train_gpt2 options) from one `--name=value` list."""
    ours = {f"--{f.name}=" for f in dataclasses.fields(BenchConfig)}
    mine = [a for a in argv if any(a.startswith(p) for p in ours)]
    return mine, [a for a in argv if a not in mine]


def peak_memory_bytes(device):
    """Peak memory of the run: the CUDA caching allocator's high-water mark, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def bench(cfg, bc):
    """Time bc.warmup + bc.steps optimizer steps of cfg's model; returns the figures as a dict."""
    d = dist_from_env()
    s = train_gpt2.setup(cfg, d)  # what a training run builds: device, precision, model, optimizer, compile, DDP
    cfg, raw_model, device = s.cfg, s.raw_model, s.device
    # one fixed set of random micro-batches: the step's cost does not depend on which tokens it sees
    g = torch.Generator().manual_seed(cfg.seed)
    tokens = torch.randint(0, raw_model.config.vocab_size, (s.grad_accum_steps, cfg.batch_size, cfg.block_size + 1),
                           generator=g).to(device)
    batches = [(t[:, :-1], t[:, 1:]) for t in tokens]
    times = []
    for step in range(bc.warmup + bc.steps):
        t0 = time.perf_counter()
        loss, norm = train_gpt2.train_step(s.train_model, s.optimizer, batches, lr=cfg.max_lr,
                                           grad_clip=cfg.grad_clip, device_type=device.type,
                                           autocast_dtype=s.autocast_dtype, ddp=d.ddp)
        loss = loss.item()  # waits for the device
        dt = time.perf_counter() - t0
        print(f"step {step:3d} | loss {loss:.4f} | {dt * 1000:.1f} ms{' (warm-up)' if step < bc.warmup else ''}",
              flush=True)
        if step >= bc.warmup:
            times.append(dt)
    ms = statistics.median(times) * 1000
    tokens_per_sec = cfg.total_batch_size / (ms / 1000)
    peak = peak_flops(device)
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "torch": torch.__version__,
        "params": raw_model.num_params(),
        "batch": f"{cfg.batch_size}x{cfg.block_size}x{s.grad_accum_steps}",
        "compile": s.model is not raw_model,
        "ms_per_step": ms,
        "tokens_per_sec": tokens_per_sec,
        "mfu": raw_model.flops_per_token(cfg.block_size) * tokens_per_sec / peak if peak else None,
        "peak_mem_gib": peak_memory_bytes(device) / 2**30,
    }


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(__doc__.strip() + "\n\nbench options: --steps=10 --warmup=3; every train_gpt2.py option too")
        return 0
    mine, theirs = split_args(argv)
    try:
        bc = parse_args(mine, BenchConfig)
        if bc.steps < 1 or bc.warmup < 0:
            raise ConfigError(f"need --steps >= 1 and --warmup >= 0, got {bc.steps} and {bc.warmup}")
        r = bench(train_gpt2.parse_config(theirs), bc)
    except ConfigError as e:
        print(f"bench.py: error: {e}", file=sys.stderr)
        return 2
    mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
    print(f"bench: device={r['device']} torch={r['torch']} params={r['params']:,} batch={r['batch']} "
          f"compile={r['compile']} ms/step={r['ms_per_step']:.1f} tokens/s={r['tokens_per_sec']:,.0f} mfu={mfu} "
          f"peak_mem={r['peak_mem_gib']:.2f}GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
