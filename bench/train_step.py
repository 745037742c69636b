r"""Training speed of train_gpt2.py itself, on random tokens: ms/step, tokens/s, MFU and peak memory.

    python -m bench.train_step                                   # GPT-2 small, 524,288 tokens a step, the largest
                                                                 # micro-batch up to 64 x 1024 that fits
    python -m bench.train_step --batch_size=32 --compile=false   # any train_gpt2.py option: one lever at a time
    python -m bench.train_step --nproc=8                         # torchrun, 8 processes on this machine
    python -m bench.train_step --device=cpu --n_layer=2 --n_head=2 --n_embd=64 --block_size=64 --batch_size=4 \
        --total_batch_size=256 --compile=false --steps=3

It runs the training command as a user does (every eval and periodic checkpoint off), on a shard of random tokens it
writes to a temporary directory, and reads the ms of each step from its log lines: what it measures is what a run
gets, the data loading included. The first --warmup steps (torch.compile, autotuning, the allocator's growth) are not
timed; the figures are the median step's.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import numpy as np

from files import shard_filename
from model import GPT2_VOCAB_SIZE
from options import ConfigError, help_text, option, parse_known

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROG = "bench/train_step.py"
STEP = re.compile(r"^step +(\d+)/\d+ \| loss ([\d.]+) \|.* \| ([\d.]+) ms \| [\d,]+ tok/s \| MFU (\S+) \| ETA \S+$")


@dataclass
class BenchConfig:
    steps: int = option(10, "timed optimizer steps")
    warmup: int = option(3, "untimed steps first")
    nproc: int = option(1, "processes (torchrun --standalone --nproc_per_node) on this machine")


def random_shards(directory, tokens, period=64, seed=0):
    """One train shard (and no val shard: the bench runs without val) of random GPT-2 token ids that repeat every
    `period` tokens: a step costs the same whatever tokens it sees, and a stream the model can learn shows, in a
    falling loss, that its steps work."""
    ids = np.random.default_rng(seed).integers(0, GPT2_VOCAB_SIZE, period, dtype=np.uint16)
    np.save(os.path.join(directory, shard_filename(1)), np.resize(ids, tokens))


def command(bc, train_args, data_dir, log_dir):
    launcher = [sys.executable] if bc.nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                       f"--nproc_per_node={bc.nproc}"]
    off = ["--val_every=0", "--hellaswag_every=0", "--sample_every=0", "--checkpoint_every=0", "--keep_checkpoints=1",
           "--resume="]
    return [*launcher, os.path.join(ROOT, "train_gpt2.py"), f"--data_dir={data_dir}", f"--log_dir={log_dir}", *off,
            *train_args, f"--max_steps={bc.warmup + bc.steps}"]


def bench(bc, train_args):
    """Run train_gpt2.py for bc.warmup + bc.steps steps; returns the figures as a dict, or the run's exit code."""
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        random_shards(tmp, 1 << 22)  # 4M tokens: the stream wraps around, a larger shard would read no different
        proc = subprocess.Popen(command(bc, train_args, tmp, os.path.join(tmp, "log")), stdout=subprocess.PIPE,
                                text=True, cwd=ROOT)
        out, steps, done = [], [], ""
        for line in proc.stdout:
            out.append(line)
            if m := STEP.match(line.strip()):
                step, loss, ms, mfu = int(m[1]), float(m[2]), float(m[3]), m[4]
                steps.append((ms, mfu))
                print(f"step {step:3d} | loss {loss:.4f} | {ms:.1f} ms{' (warm-up)' if step < bc.warmup else ''}",
                      flush=True)
            elif line.startswith(("micro-batch", "note:", "warning:")):
                print(line, end="", flush=True)
            elif line.startswith("done:"):
                done = line
        if proc.wait():
            return proc.returncode
    resolved = json.loads("".join(out[out.index("{\n"):out.index("}\n") + 1]))  # the config train_gpt2.py prints
    cfg = resolved["train_config"]
    ms, mfu = sorted(steps[bc.warmup:])[(len(steps) - bc.warmup) // 2]  # the median step
    return {
        "device": resolved["device_name"],
        "torch": resolved["torch"],
        "params": resolved["num_params"],
        "batch": f"{cfg['batch_size']}x{cfg['block_size']}x{resolved['grad_accum_steps']}",
        "processes": resolved["world_size"],
        "compile": resolved["compile"],
        "ms_per_step": ms,
        "tokens_per_sec": cfg["total_batch_size"] / (ms / 1000),
        "mfu": mfu,
        "peak_mem_gib": float(re.search(r"peak memory ([\d.]+) GiB", done)[1]),
    }


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(help_text(BenchConfig, PROG, __doc__) + "\n\n  and every train_gpt2.py option (python train_gpt2.py "
              "--help)")
        return 0
    try:
        bc, _, train_args = parse_known(BenchConfig, argv)
        if bc.steps < 1 or bc.warmup < 0 or bc.nproc < 1:
            raise ConfigError(f"need --steps >= 1, --warmup >= 0 and --nproc >= 1, got {bc.steps}, {bc.warmup} and "
                              f"{bc.nproc}")
    except ConfigError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    r = bench(bc, train_args)
    if isinstance(r, int):
        return r  # train_gpt2.py said why, on stderr
    print(f"bench: device={r['device']} torch={r['torch']} params={r['params']:,} batch={r['batch']} "
          f"processes={r['processes']} compile={r['compile']} ms/step={r['ms_per_step']:.1f} "
          f"tokens/s={r['tokens_per_sec']:,.0f} mfu={r['mfu']} peak_mem={r['peak_mem_gib']:.2f}GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
