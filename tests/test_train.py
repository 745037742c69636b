"""train_gpt2.py and plot.py on CPU with tiny models and shards generated here: the LR schedule, the loader's token
order, a run's logs and checkpoints, bitwise resume after kill -9, DDP (gloo, 2 processes) == one process, errors."""

import dataclasses
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from torch.testing import assert_close

import checkpoints
import hellaswag
import runtime
import train_gpt2
from conftest import ROOT
from model import GPT, GPTConfig
from train_gpt2 import TokenStream, TrainLoader, main

SCRIPT = os.path.join(ROOT, "train_gpt2.py")
VOCAB = 256  # small vocabulary: fast steps (runs with sampling / HellaSwag use GPT-2's)
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
PERIOD = 199  # the generated text repeats a permutation of PERIOD distinct tokens: each token predicts the next


def parse_args(argv):
    return train_gpt2.parse_config(argv)


# tiny_args' max_lr/min_lr/warmup_steps are the GPT-2 recipe's at tiny size: the fast recipe keeps its own
FAST_LRS = {"gpt2": {}, "fast": dict(max_lr=0.02, min_lr=0.0, warmup_steps=0)}


def write_shards(data_dir, train_sizes=(3000, 2100), val_size=2000, vocab=VOCAB, seed=0):
    """Learnable shards: every token is followed by the same token each time (a repeated random permutation)."""
    os.makedirs(data_dir, exist_ok=True)
    perm = np.random.default_rng(seed).permutation(vocab)[:PERIOD].astype(np.uint16)
    stream = np.tile(perm, (sum(train_sizes) + val_size) // PERIOD + 1)
    np.save(os.path.join(data_dir, "edufineweb_val_000000.npy"), stream[:val_size])
    pos = val_size
    for i, n in enumerate(train_sizes, start=1):
        np.save(os.path.join(data_dir, f"edufineweb_train_{i:06d}.npy"), stream[pos:pos + n])
        pos += n
    return str(data_dir)


def tiny_args(data_dir, log_dir, **overrides):
    args = dict(data_dir=data_dir, log_dir=log_dir, n_layer=2, n_head=2, n_embd=32, vocab_size=VOCAB, block_size=32,
                batch_size=4, total_batch_size=256, max_lr=3e-3, min_lr=3e-4, warmup_steps=5, max_steps=40,
                val_every=20, val_tokens=512, hellaswag_every=0, sample_every=0, checkpoint_every=20, compile=False,
                resume="auto")
    args.update(overrides)
    return [f"--{k}={v}" for k, v in args.items()]


def read_log(log_dir):
    with open(os.path.join(log_dir, "log.txt")) as f:
        return f.read()


def losses(log_text, kind="train"):
    return {int(s): float(v) for s, k, v in (line.split() for line in log_text.splitlines()) if k == kind}


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_run(a_dir, b_dir, step):
    """Two runs logged the same lines and ended with bitwise-equal weights, optimizer state and data position."""
    assert read_log(a_dir) == read_log(b_dir)
    a, b = load(checkpoints.checkpoint_path(a_dir, step)), load(checkpoints.checkpoint_path(b_dir, step))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for i, state in a["optimizer"]["state"].items():
        for k, v in state.items():
            assert torch.equal(v, b["optimizer"]["state"][i][k]), (i, k)
    assert a["loader"] == b["loader"]


def run_cli(args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env=SUBPROCESS_ENV)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"))


# -----------------------------------------------------------------------------
# configuration and the LR schedule

def test_parse_args_types_and_defaults():
    cfg = parse_args(["--compile=false", "--max_lr=1e-3", "--n_layer=3", "--wandb_run_name=a=b", "--resume="])
    assert (cfg.compile, cfg.max_lr, cfg.n_layer, cfg.wandb_run_name, cfg.resume) == (False, 1e-3, 3, "a=b", "")
    assert parse_args(["--compile=1"]).compile is True and parse_args(["--compile=FALSE"]).compile is False
    default = parse_args([])
    assert (default.vocab_size, default.total_batch_size, default.batch_size, default.block_size) == (50304, 524288,
                                                                                                      "auto", 1024)
    assert (default.max_lr, default.min_lr, default.warmup_steps, default.max_steps) == (6e-4, 6e-5, 715, 19073)
    assert train_gpt2.check_config(default, world_size=1) is None  # auto: setup picks the micro-batch
    recipe = parse_args(["--batch_size=64"])  # the recipe's micro-batch: the accumulation makes up the rest
    assert recipe.batch_size == 64 and parse_args(["--batch_size=AUTO"]).batch_size == "auto"
    assert train_gpt2.check_config(recipe, world_size=1) == 8 and train_gpt2.check_config(recipe, world_size=8) == 1


@pytest.mark.parametrize("args, message", [
    (["--n_layers=2"], "unknown option --n_layers"),
    (["--compile=maybe"], "--compile=maybe: expected true/false/1/0"),
    (["--n_layer=2.5"], "--n_layer=2.5: expected int"),
    (["--max_lr=fast"], "--max_lr=fast: expected float"),
    (["max_steps=10"], "expected --name=value"),
    (["--total_batch_size=1000"], "total_batch_size 1000 is not a multiple of batch_size * block_size * processes"),
    (["--val_tokens=1000"], "val_tokens 1000 is not a multiple of batch_size * block_size"),
    (["--n_embd=100"], "n_embd (100) must be divisible by n_head (12)"),
    (["--min_lr=1", "--max_lr=0.1"], "min_lr <= max_lr"),
    (["--device=tpu"], "--device must be auto, cuda, mps or cpu"),
    (["--vocab_size=1000"], "sampling and HellaSwag need the GPT-2 vocabulary"),
    (["--max_steps=0"], "--max_steps must be > 0"),
])
def test_config_errors(args, message, capsys, tmp_path):
    assert main(args + [f"--log_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("train_gpt2.py: error: ") and message in err and err.count("\n") == 1, err


def test_wandb_missing_is_one_clear_error(capsys, tmp_path):
    try:
        import wandb  # noqa: F401
        pytest.skip("wandb is installed")
    except ImportError:
        pass
    assert main(["--wandb_log=true", f"--log_dir={tmp_path}"]) == 2
    assert "--wandb_log=true needs wandb: pip install wandb" in capsys.readouterr().err


def test_help_describes_every_option(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "torchrun --standalone" in out and "\n  optimizer: AdamW" in out
    assert "--keep_checkpoints=3 (int)  the newest N checkpoints are kept" in out
    assert all(f"--{f.name}=" in out for f in train_gpt2.dataclasses.fields(train_gpt2.TrainConfig))


# -----------------------------------------------------------------------------
# data

def test_stream_spans_shards_and_wraps(tmp_path):
    a, b = np.arange(0, 10, dtype=np.uint16), np.arange(10, 17, dtype=np.uint16)
    np.save(tmp_path / "edufineweb_train_000001.npy", a)
    np.save(tmp_path / "edufineweb_train_000002.npy", b)
    stream = TokenStream(str(tmp_path), "train")
    assert stream.total == 17
    assert stream.read(8, 4).tolist() == [8, 9, 10, 11]  # across the shard boundary, nothing skipped
    assert stream.read(15, 5).tolist() == [15, 16, 0, 1, 2]  # past the end: the next epoch starts seamlessly
    assert stream.read(17 * 3 + 2, 2).tolist() == [2, 3]


def test_loader_order_ranks_equal_accumulation(data_dir):
    """Rank r's micro-step m reads what one process's micro-step m*W + r reads, and positions resume exactly."""
    stream = TokenStream(data_dir, "train")
    B, T, W, A = 2, 8, 2, 3
    cpu = torch.device("cpu")
    single = TrainLoader(stream, B, T, 0, 1, VOCAB, cpu)
    ranks = [TrainLoader(stream, B, T, r, W, VOCAB, cpu) for r in range(W)]
    for _ in range(5):  # steps
        expected = [single.next_batch() for _ in range(W * A)]
        for m in range(A):
            for r in range(W):
                x, y = ranks[r].next_batch()
                assert torch.equal(x, expected[m * W + r][0]) and torch.equal(y, expected[m * W + r][1])
        assert ranks[0].state_dict() == ranks[1].state_dict() == single.state_dict()
    x, y = single.next_batch()
    assert torch.equal(x.view(-1)[1:], y.view(-1)[:-1])  # targets are the inputs shifted by one
    # the position restores exactly, also on another number of ranks
    fresh = TrainLoader(stream, B, T, 1, W, VOCAB, cpu)
    fresh.load_state_dict(ranks[1].state_dict())
    assert torch.equal(fresh.next_batch()[0], ranks[1].next_batch()[0])


def bad_shard_dir(tmp_path, problem):
    d = tmp_path / "data"
    write_shards(d)
    train = d / "edufineweb_train_000001.npy"
    if problem == "missing":
        return str(tmp_path / "nope"), "no such directory"
    if problem == "no files":
        for f in d.iterdir():
            f.unlink()
        return str(d), "no edufineweb_train_*.npy files"
    if problem == "not npy":
        train.write_text("hello")
        return str(d), "not a .npy token shard"
    if problem == "dtype":
        np.save(train, np.arange(100, dtype=np.int32))
        return str(d), "expected a 1-D uint16 array of GPT-2 tokens, got int32"
    if problem == "2-D":
        np.save(train, np.zeros((10, 10), dtype=np.uint16))
        return str(d), "got uint16 array of shape (10, 10)"
    if problem == "empty":
        np.save(train, np.zeros(0, dtype=np.uint16))
        return str(d), "empty shard"
    if problem == "too few":
        (d / "edufineweb_train_000002.npy").unlink()
        np.save(train, np.zeros(100, dtype=np.uint16))
        return str(d), "fewer than one micro-batch needs"
    if problem == "val too small":
        np.save(d / "edufineweb_val_000000.npy", np.zeros(100, dtype=np.uint16))
        return str(d), "val_tokens=512 needs 513"
    if problem == "token id":
        np.save(train, np.full(3000, VOCAB, dtype=np.uint16))
        return str(d), f"token id {VOCAB} >= vocab_size {VOCAB}"
    raise AssertionError(problem)


@pytest.mark.parametrize("problem", ["missing", "no files", "not npy", "dtype", "2-D", "empty", "too few",
                                     "val too small", "token id"])
def test_bad_shards_are_one_clear_error(tmp_path, capsys, problem):
    data, message = bad_shard_dir(tmp_path, problem)
    assert main(tiny_args(data, str(tmp_path / "log"), max_steps=2)) == 2
    err = capsys.readouterr().err
    assert err.startswith("train_gpt2.py: error: ") and message in err and err.count("\n") == 1, err
    if problem not in ("token id", "val too small", "too few"):
        assert "python fineweb.py" in err


def test_cli_error_exit_code_and_one_line(tmp_path):
    result = run_cli([f"--data_dir={tmp_path / 'none'}", f"--log_dir={tmp_path / 'log'}", "--compile=false"])
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("train_gpt2.py: error: data_dir "), result.stderr


def test_a_data_dir_typo_is_one_line_before_anything_is_built(tmp_path):
    """--data_dir=cpu_shard (for cpu_shards), the default 124M model: it was sized and two unrelated lines printed
    (micro-batch, decayed tensors) 7.2 s in, and an empty log_dir was left; now the data is checked first: nothing
    printed but the error, and nothing created."""
    typo, log_dir = tmp_path / "cpu_shard", tmp_path / "runs" / "log"
    result = run_cli([f"--data_dir={typo}", f"--log_dir={log_dir}"])
    assert result.returncode == 2 and result.stdout == "", result.stdout
    assert result.stderr == (f"train_gpt2.py: error: data_dir {typo}: no such directory (expected "
                             "edufineweb_train_*.npy token shards; make them with `python fineweb.py`)\n")
    assert not (tmp_path / "runs").exists()


def test_no_network_hellaswag_names_the_training_option_and_leaves_no_log_dir(data_dir, tmp_path, capsys,
                                                                             monkeypatch):
    """Offline, the HellaSwag download fails: the message named hellaswag.py's --data FILE and corrected itself in
    parentheses, after the model was built, and left an empty log_dir; now train_gpt2.py's own option only, before
    anything is built. A log_dir that existed before the run stays."""
    def no_network(*args, **kwargs):
        raise urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setattr(hellaswag, "CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "existing").mkdir()
    for log_dir in (tmp_path / "log", tmp_path / "existing"):
        assert main(tiny_args(data_dir, str(log_dir), vocab_size=50304, hellaswag_every=10, hellaswag_data="")) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err == (
            f"train_gpt2.py: error: could not download {hellaswag.VAL_URL}: [Errno -2] Name or service not known; "
            "pass --hellaswag_data=FILE with a local copy of hellaswag_val.jsonl (or --hellaswag_every=0 to skip "
            "HellaSwag)\n")
    assert sorted(os.listdir(tmp_path)) == ["cache", "existing"]


# -----------------------------------------------------------------------------
# the training step and a whole run

def test_step_lines_show_the_total_and_the_time_left(data_dir, tmp_path, capsys):
    """`step   177 | loss ...` gave no total and no time left: now `step   177/400 | ... | ETA 3m12s`, from the
    mean step time so far; log.txt keeps build-nanogpt's lines."""
    log_dir = str(tmp_path / "log")
    assert main(tiny_args(data_dir, log_dir, max_steps=3, val_every=0, checkpoint_every=0)) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "| loss " in line]
    assert [line.split(" | ")[0] for line in lines] == ["step     0/3", "step     1/3", "step     2/3"]
    assert all(re.search(r" \| MFU n/a \| ETA \d+s$", line) for line in lines) and lines[-1].endswith(" | ETA 0s")
    assert [line.split()[:2] for line in read_log(log_dir).splitlines()] == [["0", "train"], ["1", "train"],
                                                                            ["2", "train"]]


def test_time_left_is_the_mean_step_time_so_far():
    # 223 steps left at the mean of the steps after the first (its compile and warm-up left out): 223 s
    assert runtime.step_progress(176, 400, [9.0, 1.0, 1.0]) == ("  176/400", "ETA 3m43s")
    assert runtime.step_progress(0, 10, [2.0]) == ("    0/10", "ETA 18s")
    assert [runtime.format_duration(s) for s in (0, 42.4, 192, 3600 * 5 + 7 * 60 + 20)] == ["0s", "42s", "3m12s",
                                                                                          "5h07m"]


def test_tiny_run_learns_logs_and_checkpoints(data_dir, tmp_path, capsys):
    log_dir = str(tmp_path / "log")
    assert main(tiny_args(data_dir, log_dir, keep_checkpoints=2, checkpoint_every=10)) == 0
    out = capsys.readouterr().out
    text = read_log(log_dir)
    train, val = losses(text), losses(text, "val")
    assert sorted(train) == list(range(40)) and sorted(val) == [0, 20, 40]
    assert val[40] < val[0] - 1.5 and np.mean([train[s] for s in range(35, 40)]) < train[0] - 1.5
    assert "tok/s | MFU n/a" in out and "val loss" in out
    assert sorted(os.listdir(log_dir)) == ["config.json", "log.txt", "model_00030.pt", "model_00040.pt"]
    saved = json.load(open(os.path.join(log_dir, "config.json")))
    assert saved["grad_accum_steps"] == 2 and saved["train_config"]["n_embd"] == 32
    ckpt = load(os.path.join(log_dir, "model_00040.pt"))
    assert ckpt["step"] == 40 and ckpt["loader"]["position"] == 40 * 256
    assert ckpt["config"] == {**dataclasses.asdict(GPTConfig()), "block_size": 32, "vocab_size": VOCAB, "n_layer": 2,
                              "n_head": 2, "n_embd": 32, "norm": "layernorm", "mlp": "gelu"}  # GPT-2's architecture
    assert ckpt["train_config"]["max_steps"] == 40
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    # hellaswag.py's --model rebuilds it from "model" and "config"
    model, _ = checkpoints.load_model(os.path.join(log_dir, "model_00040.pt"))
    assert torch.equal(model.lm_head.weight, ckpt["model"]["lm_head.weight"])
    # running again with resume=auto: already done
    assert main(tiny_args(data_dir, log_dir)) == 0
    assert "nothing to do" in capsys.readouterr().out and read_log(log_dir) == text


def test_run_with_hellaswag_and_samples(tmp_path, capsys, enc):
    data = write_shards(tmp_path / "data", vocab=50257)
    examples = tmp_path / "hellaswag.jsonl"
    rows = [{"ctx": "The cat sat on the", "endings": ["mat.", "moon.", "idea.", "of."], "label": i % 4}
            for i in range(6)]
    examples.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = tiny_args(data, str(tmp_path / "log"), vocab_size=50304, max_steps=2, val_every=2, hellaswag_every=2,
                     hellaswag_data=examples, sample_every=2, num_samples=2, sample_length=5, checkpoint_every=0)
    assert main(args) == 0
    out = capsys.readouterr().out
    hella = losses(read_log(tmp_path / "log"), "hella")
    assert sorted(hella) == [0, 2] and all(v in [round(k / 6, 4) for k in range(7)] for v in hella.values())
    samples = [line for line in out.splitlines() if "| sample " in line]
    assert len(samples) == 4 and all("Hello, I'm a language model," in s for s in samples)
    assert "HellaSwag acc_norm" in out and "GPT-3 124M: 0.337" in out
    assert os.listdir(tmp_path / "log").count("model_00002.pt") == 1  # the final checkpoint, though periodic is off


def test_init_from_pretrained_val_loss_matches_transformers(tmp_path, capsys, tiny_hf_dir):
    """init_from loads the transformers model: its step-0 val loss is transformers' loss on the same tokens."""
    from transformers import GPT2LMHeadModel

    data = write_shards(tmp_path / "data", vocab=50257)
    args = tiny_args(data, str(tmp_path / "log"), init_from=tiny_hf_dir, max_steps=1, val_every=1, val_tokens=512)
    assert main(args) == 0
    assert "the model's own architecture replaces" in capsys.readouterr().out
    val = np.load(os.path.join(data, "edufineweb_val_000000.npy"))[:513].astype(np.int64)
    hf = GPT2LMHeadModel.from_pretrained(tiny_hf_dir).eval()
    chunks = [torch.from_numpy(val[i * 128:(i + 1) * 128 + 1]) for i in range(4)]
    with torch.no_grad():
        expected = np.mean([hf(c[:-1].view(4, 32), labels=None).logits.log_softmax(-1).view(128, -1)
                            .gather(1, c[1:].view(128, 1)).mean().neg().item() for c in chunks])
    assert losses(read_log(tmp_path / "log"), "val")[0] == pytest.approx(expected, abs=1e-4)
    ckpt = load(tmp_path / "log" / "model_00001.pt")
    assert ckpt["config"]["vocab_size"] == 50257 and ckpt["train_config"]["vocab_size"] == 50257


def test_nonfinite_loss_stops_with_step(data_dir, tmp_path, capsys):
    log_dir = tmp_path / "log"
    args = tiny_args(data_dir, str(log_dir), max_lr=1e30, min_lr=1e30, warmup_steps=0, checkpoint_every=1,
                     val_every=0)
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "step 1: non-finite loss" in err and "model_00001.pt" in err
    assert sorted(os.listdir(log_dir)) == ["config.json", "log.txt", "model_00001.pt"]  # no checkpoint after it


def test_resume_guards(data_dir, tmp_path, capsys):
    log_dir = str(tmp_path / "log")
    assert main(tiny_args(data_dir, log_dir, max_steps=4, checkpoint_every=2, val_every=0)) == 0
    capsys.readouterr()
    # a fresh run must not overwrite a run's checkpoints
    assert main(tiny_args(data_dir, log_dir, resume="")) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    # resuming an older checkpoint while newer ones exist would mix two histories
    assert main(tiny_args(data_dir, log_dir, resume=os.path.join(log_dir, "model_00002.pt"), max_steps=8)) == 2
    assert "newer than step 2" in capsys.readouterr().err
    # another architecture than the checkpoint's
    assert main(tiny_args(data_dir, log_dir, n_embd=64, max_steps=8)) == 2
    assert "n_embd=64 (checkpoint: 32)" in capsys.readouterr().err
    # not a checkpoint
    junk = tmp_path / "junk.pt"
    junk.write_text("junk")
    assert main(tiny_args(data_dir, str(tmp_path / "other"), resume=junk)) == 2
    assert "cannot load the checkpoint" in capsys.readouterr().err
    # changed optimizer options apply to the resumed run (load_state_dict would restore the checkpoint's)
    assert main(tiny_args(data_dir, log_dir, max_steps=5, val_every=0, weight_decay=0.05, beta2=0.99)) == 0
    assert "weight_decay: 0.1 -> 0.05" in capsys.readouterr().out
    groups = load(os.path.join(log_dir, "model_00005.pt"))["optimizer"]["param_groups"]
    assert [(g["weight_decay"], tuple(g["betas"])) for g in groups] == [(0.05, (0.9, 0.99)), (0.0, (0.9, 0.99))]


def test_earlier_fast_block_checkpoint_loads_and_resumes(data_dir, tmp_path, capsys):
    """A --recipe=fast checkpoint from before the block became nanochat's (its config without norm_eps and
    embed_norm): load_model builds its block, today's --recipe=fast refuses to resume it in one line naming the
    options that do, and those options resume it."""
    log_dir = str(tmp_path / "log")
    earlier = dict(norm="rmsnorm", norm_eps=1e-5, embed_norm=False)
    common = dict(recipe="fast", max_steps=2, checkpoint_every=2, val_every=0, **FAST_LRS["fast"])
    assert main(tiny_args(data_dir, log_dir, **common, **earlier)) == 0
    path = checkpoints.checkpoint_path(log_dir, 2)
    ckpt = load(path)
    for config in (ckpt["config"], ckpt["train_config"]):  # as the code before norm_eps and embed_norm wrote them
        del config["norm_eps"], config["embed_norm"]
    torch.save(ckpt, path)
    model, _ = checkpoints.load_model(path)
    assert isinstance(model.transformer.ln_f, torch.nn.RMSNorm) and "ln_emb" not in model.transformer
    assert (model.config.norm_eps, model.transformer.ln_f.eps, model.transformer.h[0].ln_1.eps) == (1e-5,) * 3
    assert all(torch.equal(v, ckpt["model"][k]) for k, v in model.state_dict().items())
    capsys.readouterr()
    assert main(tiny_args(data_dir, log_dir, **dict(common, max_steps=4))) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err == (
        f"train_gpt2.py: error: {path}: trained with the earlier --recipe=fast block (RMSNorm with gains, eps 1e-5, no "
        "embedding norm), not today's nanochat block: resume it with --recipe=fast --norm=rmsnorm --norm_eps=1e-05 "
        "--embed_norm=false --muon_momentum_warmup=0\n")
    assert main(tiny_args(data_dir, log_dir, **dict(common, max_steps=4), **earlier, muon_momentum_warmup=0)) == 0
    assert sorted(losses(read_log(log_dir))) == [0, 1, 2, 3]


@pytest.mark.parametrize("recipe", ["gpt2", "fast"])
def test_resume_after_kill_9_is_bitwise_identical(data_dir, tmp_path, recipe):
    """A run killed with SIGKILL mid-way and resumed with --resume=auto logs exactly what an unbroken run logs and
    ends with bitwise-identical weights and optimizer state (fast: Muon's and AdamW's)."""
    steps = 150
    common = dict(max_steps=steps, checkpoint_every=10, val_every=25, keep_checkpoints=2, recipe=recipe,
                  **FAST_LRS[recipe])
    straight, broken = str(tmp_path / "straight"), str(tmp_path / "broken")
    proc = subprocess.Popen([sys.executable, SCRIPT, *tiny_args(data_dir, broken, **common)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=SUBPROCESS_ENV)
    try:
        log_path = os.path.join(broken, "log.txt")
        deadline = time.time() + 100
        while time.time() < deadline:
            assert proc.poll() is None, f"the run ended before it was killed: {proc.stderr.read()}"
            ckpts = checkpoints.list_checkpoints(broken)
            lines = open(log_path).read().split("\n")[:-1] if ckpts else []  # complete lines only
            trained = [int(line.split()[0]) for line in lines if " train " in line]
            if trained and max(trained) >= ckpts[-1][0] + 3:  # a checkpoint, then a few more steps
                break
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not os.path.exists(os.path.join(broken, f"model_{steps:05d}.pt"))
    # the log had lines past the checkpoint: the resume drops and redoes them
    (tmp_path / "broken" / ".model_00999.pt.tmp").write_bytes(b"half-written")  # a kill during a save: ignored
    assert main(tiny_args(data_dir, broken, **common)) == 0
    assert not os.path.exists(tmp_path / "broken" / ".model_00999.pt.tmp")
    assert main(tiny_args(data_dir, straight, **common)) == 0
    assert_same_run(straight, broken, steps)
    assert len(losses(read_log(straight))) == steps


@pytest.mark.parametrize("recipe", ["gpt2", "fast"])
def test_ddp_two_processes_equal_one_process_accumulating(data_dir, tmp_path, recipe):
    """torchrun with 2 processes of micro-batch B == 1 process accumulating 2 micro-batches of B."""
    common = dict(max_steps=10, total_batch_size=256, batch_size=4, val_every=5, checkpoint_every=0, recipe=recipe,
                  **FAST_LRS[recipe])
    ddp_dir, single_dir = str(tmp_path / "ddp"), str(tmp_path / "single")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             SCRIPT, *tiny_args(data_dir, ddp_dir, **common)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300, env=SUBPROCESS_ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es) x 1 micro-steps" in result.stdout
    assert result.stdout.count("step     9/10 | loss") == 1  # rank 0 alone prints
    assert main(tiny_args(data_dir, single_dir, **common)) == 0
    ddp_log, single_log = read_log(ddp_dir), read_log(single_dir)
    for kind in ("train", "val"):
        a, b = losses(ddp_log, kind), losses(single_log, kind)
        assert sorted(a) == sorted(b)
        assert_close(torch.tensor([a[s] for s in sorted(a)]), torch.tensor([b[s] for s in sorted(b)]),
                     rtol=0, atol=2e-6 if kind == "train" else 2e-4)
    a, b = load(os.path.join(ddp_dir, "model_00010.pt")), load(os.path.join(single_dir, "model_00010.pt"))
    for k in a["model"]:
        assert_close(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-5)
    assert a["loader"] == b["loader"]


def test_ranks_resuming_different_steps_is_an_error(tmp_path):
    """Nodes that don't share log_dir would resume different checkpoints: every rank stops with exit code 2."""
    script = tmp_path / "check.py"
    script.write_text(
        "import os, sys, torch, torch.distributed as dist\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "import train_gpt2\n"
        "dist.init_process_group('gloo')\n"
        "rank, cpu = dist.get_rank(), torch.device('cpu')\n"
        "train_gpt2.check_same_step(7, cpu)  # the same step everywhere: fine\n"
        "try:\n"
        "    train_gpt2.check_same_step(10 * rank, cpu)\n"
        "except train_gpt2.ConfigError as e:\n"
        "    print(f'rank {rank}: {e}')\n"
        "dist.destroy_process_group()\n")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script)], cwd=ROOT, capture_output=True, text=True, timeout=120, env=SUBPROCESS_ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank}: the ranks found different checkpoints to resume (steps 0 to 10)" in result.stdout


@pytest.mark.parametrize("recipe", ["gpt2", "fast"])
def test_compile_on_cpu_matches_eager(tmp_path, capsys, recipe):
    data = write_shards(tmp_path / "data", vocab=50257)
    examples = tmp_path / "hellaswag.jsonl"
    examples.write_text(json.dumps({"ctx": "A cat", "endings": ["a", "b", "c", "d"], "label": 0}) + "\n")
    runs = {}
    for compiled in (False, True):
        log_dir = str(tmp_path / f"log_{compiled}")
        assert main(tiny_args(data, log_dir, vocab_size=50304, compile=compiled, max_steps=3, val_every=2,
                              hellaswag_every=2, hellaswag_data=examples, sample_every=2, sample_length=4,
                              recipe=recipe, **FAST_LRS[recipe])) == 0
        runs[compiled] = read_log(log_dir)
    for kind in ("train", "val", "hella"):
        eager, compiled = losses(runs[False], kind), losses(runs[True], kind)
        assert sorted(eager) == sorted(compiled) and eager
        assert all(math.isclose(eager[s], compiled[s], abs_tol=1e-4) for s in eager)
    out = capsys.readouterr().out
    assert '"compile": true' in out and out.count("| sample ") == 2 * 3 * 4  # 2 runs, steps 0, 2, 3, 4 each
    # hellaswag.py --model scores the checkpoint as the run's last eval did
    import hellaswag

    hellaswag.main(["--model", os.path.join(log_dir, "model_00003.pt"), "--data", str(examples), "--device", "cpu"])
    assert f"acc_norm={losses(runs[True], 'hella')[3]:.4f}" in capsys.readouterr().out


def test_step_0_evals_leave_the_training_graph_static(tmp_path, monkeypatch):
    """A fresh run sends val and HellaSwag batches (other shapes) through the model before its first step: under
    torch.compile (a backend recording each graph's inputs) the training graph still has static sizes, and the run
    compiles two graphs only, the train step's and the val loss's (same shape, no grad); HellaSwag runs eagerly."""
    data = write_shards(tmp_path / "data", vocab=50257)
    examples = tmp_path / "hellaswag.jsonl"
    rows = [{"ctx": "A cat " * (1 + 5 * i), "endings": ["a", "b c", "d e f", "g"], "label": 0} for i in range(3)]
    examples.write_text("".join(json.dumps(r) + "\n" for r in rows))
    graphs, compile_ = [], torch.compile

    def recording_backend(gm, example_inputs):
        graphs.append([tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)])
        return gm.forward

    monkeypatch.setattr(torch, "compile", lambda model, **kw: compile_(model, backend=recording_backend, **kw))
    torch._dynamo.reset()  # no graphs cached by earlier tests
    args = tiny_args(data, str(tmp_path / "log"), vocab_size=50304, compile=True, max_steps=3, val_every=2,
                     hellaswag_every=2, hellaswag_data=examples, checkpoint_every=0)
    assert main(args) == 0
    torch._dynamo.reset()
    assert len(graphs) == 2, graphs
    for shapes in graphs:  # symbolic sizes would be torch.SymInt, not int
        assert all(type(n) is int for shape in shapes for n in shape), shapes
        assert (4, 32) in shapes  # the micro-batch's idx: B=4, T=32 (HellaSwag's would be 12 rows)


# -----------------------------------------------------------------------------
# what a new user hit: two runs in one log_dir, Ctrl-C / SIGTERM, a truncated checkpoint, bad log_dirs

def start_run(args, **popen):
    return subprocess.Popen([sys.executable, SCRIPT, *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=SUBPROCESS_ENV, **popen)


def wait_for_steps(proc, log_dir, n, timeout=100):
    """Wait until the run has logged at least n train steps."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"the run ended early: {proc.stderr.read()}"
        path = os.path.join(log_dir, "log.txt")
        complete = open(path).read().split("\n")[:-1] if os.path.exists(path) else []
        if sum(" train " in line for line in complete) >= n:
            return
        time.sleep(0.01)
    raise AssertionError(f"no {n} steps in {timeout} s")


def test_second_run_into_the_same_log_dir_is_refused(data_dir, tmp_path):
    log_dir = str(tmp_path / "log")
    args = tiny_args(data_dir, log_dir, max_steps=100000, checkpoint_every=5, val_every=0)
    first = start_run(args)
    try:
        wait_for_steps(first, log_dir, 6)
        second = run_cli(args)
        assert second.returncode == 2
        assert second.stderr == (f"train_gpt2.py: error: log_dir {log_dir} is in use by another run (pid {first.pid} "
                                 f"on {__import__('socket').gethostname()}); wait for it to end, or pick another "
                                 "--log_dir\n")
    finally:
        first.kill()  # kill -9: the kernel drops the lock with the process, nothing stale is left behind
        first.wait()
    third = run_cli(tiny_args(data_dir, log_dir, max_steps=5, val_every=0))
    assert third.returncode == 0, third.stderr
    assert "nothing to do" in run_cli(tiny_args(data_dir, log_dir, max_steps=5, val_every=0)).stdout


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_a_checkpoint_and_the_rerun_continues_exactly(data_dir, tmp_path, signum):
    """SIGTERM / Ctrl-C: the step finishes, a checkpoint of it is saved, one line says so, and running the same command
    again gives the log and weights of a run never stopped."""
    steps = 60
    common = dict(max_steps=steps, checkpoint_every=1000, val_every=20)
    stopped, straight = str(tmp_path / "stopped"), str(tmp_path / "straight")
    proc = start_run(tiny_args(data_dir, stopped, **common))
    wait_for_steps(proc, stopped, 25)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum
    ckpts = checkpoints.list_checkpoints(stopped)
    assert len(ckpts) == 1 and 25 <= ckpts[0][0] < steps
    name = signal.Signals(signum).name
    assert err == (f"train_gpt2.py: stopped at step {ckpts[0][0]} ({name}); saved {ckpts[0][1]}; run the same "
                   "command to continue\n")
    assert max(losses(read_log(stopped))) == ckpts[0][0] - 1  # the step before the checkpoint is the last one logged
    assert main(tiny_args(data_dir, stopped, **common)) == 0
    assert main(tiny_args(data_dir, straight, **common)) == 0
    assert_same_run(straight, stopped, steps)


def test_signal_during_the_evals_skips_them_and_saves(data_dir, tmp_path):
    """SIGTERM while the step-0 val loss runs (slowed, 15 chunks of 1 s): the run stops within the val pass, skips
    the rest of it, saves the state of step 0 and exits; running the same command again gives the log and weights of a
    run never stopped (the skipped evals run then)."""
    stopped, straight, mark = str(tmp_path / "stopped"), str(tmp_path / "straight"), tmp_path / "in_eval"
    common = dict(max_steps=6, val_every=3, val_tokens=15 * 4 * 32, checkpoint_every=0)
    env = {**SUBPROCESS_ENV, "SLOW_EVAL_SECONDS": "1", "SLOW_EVAL_MARK": str(mark)}
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "slow_eval_run.py"),
                             *tiny_args(data_dir, stopped, **common)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 100
    while not mark.exists():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
        time.sleep(0.01)
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert time.time() - sent < 12  # the whole val pass would take 15 s
    assert proc.returncode == 128 + signal.SIGTERM
    path = checkpoints.checkpoint_path(stopped, 0)
    assert err == f"train_gpt2.py: stopped at step 0 (SIGTERM); saved {path}; run the same command to continue\n"
    assert read_log(stopped) == ""  # no val loss, no step
    assert main(tiny_args(data_dir, stopped, **common)) == 0
    assert main(tiny_args(data_dir, straight, **common)) == 0
    assert_same_run(straight, stopped, 6)


def test_a_second_ctrl_c_stops_at_once(data_dir, tmp_path):
    # a model big enough for a step to take a while: the second SIGINT arrives before the step the first waits for
    log_dir = str(tmp_path / "log")
    proc = start_run(tiny_args(data_dir, log_dir, n_embd=512, n_layer=4, block_size=256, batch_size=2,
                               total_batch_size=16384, max_steps=1000, val_every=0, checkpoint_every=0))
    wait_for_steps(proc, log_dir, 1)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)  # at once: torchrun forwarding the same Ctrl-C, not a second one
    time.sleep(1.2)  # a second Ctrl-C comes later
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert err.strip().splitlines() == ["train_gpt2.py: interrupted, nothing saved since the last checkpoint; run the "
                                        "same command to continue from it"]
    assert checkpoints.list_checkpoints(log_dir) == []


def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(data_dir, tmp_path):
    log_dir = str(tmp_path / "ddp")
    args = tiny_args(data_dir, log_dir, max_steps=100000, total_batch_size=256, batch_size=4, val_every=0,
                     checkpoint_every=0)
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             SCRIPT, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=SUBPROCESS_ENV)
    try:
        wait_for_steps(proc, log_dir, 5, timeout=200)
        workers = [int(p) for p in os.listdir("/proc") if p.isdigit() and
                   open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1] == str(proc.pid)]
        rank1 = [p for p in workers if b"RANK=1\0" in open(f"/proc/{p}/environ", "rb").read().replace(b"LOCAL_", b"")]
        assert len(rank1) == 1, workers
        os.kill(rank1[0], signal.SIGTERM)  # rank 1 only: rank 0 learns of it at the next step
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    ckpts = checkpoints.list_checkpoints(log_dir)
    assert len(ckpts) == 1, (ckpts, err[-2000:])
    step, path = ckpts[0]
    assert f"train_gpt2.py: stopped at step {step} (SIGTERM); saved {path}; run the same command to continue" in err
    assert max(losses(read_log(log_dir))) == step - 1
    assert load(path)["loader"]["position"] == step * 256  # every rank's data position agrees with the step


def test_unreadable_newest_checkpoint_falls_back_to_the_one_before(data_dir, tmp_path, capsys):
    log_dir = tmp_path / "log"
    assert main(tiny_args(data_dir, str(log_dir), max_steps=30, checkpoint_every=10, keep_checkpoints=0,
                          val_every=0)) == 0
    data = (log_dir / "model_00030.pt").read_bytes()
    (log_dir / "model_00030.pt").write_bytes(data[:len(data) // 2])  # a disk fault cut it
    capsys.readouterr()
    assert main(tiny_args(data_dir, str(log_dir), max_steps=40, checkpoint_every=10, keep_checkpoints=0,
                          val_every=0)) == 0
    out = capsys.readouterr().out
    assert f"warning: {log_dir / 'model_00030.pt'}: cannot load the checkpoint: " in out
    assert f"resuming from {log_dir / 'model_00020.pt'}, the newest checkpoint that loads" in out
    assert sorted(losses(read_log(str(log_dir)))) == list(range(40))
    assert load(log_dir / "model_00030.pt")["step"] == 30  # rewritten as the run passed it
    for name in os.listdir(log_dir):
        if name.startswith("model_"):
            (log_dir / name).write_bytes(b"")
    assert main(tiny_args(data_dir, str(log_dir), max_steps=50, val_every=0)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"log_dir {log_dir}: none of its 4 checkpoints loads" in err


@pytest.mark.parametrize("log_dir", ["/proc/x/log", "FILE/log"])
def test_unusable_log_dir_is_one_line_before_any_work(tmp_path, log_dir):
    (tmp_path / "FILE").write_text("a file, not a directory")
    log_dir = log_dir.replace("FILE", str(tmp_path / "FILE"))
    t0 = time.time()
    result = run_cli([f"--data_dir={tmp_path / 'no_data'}", f"--log_dir={log_dir}"])  # bad data too: log_dir first
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"train_gpt2.py: error: --log_dir {log_dir}: cannot create or write it (")
    assert time.time() - t0 < 30


def test_empty_sample_prompt_samples_from_endoftext(tmp_path, capsys):
    data = write_shards(tmp_path / "data", vocab=50257)
    args = tiny_args(data, str(tmp_path / "log"), vocab_size=50304, max_steps=1, val_every=0, sample_every=1,
                     sample_prompt="", num_samples=2, sample_length=4)
    assert main(args) == 0
    samples = [line for line in capsys.readouterr().out.splitlines() if "| sample " in line]
    assert len(samples) == 4 and all(s.split(": ", 1)[1].startswith("'<|endoftext|>") for s in samples)



# -----------------------------------------------------------------------------
# recipes: the GPT-2 default exactly as it was, --recipe=fast's resolved values

def plain_gpt2_run(data_dir, *, steps, val_every, B, T, total_batch_size, max_lr, min_lr, warmup_steps,
                   val_tokens, seed=1337, **model):
    """build-nanogpt's loop written out plainly, for the model (GPTConfig's GPT-2 defaults): its log lines and its
    final model and optimizer. The GPT-3 small recipe: AdamW (betas 0.9, 0.95, eps 1e-8) with weight decay 0.1 on
    the 2-D tensors only, linear warmup then cosine decay, the gradient norm clipped to 1, gradient accumulation over
    consecutive B*T chunks of the train shards (in file order), val on the first val_tokens of the val shard."""
    torch.manual_seed(seed)
    net = GPT(GPTConfig(block_size=T, **model))
    params = list(net.parameters())
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=max_lr, betas=(0.9, 0.95), eps=1e-8)
    shards = sorted(os.listdir(data_dir))
    train = np.concatenate([np.load(os.path.join(data_dir, f)) for f in shards if "_train_" in f]).astype(np.int64)
    val = np.load(os.path.join(data_dir, next(f for f in shards if "_val_" in f))).astype(np.int64)

    def batch(tokens, start):
        buf = torch.from_numpy(tokens[start:start + B * T + 1])
        return buf[:-1].view(B, T), buf[1:].view(B, T)

    def lr_at(step):
        if step < warmup_steps:
            return max_lr * (step + 1) / warmup_steps
        ratio = (step - warmup_steps) / (steps - warmup_steps)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (max_lr - min_lr)

    lines, accum = [], total_batch_size // (B * T)
    for step in range(steps + 1):
        if step % val_every == 0 or step == steps:
            net.eval()
            with torch.no_grad():
                total = torch.zeros(())
                for i in range(val_tokens // (B * T)):
                    total += net(*batch(val, i * B * T))[1]
            net.train()
            lines.append(f"{step} val {(total / (val_tokens // (B * T))).item():.4f}\n")
        if step == steps:
            break
        opt.zero_grad(set_to_none=True)
        loss_accum = torch.zeros(())
        for micro in range(accum):
            loss = net(*batch(train, (step * accum + micro) * B * T))[1] / accum
            loss_accum += loss.detach()
            loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.step()
        lines.append(f"{step} train {loss_accum.item():.6f}\n")
    return "".join(lines), net, opt


PINNED_RUN = dict(max_steps=12, val_every=6, checkpoint_every=0)
# The log that run wrote before the architecture switches, Muon and the recipes (on an x86-64 CPU with AVX-512).
PINNED_LOG = ("0 val 5.5591\n0 train 5.557476\n1 train 5.533760\n2 train 5.497015\n3 train 5.443151\n"
              "4 train 5.374258\n5 train 5.295311\n6 val 5.2118\n6 train 5.225090\n7 train 5.154487\n"
              "8 train 5.099895\n9 train 5.054716\n10 train 5.021695\n11 train 5.007159\n12 val 4.9791\n")


def test_gpt2_recipe_is_bit_for_bit_the_plain_gpt2_loop(data_dir, tmp_path):
    """The default recipe is GPT-2's exactly: a run of train_gpt2.py equals, bit for bit on this machine, the plain
    build-nanogpt loop above (the same log, final weights and AdamW state). Both run on the same CPU, so the
    kernels the CPU's instruction set picks are the same for both: a property of the code on any machine."""
    log_dir = tmp_path / "log"
    assert main(tiny_args(data_dir, str(log_dir), **PINNED_RUN)) == 0
    cfg = parse_args(tiny_args(data_dir, str(log_dir), **PINNED_RUN))
    log, net, opt = plain_gpt2_run(data_dir, steps=cfg.max_steps, val_every=cfg.val_every, B=cfg.batch_size,
                                   T=cfg.block_size, total_batch_size=cfg.total_batch_size, max_lr=cfg.max_lr,
                                   min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps, val_tokens=cfg.val_tokens,
                                   vocab_size=cfg.vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                                   n_embd=cfg.n_embd)
    assert read_log(log_dir) == log
    saved = load(checkpoints.checkpoint_path(str(log_dir), cfg.max_steps))
    for k, v in net.state_dict().items():
        assert torch.equal(saved["model"][k], v), k
    for i, state in opt.state_dict()["state"].items():
        for k, v in state.items():
            assert torch.equal(saved["optimizer"]["state"][i][k], v), (i, k)


def test_gpt2_recipe_log_is_what_it_was(data_dir, tmp_path):
    """The same run against the log it wrote before (PINNED_LOG), which pins what the plain loop shares with
    train_gpt2.py (the model and its init). Not bit for bit: float32 results of the same ops differ in their last
    bits between CPUs (ATen, oneDNN and MKL pick kernels by instruction set: with ATEN_CPU_CAPABILITY=avx2 or
    =default some values move by 1e-6 here), so each value may differ by one unit of its last printed digit (a
    rounding that tips over) plus 1e-5 of drift. A change of the math moves them by more: here a learning rate 1%
    higher moved step 11's loss by 4e-3, a weight decay of 0.11 by 6e-5 (what only the plain loop catches bitwise,
    such as AdamW's eps, it catches there)."""
    assert main(tiny_args(data_dir, str(tmp_path / "log"), **PINNED_RUN)) == 0
    got, pinned = read_log(tmp_path / "log").splitlines(), PINNED_LOG.splitlines()
    assert [line.split()[:2] for line in got] == [line.split()[:2] for line in pinned]
    for line, expected in zip(got, pinned):
        digits = len(expected.split()[2].split(".")[1])
        assert abs(float(line.split()[2]) - float(expected.split()[2])) <= 10.0 ** -digits + 1e-5, (line, expected)


def test_recipes_resolve_their_defaults(tmp_path):
    assert parse_args([]) == train_gpt2.TrainConfig() == parse_args(["--recipe=gpt2"])
    fast = parse_args(["--recipe=fast"])
    assert (fast.norm, fast.norm_eps, fast.embed_norm, fast.mlp, fast.pos_emb, fast.qk_norm, fast.tie_embeddings,
            fast.bias, fast.logit_softcap, fast.zero_init) == ("rmsnorm_nogain", 1e-6, True, "relu2", "rope", True,
                                                               False, False, 15.0, True)
    assert (fast.optimizer, fast.max_lr, fast.min_lr, fast.schedule, fast.warmdown_frac, fast.warmup_steps,
            fast.weight_decay) == ("muon", 0.02, 0.0, "warmdown", 0.4, 0, 0.0)
    assert (fast.embedding_lr, fast.head_lr, fast.scalar_lr) == (0.2, 0.004, 0.04)
    assert (fast.muon_momentum_warmup, parse_args([]).muon_momentum_warmup) == (300, 0)
    # an option given explicitly wins; the AdamW lrs follow the width (nanochat's 1/sqrt(d_model) rule)
    narrow = parse_args(["--recipe=fast", "--n_embd=192", "--n_head=3", "--max_lr=0.01", "--head_lr=0.001"])
    assert (narrow.max_lr, narrow.head_lr, narrow.embedding_lr, narrow.scalar_lr) == (0.01, 0.001, 0.4, 0.08)
    assert (narrow.n_embd, narrow.pos_emb) == (192, "rope")
    with pytest.raises(train_gpt2.ConfigError, match="--recipe must be gpt2 or fast"):
        parse_args(["--recipe=slow"])


# GPT-2's sizes: (n_layer, n_head, n_embd), and the GPT-2 recipe's (max_lr, total_batch_size) from GPT-3's Table 2.1
SIZES = {"small": ((12, 12, 768), (6e-4, 524288)), "medium": ((24, 16, 1024), (3e-4, 524288)),
         "large": ((36, 20, 1280), (2.5e-4, 524288)), "xl": ((48, 25, 1600), (2e-4, 1048576))}


@pytest.mark.parametrize("size", SIZES)
def test_sizes_resolve_gpt2s_shapes_and_gpt3s_lr_and_batch(size):
    shape, (lr, batch) = SIZES[size]
    gpt2 = parse_args([f"--size={size}"])
    assert (gpt2.n_layer, gpt2.n_head, gpt2.n_embd) == shape
    assert (gpt2.max_lr, gpt2.total_batch_size) == (lr, batch) and gpt2.min_lr == pytest.approx(lr / 10)
    # GPT-3's warmup over 375M tokens and one epoch of 10B tokens, in steps of this batch
    assert (gpt2.warmup_steps, gpt2.max_steps) == (int(375e6 / batch), int(10e9 / batch))
    # the fast recipe: the same shape, its own optimizer, its AdamW lrs scaled to this width
    fast = parse_args([f"--size={size}", "--recipe=fast"])
    assert (fast.n_layer, fast.n_head, fast.n_embd) == shape
    assert (fast.max_lr, fast.min_lr, fast.warmup_steps, fast.optimizer) == (0.02, 0.0, 0, "muon")
    assert fast.head_lr == pytest.approx(0.004 * (768 / shape[2]) ** 0.5)
    assert (fast.total_batch_size, fast.max_steps) == (524288, 19073)  # TrainConfig's


def test_size_small_is_the_defaults_and_options_given_win():
    assert parse_args(["--size=small"]) == train_gpt2.TrainConfig()
    assert parse_args(["--size=small", "--recipe=fast"]) == parse_args(["--recipe=fast"])
    xl = parse_args(["--size=xl", "--n_layer=6", "--max_lr=1e-3", "--total_batch_size=65536", "--max_steps=10"])
    assert (xl.n_layer, xl.n_head, xl.n_embd, xl.max_lr, xl.total_batch_size, xl.max_steps) == (
        6, 25, 1600, 1e-3, 65536, 10)
    assert (xl.min_lr, xl.warmup_steps) == (pytest.approx(2e-5), 357)  # the size's, from its own 1M batch
    narrow = parse_args(["--size=medium", "--recipe=fast", "--n_embd=256", "--n_head=4"])
    assert (narrow.n_layer, narrow.n_embd, narrow.head_lr) == (24, 256, pytest.approx(0.004 * 3 ** 0.5))


def test_size_errors_and_help(capsys, tmp_path):
    assert main(["--size=huge", f"--log_dir={tmp_path}"]) == 2
    assert capsys.readouterr().err == "train_gpt2.py: error: --size=huge: expected small, medium, large or xl\n"
    assert main(["--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--size='small' (str)" in out and "xl 48/25/1600" in out and "xl 0.0002 1M tokens" in out


@pytest.mark.parametrize("args, message", [
    (["--recipe=fast", "--mlp=geglu"], "mlp must be 'gelu', 'swiglu' or 'relu2'"),
    (["--pos_emb=alibi"], "pos_emb must be 'learned' or 'rope'"),
    (["--optimizer=sgd"], "need --optimizer adamw or muon"),
    (["--warmdown_frac=1.5"], "--warmdown_frac must be in [0, 1]"),
    (["--logit_softcap=-1"], "--logit_softcap must be >= 0"),
    (["--recipe=fast", "--muon_momentum_warmup=-1"], "--muon_momentum_warmup must be >= 0"),
])
def test_recipe_option_errors(args, message, capsys, tmp_path):
    assert main(args + [f"--log_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("train_gpt2.py: error: ") and message in err and err.count("\n") == 1, err


def test_fast_run_learns_and_its_config_holds_the_resolved_values(data_dir, tmp_path):
    log_dir = str(tmp_path / "log")
    assert main(tiny_args(data_dir, log_dir, recipe="fast", **FAST_LRS["fast"])) == 0
    val = losses(read_log(log_dir), "val")
    assert val[40] < val[0] - 1.5
    saved = json.load(open(os.path.join(log_dir, "config.json")))
    assert saved["train_config"]["optimizer"] == "muon" and saved["model_config"]["pos_emb"] == "rope"
    assert saved["train_config"]["embedding_lr"] == pytest.approx(0.2 * (32 / 768) ** -0.5)
    # a resume keeps its optimizer: the state in the checkpoint is Muon's and AdamW's
    assert main(tiny_args(data_dir, log_dir, recipe="fast", optimizer="adamw", max_steps=50)) == 2
