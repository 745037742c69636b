"""--batch_size=auto: the largest micro-batch that fits, gradient accumulation making up total_batch_size. The memory
budget is set by the tests (guards.available_memory patched); the GPU trial's search runs on an injected fits."""

import dataclasses
import gc
import json
import os
import re
import subprocess
import sys
import types
import weakref

import pytest
import torch

import guards
import train_gpt2
from conftest import ROOT
from model import GPT, GPTConfig
from options import ConfigError
from runtime import Dist
from test_train import SUBPROCESS_ENV, VOCAB, load, read_log, tiny_args, write_shards
from train_gpt2 import main

T = 32
TINY = GPTConfig(block_size=T, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32)  # tiny_args' model
ONE_PROCESS = Dist(ddp=False, rank=0, local_rank=0, world_size=1)


def need(b, config=TINY, block_size=T):
    """The estimate for micro-batches of b sequences of config's model."""
    with torch.device("meta"):
        n_params = GPT(config).num_params()
    return guards.train_memory_bytes(config, n_params, b, block_size)


def set_budget(monkeypatch, nbytes):
    monkeypatch.setattr(guards, "available_memory", lambda device: (nbytes, "available per the test"))
    return nbytes


def args(data_dir, log_dir, **overrides):
    """tiny_args with --batch_size=auto and a batch of 32 sequences: candidates 32, 16, 8, 4, 2, 1."""
    overrides = {"batch_size": "auto", "total_batch_size": 32 * T, "val_tokens": 32 * T, "max_steps": 4, **overrides}
    return tiny_args(data_dir, str(log_dir), **overrides)


def saved_config(log_dir):
    with open(os.path.join(log_dir, "config.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"), val_size=32 * T + 1)


# -----------------------------------------------------------------------------
# the choice in a run

def test_auto_picks_the_largest_micro_batch_that_fits(data_dir, tmp_path, monkeypatch, capsys):
    budget = set_budget(monkeypatch, (need(8) + need(16)) // 2)
    assert main(args(data_dir, tmp_path / "auto")) == 0
    out = capsys.readouterr().out.splitlines()
    assert (f"micro-batch 8 (auto: 16 would need ~{need(16) / 1e9:.1f} GB, {budget / 1e9:.1f} GB available per the "
            "test) x 4 accumulation steps") in out
    saved = saved_config(tmp_path / "auto")
    assert saved["train_config"]["batch_size"] == 8 and saved["grad_accum_steps"] == 4
    assert saved["train_config"]["total_batch_size"] == 32 * T
    # the run is the one --batch_size=8 gives: the config in force holds the int, the loader and evals use it
    assert main(args(data_dir, tmp_path / "explicit", batch_size=8)) == 0
    assert read_log(tmp_path / "auto") == read_log(tmp_path / "explicit")
    # and, up to float rounding, the one a single micro-batch of the whole batch gives: the math is the batch's
    assert main(args(data_dir, tmp_path / "whole", batch_size=32)) == 0
    auto, whole = read_log(tmp_path / "auto").split(), read_log(tmp_path / "whole").split()
    assert auto[::3] == whole[::3] and auto[1::3] == whole[1::3]  # the same steps and kinds
    assert all(abs(float(a) - float(w)) < 1e-4 for a, w in zip(auto[2::3], whole[2::3]))


def test_largest_candidate_when_everything_fits(data_dir, tmp_path, monkeypatch, capsys):
    budget = set_budget(monkeypatch, 10**12)
    assert main(args(data_dir, tmp_path / "log", max_steps=1, val_every=0)) == 0
    assert (f"micro-batch 32 (auto: needs ~{need(32) / 1e9:.1f} GB, {budget / 1e9:.1f} GB available per the test) x 1 "
            "accumulation steps") in capsys.readouterr().out.splitlines()


def test_not_even_one_sequence_is_one_line_before_the_model_is_built(tmp_path, monkeypatch, capsys):
    set_budget(monkeypatch, 10**9)
    built = []
    monkeypatch.setattr(train_gpt2, "GPT", lambda *a: built.append(a))
    # GPT-2 small, the defaults; shards that exist, as the data is checked before the micro-batch (val and HellaSwag
    # off: neither the default's 10M val tokens nor a download are needed to size the model)
    data = write_shards(tmp_path / "data")
    assert main([f"--data_dir={data}", f"--log_dir={tmp_path / 'log'}", "--val_every=0", "--hellaswag_every=0"]) == 2
    gpt2 = GPTConfig(block_size=1024, vocab_size=50304)
    assert capsys.readouterr().err == (
        f"train_gpt2.py: error: --batch_size=auto: even one sequence of 1024 tokens would need "
        f"~{need(1, gpt2, 1024) / 1e9:.1f} GB, 1.0 GB available per the test; train a smaller model or shorter "
        "sequences (--block_size)\n")
    assert not built  # refused from the shapes alone: no weight was allocated


def test_explicit_batch_size_is_obeyed(data_dir, tmp_path, monkeypatch, capsys):
    def no_estimate(device):
        raise AssertionError("an explicit --batch_size needs no estimate")

    monkeypatch.setattr(guards, "available_memory", no_estimate)
    assert main(args(data_dir, tmp_path / "log", batch_size=2, max_steps=1)) == 0
    assert "micro-batch" not in capsys.readouterr().out
    saved = saved_config(tmp_path / "log")
    assert saved["train_config"]["batch_size"] == 2 and saved["grad_accum_steps"] == 16


@pytest.mark.parametrize("size, shape", [("medium", (24, 16, 1024)), ("xl", (48, 25, 1600))])
def test_auto_sizes_gpt2s_bigger_models_from_their_shapes(size, shape, monkeypatch):
    """GPT-2 medium and xl (--size) on cpu: the micro-batch from the estimate of their shapes, on the meta device."""
    cfg = train_gpt2.parse_config([f"--size={size}", "--device=cpu"])
    config = guards.model_config(cfg)
    assert (config.n_layer, config.n_head, config.n_embd) == shape
    devices = []
    monkeypatch.setattr(guards, "GPT", lambda config: devices.append(torch.get_default_device()) or GPT(config))
    budget = set_budget(monkeypatch, (need(4, config, 1024) + need(8, config, 1024)) // 2)
    lines = []
    resolved = guards.fit_micro_batch(cfg, ONE_PROCESS, torch.device("cpu"), None, log=lines.append)
    steps = cfg.total_batch_size // (4 * 1024)  # 128 (medium's 0.5M tokens), 256 (xl's 1M)
    assert resolved.batch_size == 4 and steps == (256 if size == "xl" else 128)
    assert lines == [f"micro-batch 4 (auto: 8 would need ~{need(8, config, 1024) / 1e9:.1f} GB, {budget / 1e9:.1f} GB "
                     f"available per the test) x {steps} accumulation steps"]
    assert devices == [torch.device("meta")]  # the shapes alone: no weight was allocated
    set_budget(monkeypatch, need(1, config, 1024) - 1)
    with pytest.raises(ConfigError, match="even one sequence of 1024 tokens would need"):
        guards.fit_micro_batch(cfg, ONE_PROCESS, torch.device("cpu"), None, log=lines.append)


@pytest.mark.parametrize("argv, message", [
    (["--batch_size=x"], "--batch_size=x: expected 'auto' or int"),
    (["--batch_size=-4"], "--batch_size must be 'auto' or > 0, got -4"),
    (["--total_batch_size=1000"], "total_batch_size 1000 is not a multiple of batch_size * block_size * processes = "
                                  "1 * 1024 * 1 = 1024 (--batch_size=auto: not even for batch_size 1)"),
    (["--val_tokens=1000"], "val_tokens 1000 is not a multiple of batch_size * block_size = 1024 "
                            "(--batch_size=auto: not even for batch_size 1)"),
])
def test_batch_size_errors(argv, message, tmp_path, capsys):
    assert main(argv + [f"--log_dir={tmp_path}"]) == 2
    assert capsys.readouterr().err == f"train_gpt2.py: error: {message}\n"


def test_candidates_keep_the_batch_whole():
    cfg = train_gpt2.parse_config([])
    assert guards.batch_size_candidates(cfg, 1) == [64, 32, 16, 8, 4, 2, 1]  # at most the recipe's 64
    assert guards.batch_size_candidates(cfg, 8) == [64, 32, 16, 8, 4, 2, 1]  # 64 x 1024 x 8 processes
    assert guards.batch_size_candidates(cfg, 16) == [32, 16, 8, 4, 2, 1]
    cfg = train_gpt2.parse_config(["--total_batch_size=49152", "--val_every=0"])  # 48 sequences
    assert guards.batch_size_candidates(cfg, 1) == [48, 24, 16, 12, 8, 6, 4, 3, 2, 1]
    cfg = train_gpt2.parse_config(["--total_batch_size=49152", "--val_tokens=16384"])  # and 16 for val
    assert guards.batch_size_candidates(cfg, 1) == [16, 8, 4, 2, 1]


# -----------------------------------------------------------------------------
# resume

def test_resume_keeps_its_micro_batch_while_it_fits(data_dir, tmp_path, monkeypatch, capsys):
    log_dir = tmp_path / "log"
    set_budget(monkeypatch, (need(8) + need(16)) // 2)
    assert main(args(data_dir, log_dir, max_steps=2, checkpoint_every=2)) == 0
    assert "micro-batch 8 (auto: 16 would need" in capsys.readouterr().out
    # more memory now: 32 would fit, but another split would change the losses in the last bits
    set_budget(monkeypatch, 10**12)
    assert main(args(data_dir, log_dir, max_steps=4, checkpoint_every=2)) == 0
    out = capsys.readouterr().out
    assert ("micro-batch 8 (auto: the checkpoint's, which still fits: the resume stays exact) x 4 accumulation steps"
            in out.splitlines())
    assert "batch_size:" not in out  # not among the changed options
    assert load(log_dir / "model_00004.pt")["train_config"]["batch_size"] == 8
    assert main(args(data_dir, tmp_path / "straight", max_steps=4, checkpoint_every=2, batch_size=8)) == 0
    assert read_log(log_dir) == read_log(tmp_path / "straight")
    capsys.readouterr()
    # less memory now: the checkpoint's 8 no longer fits, and the run says what that costs
    set_budget(monkeypatch, need(4) + 1000)
    assert main(args(data_dir, log_dir, max_steps=6, checkpoint_every=2)) == 0
    out = capsys.readouterr().out
    assert re.search(r"^micro-batch 4 \(auto: the checkpoint's 8 no longer fits: the losses will differ from an "
                     r"unbroken run's in the last bits; 8 would need ~[\d.]+ GB, [\d.]+ GB available per the test, "
                     r"the checkpoint's [\d.]+ GB \(freed once loaded\) included\) x 8 accumulation steps$", out, re.M)
    assert "batch_size: 8 -> 4" in out
    assert load(log_dir / "model_00006.pt")["train_config"]["batch_size"] == 4


def test_resume_whose_micro_batch_no_longer_splits_the_batch(monkeypatch):
    cfg = train_gpt2.parse_config(["--n_layer=2", "--n_head=2", "--n_embd=32", f"--vocab_size={VOCAB}",
                                   f"--block_size={T}", f"--total_batch_size={32 * T}", "--val_every=0",
                                   "--sample_every=0", "--hellaswag_every=0"])
    monkeypatch.setattr(guards, "available_memory", lambda device: (10**12, "plenty"))
    start = {"config": dataclasses.asdict(TINY), "train_config": {"batch_size": 3}}  # a checkpoint's, no tensors
    lines = []
    cfg = guards.fit_micro_batch(cfg, ONE_PROCESS, torch.device("cpu"), None, start, log=lines.append)
    assert cfg.batch_size == 32
    assert lines == [f"micro-batch 32 (auto: the checkpoint's 3 no longer splits the batch: the losses will differ "
                     f"from an unbroken run's in the last bits; needs ~{need(32) / 1e9:.1f} GB, 1000.0 GB plenty) x 1 "
                     "accumulation steps"]


# -----------------------------------------------------------------------------
# the GPU's way: a search over trial steps

def test_search_tries_largest_first_and_stops_at_the_first_fit():
    tried = []

    def fits(b):
        tried.append(b)
        return b <= 12

    candidates = [64, 32, 16, 8, 4, 2, 1]
    assert guards.largest_fitting(candidates, fits) == (8, [64, 32, 16]) and tried == [64, 32, 16, 8]
    tried.clear()
    assert guards.largest_fitting(candidates, fits, first=4) == (4, []) and tried == [4]  # a resume: its own first
    tried.clear()
    assert guards.largest_fitting(candidates, fits, first=16) == (8, [16]) and tried == [16, 8]  # then the smaller
    assert guards.largest_fitting(candidates, lambda b: False) == (None, candidates)


def test_gpu_choice_by_trial(monkeypatch):
    """fit_micro_batch on "cuda" with fits_on_gpu injected: the largest candidate whose trial fits, 5% of the GPU
    reserved (the trial is a whole step: it allocates the optimizer's moments itself), and a resumed run's own
    micro-batch first."""
    trials = []

    def fake_trial(config, b, block_size, reserve, autocast_dtype, device):
        trials.append((b, block_size, reserve))
        return b <= 16

    monkeypatch.setattr(guards, "fits_on_gpu", fake_trial)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(total_memory=8e9))
    cfg = train_gpt2.parse_config(["--val_every=0"])
    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size=50304))
    lines = []
    cuda = torch.device("cuda")
    resolved = guards.fit_micro_batch(cfg, ONE_PROCESS, cuda, torch.bfloat16, None, lines.append)
    assert resolved.batch_size == 16 and lines == ["micro-batch 16 (auto: 32 ran out of GPU memory in a trial step) "
                                                   "x 32 accumulation steps"]
    assert [b for b, _, _ in trials] == [64, 32, 16]
    assert {(t, r) for _, t, r in trials} == {(1024, 8e9 // 20)}
    trials.clear()
    start = {"config": dataclasses.asdict(model.config), "train_config": {"batch_size": 8}}  # a resume
    resolved = guards.fit_micro_batch(cfg, ONE_PROCESS, cuda, torch.bfloat16, start, lines.append)
    assert resolved.batch_size == 8 and [b for b, _, _ in trials] == [8]
    assert lines[-1] == ("micro-batch 8 (auto: the checkpoint's, which still fits: the resume stays exact) x 64 "
                         "accumulation steps")
    monkeypatch.setattr(guards, "fits_on_gpu", lambda *a: False)
    with pytest.raises(ConfigError, match=r"^--batch_size=auto: even one sequence of 1024 tokens runs out of "
                                          r"GPU memory in a trial step \(with [\d.]+ GB reserved as headroom\)"):
        guards.fit_micro_batch(cfg, ONE_PROCESS, cuda, torch.bfloat16, None, lines.append)


def test_trial_step_frees_what_a_failed_attempt_held(monkeypatch):
    """fits_on_gpu catches the out-of-memory error, and the model it built for the trial, its gradients and graph
    are gone either way (on the CPU here, the error raised by the model once its backward has made gradients)."""
    forward, built = GPT.forward, []

    def forward_running_out_above_2(self, idx, targets=None):
        built.append(weakref.ref(self))
        logits, loss = forward(self, idx, targets)
        if idx.size(0) > 2:
            loss.backward()
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return logits, loss

    monkeypatch.setattr(GPT, "forward", forward_running_out_above_2)
    cpu = torch.device("cpu")
    assert guards.fits_on_gpu(TINY, 4, T, 1024, None, cpu) is False
    assert guards.fits_on_gpu(TINY, 2, T, 1024, None, cpu) is True
    gc.collect()
    # 4 failed in its first micro-step; 2 ran both micro-steps of its trial on one model
    assert len(built) == 3 and len({id(ref()) for ref in built}) == 1 and all(ref() is None for ref in built)


def test_trial_is_a_whole_step(monkeypatch):
    """fits_on_gpu runs what a step is: two micro-steps, the second's forward with the first's gradients held and no
    logits of the first alive, then an AdamW step that allocates the two moments of every parameter."""
    forward, seen = GPT.forward, []

    def recording_forward(self, idx, targets=None):
        seen.append(all(p.grad is not None for p in self.parameters()))
        logits, loss = forward(self, idx, targets)
        assert logits is None  # the trial asks for the loss only
        return logits, loss

    step = torch.optim.AdamW.step

    def recording_step(self, *a, **kw):
        out = step(self, *a, **kw)
        seen.append(sum(s["exp_avg"].numel() + s["exp_avg_sq"].numel() for s in self.state.values()))
        return out

    monkeypatch.setattr(GPT, "forward", recording_forward)
    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    assert guards.fits_on_gpu(TINY, 2, T, 1024, None, torch.device("cpu")) is True
    with torch.device("meta"):
        n_params = GPT(TINY).num_params()
    assert seen == [False, True, 2 * n_params]


@pytest.mark.parametrize("error, fits", [
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), False),
    (RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"), False),
    (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), False),
    (getattr(torch, "AcceleratorError", RuntimeError)("CUDA error: out of memory"), False),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x32 and 64x32)"), None),
    (ValueError("out of memory, but not from the GPU"), None),
])
def test_trial_counts_every_out_of_memory_error(monkeypatch, error, fits):
    """Near a full card, cuBLAS handles, lazily loaded kernels and workspaces fail as RuntimeError or
    torch.AcceleratorError, not OutOfMemoryError: those say "does not fit" too. Any other error propagates."""
    def failing_forward(self, idx, targets=None):
        raise error

    monkeypatch.setattr(GPT, "forward", failing_forward)
    cpu = torch.device("cpu")
    if fits is None:
        with pytest.raises(type(error)):
            guards.fits_on_gpu(TINY, 2, T, 1024, None, cpu)
    else:
        assert guards.fits_on_gpu(TINY, 2, T, 1024, None, cpu) is fits


# -----------------------------------------------------------------------------
# the bench, and the figures behind the choice

def test_bench_follows_the_runs_choice():
    """bench/train_step.py measures the micro-batch a training run with the same options picks, and says so."""
    options = ["--device=cpu", "--n_layer=2", "--n_head=2", "--n_embd=32", f"--block_size={T}",
               f"--total_batch_size={32 * T}", "--compile=false"]
    p = subprocess.run([sys.executable, "-m", "bench.train_step", *options, "--steps=1", "--warmup=0"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env=SUBPROCESS_ENV)
    assert p.returncode == 0, p.stderr
    chosen = re.search(r"^micro-batch (\d+) \(auto: .*\) x (\d+) accumulation steps$", p.stdout, re.M)
    assert chosen and f" batch={chosen[1]}x{T}x{chosen[2]} " in p.stdout, p.stdout


def test_available_memory_and_the_cgroup_limit(tmp_path, monkeypatch):
    available, where = guards.available_memory("cpu")
    if os.path.exists("/proc/meminfo"):
        total = int(open("/proc/meminfo").read().split("MemTotal:")[1].split()[0]) * 1024
        assert 0 < available <= total and where in ("available per /proc/meminfo", "left under the cgroup's memory "
                                                                                  "limit")
    # the cgroup files: v2 (a limit), v1 (a limit on the container's own cgroup at the root), none ("max")
    (tmp_path / "v2" / "job").mkdir(parents=True)
    (tmp_path / "v2" / "job" / "memory.max").write_text("8000000000\n")
    (tmp_path / "v2" / "job" / "memory.current").write_text("3000000000\n")
    (tmp_path / "v2" / "job" / "memory.stat").write_text("anon 2000000000\ninactive_file 500000000\n")
    (tmp_path / "v2.cgroup").write_text("0::/job\n")
    assert guards.cgroup_memory_left(str(tmp_path / "v2.cgroup"), str(tmp_path / "v2")) == 5_500_000_000
    (tmp_path / "v1" / "memory").mkdir(parents=True)
    (tmp_path / "v1" / "memory" / "memory.limit_in_bytes").write_text("4000000000\n")
    (tmp_path / "v1" / "memory" / "memory.usage_in_bytes").write_text("1000000000\n")
    (tmp_path / "v1" / "memory" / "memory.stat").write_text("cache 1\ntotal_inactive_file 0\n")
    (tmp_path / "v1.cgroup").write_text("5:cpu:/x\n4:memory:/docker/abc\n0::/\n")
    assert guards.cgroup_memory_left(str(tmp_path / "v1.cgroup"), str(tmp_path / "v1")) == 3_000_000_000
    (tmp_path / "v2" / "job" / "memory.max").write_text("max\n")
    assert guards.cgroup_memory_left(str(tmp_path / "v2.cgroup"), str(tmp_path / "v2")) is None
    # the lower of MemAvailable and the cgroup's limit
    monkeypatch.setattr(guards, "cgroup_memory_left", lambda: 12345)
    assert guards.available_memory("cpu") == (12345, "left under the cgroup's memory limit")


def test_estimate_is_above_the_measured_peak():
    """The peak RSS of two training steps on CPU (what the run adds to the process) at one small shape with the full
    vocabulary: the estimate is above it, and not absurdly."""
    shape = dict(n_layer=2, n_embd=128, block_size=256, vocab_size=50304)
    options = [f"--{k}={v}" for k, v in shape.items()] + ["--n_head=2", "--batch_size=4", "--total_batch_size=2048",
                                                          "--device=cpu", "--compile=false"]
    code = (f"import resource, sys, torch\nsys.path.insert(0, {ROOT!r})\nimport optim, runtime, train_gpt2\n"
            "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * resource.getpagesize()\n"
            f"cfg = train_gpt2.parse_config({options!r})\nbase = rss()\n"
            "d = runtime.dist_from_env()\ns = train_gpt2.setup(cfg, d, train_gpt2.start_ranks(cfg, d))\n"
            "x = torch.randint(0, 50257, (s.grad_accum_steps, 4, 257))\n"
            "for _ in range(2):  # the first step allocates AdamW's moments, the second is a step as every other\n"
            "    optim.train_step(s.train_model, s.optimizer, [(b[:, :-1], b[:, 1:]) for b in x], lr=1e-4, "
            "grad_clip=1.0, device_type='cpu', autocast_dtype=None, ddp=False)\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base)\n")
    if not os.path.exists("/proc/self/statm"):
        pytest.skip("needs Linux's /proc")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=SUBPROCESS_ENV)
    assert p.returncode == 0, p.stderr
    measured = int(p.stdout.split()[-1])
    estimate = need(4, GPTConfig(n_head=2, **shape), 256)
    assert measured < estimate < 2 * measured, (measured, estimate)


STEP_PEAK = """import sys, torch
sys.path.insert(0, {root!r})
import optim
from model import GPT, GPTConfig
if {keep!r}:  # the old forward: the logits come back with the loss, and `_, loss = model(x, y)` holds them
    forward = GPT.forward
    GPT.forward = lambda self, idx, targets=None, **kw: forward(self, idx, targets, return_logits=True, **kw)
torch.manual_seed(0)
model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=256, vocab_size=50304))
opt = optim.adamw(model, lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, device_type="cpu")
x = torch.randint(0, 50257, (4, 4, 257))
step = lambda: optim.train_step(model, opt, [(b[:, :-1], b[:, 1:]) for b in x], lr=1e-4, grad_clip=1.0,
                                device_type="cpu", autocast_dtype=None, ddp=False)
step()  # the weights' gradients and AdamW's moments allocated
hwm = lambda: int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
rss = int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")  # the peak RSS (VmHWM) starts again from the current RSS
step()
print(hwm() - rss)
"""


def test_a_step_keeps_no_logits_of_a_previous_micro_step():
    """The peak RSS a step adds on CPU, where the logits dominate (4 x 256 x 50304 fp32, 197 MiB a micro-step): a
    forward that returned them with the loss kept micro-step k's through micro-step k+1's forward; now none is."""
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux's /proc/self/clear_refs")
    peaks = {}
    for keep in (True, False):
        p = subprocess.run([sys.executable, "-c", STEP_PEAK.format(root=ROOT, keep=keep)], capture_output=True,
                           text=True, timeout=300, env=SUBPROCESS_ENV)
        assert p.returncode == 0, p.stderr
        peaks[keep] = int(p.stdout.split()[-1])
    logits = 4 * 256 * 50304 * 4
    assert peaks[True] - peaks[False] > 0.7 * logits, peaks


def test_ranks_take_the_smallest_choice(data_dir, tmp_path):
    """torchrun, 2 processes on one machine: each has half the memory, and rank 1 less than rank 0 (8 fits there, 4
    on rank 1); both train with rank 1's micro-batch."""
    script = tmp_path / "run.py"
    budgets = [need(8) + need(16), need(4) + need(8)]  # twice the mean: LOCAL_WORLD_SIZE halves them
    script.write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "import guards, train_gpt2\n"
        f"budget = {budgets!r}[int(os.environ['RANK'])]\n"
        "guards.available_memory = lambda device: (budget, 'available per the test')\n"
        "sys.exit(train_gpt2.main(sys.argv[1:]))\n")
    log_dir = tmp_path / "log"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script), *args(data_dir, log_dir, max_steps=2, val_every=0)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=SUBPROCESS_ENV)
    assert p.returncode == 0, p.stderr[-3000:]
    assert re.search(r"^micro-batch 4 \(auto: 16 would need ~[\d.]+ GB, [\d.]+ GB available per the test, shared by "
                     r"2 processes; another rank can take only 4\) x 4 accumulation steps$", p.stdout, re.M), p.stdout
    assert saved_config(log_dir)["train_config"]["batch_size"] == 4


def test_trial_measures_the_plain_soft_capped_loss(monkeypatch):
    """A soft-capped model's trial runs the plain loss, the one torch.compile runs on the GPU and the larger of the
    two, not the eager chunked one (which holds far less): a micro-batch chosen by it fits the compiled step too."""
    import model

    def chunked(*args):
        raise AssertionError("the trial ran the chunked loss")

    monkeypatch.setattr(model, "softcap_cross_entropy", chunked)
    capped = dataclasses.replace(TINY, logit_softcap=15.0, tie_embeddings=False)
    assert guards.fits_on_gpu(capped, 2, T, 1024, None, torch.device("cpu")) is True
    with pytest.raises(AssertionError, match="chunked"):  # the same model outside the trial: the chunked loss
        GPT(capped)(torch.zeros((2, T), dtype=torch.long), torch.zeros((2, T), dtype=torch.long))
