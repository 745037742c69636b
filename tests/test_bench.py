"""bench/train_step.py on CPU: it runs train_gpt2.py on a tiny model and prints its figures; bad options are one
line."""

import re
import subprocess
import sys

from conftest import ROOT

TINY = ["--device=cpu", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=2",
        "--total_batch_size=128", "--compile=false"]


def run_bench(*args):
    return subprocess.run([sys.executable, "-m", "bench.train_step", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_bench_prints_speed_figures():
    p = run_bench(*TINY, "--steps=3", "--warmup=1")
    assert p.returncode == 0, p.stderr
    steps = re.findall(r"^step +(\d+) \| loss ([\d.]+) \| ([\d.]+) ms", p.stdout, re.M)
    assert [int(s) for s, _, _ in steps] == [0, 1, 2, 3]
    last = p.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"bench: device=cpu torch=\S+ params=([\d,]+) batch=2x32x2 processes=1 compile=False "
                     r"ms/step=([\d.]+) tokens/s=([\d,]+) mfu=n/a peak_mem=([\d.]+)GiB", last)
    assert m, last
    params, ms, tps, mem = m.groups()
    assert int(params.replace(",", "")) > 50304 * 32  # the padded embedding alone
    assert float(ms) > 0 and float(mem) > 0
    # tokens/s is the step's tokens over the median step time
    assert abs(int(tps.replace(",", "")) - 128 / (float(ms) / 1000)) <= 0.01 * int(tps.replace(",", "")) + 1


def test_bench_picks_the_micro_batch_itself():
    """Without --batch_size (auto), the largest micro-batch that fits: here the whole batch, 4 sequences."""
    p = run_bench(*[a for a in TINY if not a.startswith("--batch_size=")], "--steps=1", "--warmup=0")
    assert p.returncode == 0, p.stderr
    assert re.search(r"^micro-batch 4 \(auto: needs ~[\d.]+ GB, [\d.]+ GB [^()]+\) x 1 accumulation steps$", p.stdout,
                     re.M), p.stdout
    assert " batch=4x32x1 " in p.stdout


def test_bench_bad_options():
    p = run_bench(*TINY, "--steps=0")
    assert p.returncode == 2 and p.stderr.strip().startswith("bench/train_step.py: error: need --steps >= 1"), p.stderr
    p = run_bench(*TINY, "--total_batch_size=100")
    assert p.returncode == 2 and "not a multiple" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    p = run_bench("--bogus=1")
    assert p.returncode == 2 and "unknown option --bogus" in p.stderr, p.stderr


def test_bench_runs_the_fast_recipe():
    """--recipe=fast's step (Muon + AdamW, the modern block): the training command with its recipe."""
    p = run_bench(*TINY, "--recipe=fast", "--steps=2", "--warmup=1")
    assert p.returncode == 0, p.stderr
    losses = [float(v) for v in re.findall(r"^step +\d+ \| loss ([\d.]+)", p.stdout, re.M)]
    assert len(losses) == 3 and losses[0] > losses[-1]  # Muon moves it at once: the head starts at zero, loss ln(V)
    params = int(re.search(r"params=([\d,]+)", p.stdout).group(1).replace(",", ""))
    assert params > 2 * 50304 * 32  # untied: the embedding and the head


def test_mfu_is_per_gpu():
    """train_gpt2's MFU, which the bench reports: the tokens/s of all ranks over the peak of all their GPUs, so W
    ranks at W times one GPU's speed have one GPU's MFU."""
    import train_gpt2

    one = train_gpt2.format_mfu(1e9, 100e3, 165e12, 1)
    assert one == "60.6%" and train_gpt2.format_mfu(1e9, 8 * 100e3, 165e12, 8) == one
    assert train_gpt2.format_mfu(1e9, 100e3, None, 2) == "n/a"


def test_bench_under_two_gloo_ranks():
    """--nproc=2 (torchrun, gloo on CPU): one line per step and one summary, rank 0's, and a clean exit (the process
    group destroyed: no warning about it)."""
    p = run_bench(*TINY, "--nproc=2", "--steps=2", "--warmup=1")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert [line.split("|")[0].strip() for line in lines if line.startswith("step")] == ["step   0", "step   1",
                                                                                          "step   2"]
    assert len([line for line in lines if line.startswith("bench:")]) == 1 and "processes=2 " in p.stdout
    assert "destroy_process_group" not in p.stderr
