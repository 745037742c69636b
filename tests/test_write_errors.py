"""A file that cannot be written (a full disk, simulated by a file-size limit, RLIMIT_FSIZE, as `ulimit -f` sets):
train_gpt2.py, chat_sft.py and fineweb.py stop with one line naming the file, the reason and the way on, leave no
half-written file, and the same command then continues as if nothing had happened.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_write_errors.py
"""

import errno
import os
import re
import resource
import signal
import subprocess
import sys

import numpy as np
import pytest

import checkpoints
import fineweb
from conftest import ROOT
from files import WriteError, atomic_write
from test_chat import SFT, base_ckpt, sft_args, sums_jsonl  # noqa: F401 (fixtures)
from test_fineweb import dir_bytes, make_docs, read_shards, expected_tokens, shard_files, write_jsonl
from test_train import SCRIPT, SUBPROCESS_ENV, assert_same_run, data_dir, read_log, tiny_args  # noqa: F401

RERUN = "; free space and run the same command again"


def limited_run(args, limit):
    """A script (argv) in a subprocess that may write no file beyond `limit` bytes. SIGXFSZ ignored, as Python
    itself does: the write past the limit fails with EFBIG ("File too large") instead of killing the process."""
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env=SUBPROCESS_ENV, preexec_fn=preexec)


def cli(args):
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=300,
                            env=SUBPROCESS_ENV)
    assert result.returncode == 0, result.stderr[-3000:]


def assert_one_line(result, script, path, step, newest):
    """Exit code 1 and one line on stderr: the file, the OS's reason, the step, the newest checkpoint, what to do."""
    intact = f"the newest checkpoint, intact: {newest}" if newest else "no checkpoint yet"
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr == (f"{script}: error: cannot write {path} (File too large) at step {step}; {intact}"
                             f"{RERUN}\n")


def assert_whole_files(log_dir):
    """No temporary file left, every log.txt line whole, every checkpoint loads."""
    names = os.listdir(log_dir)
    assert not [n for n in names if n.endswith(".tmp")], names
    assert read_log(log_dir).endswith("\n")
    for _, path in checkpoints.list_checkpoints(log_dir):
        checkpoints.load_checkpoint(path)


# -----------------------------------------------------------------------------
# the write itself

def test_atomic_write_names_the_file_and_the_reason(tmp_path):
    def enospc(f):
        f.write(b"x")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError, match="No space left"):  # raised by write() itself, not by the file: passed on
        atomic_write(str(tmp_path / "model_00010.pt"), enospc)
    assert os.listdir(tmp_path) == []
    with pytest.raises(WriteError) as e:  # a vanished directory
        atomic_write(str(tmp_path / "gone" / "config.json"), lambda f: f.write(b"{}"))
    assert str(e.value) == (f"cannot write {tmp_path}/gone/config.json (No such file or directory); make it writable "
                            "and run the same command again")


def test_torch_zip_writer_error_is_the_file_systems_reason(tmp_path):
    """torch.save's zip writer turns EFBIG into "RuntimeError: [enforce fail at inline_container.cc:672] . unexpected
    pos ...": WriteError says File too large."""
    path = str(tmp_path / "model_00020.pt")
    result = limited_run(["-c", "import torch, files\ntry:\n    files.atomic_write(%r, lambda f: torch.save("
                          "torch.zeros(100000), f))\nexcept files.WriteError as e:\n    print(e)" % path], 65536)
    assert result.stdout == f"cannot write {path} (File too large){RERUN}\n", result.stderr
    assert os.listdir(tmp_path) == []


def test_append_log_leaves_no_half_line(tmp_path):
    path = str(tmp_path / "log.txt")
    with open(path, "w") as f:
        f.write("0 train 5.000000\n")
    script = ("import checkpoints, files\ntry:\n    checkpoints.append_log(%r, 1, 'train', 4.0, '.6f')\n"
              "except files.WriteError as e:\n    print(e)" % path)
    result = limited_run(["-c", script], 25)  # the limit falls in the middle of the line
    assert result.stdout == f"cannot write {path} (File too large){RERUN}\n", result.stderr
    assert open(path).read() == "0 train 5.000000\n"


# -----------------------------------------------------------------------------
# train_gpt2.py

def test_checkpoint_too_large_stops_in_one_line_and_the_rerun_continues_exactly(data_dir, tmp_path):
    straight, broken = str(tmp_path / "straight"), str(tmp_path / "broken")
    cli([SCRIPT, *tiny_args(data_dir, straight)])
    args = [SCRIPT, *tiny_args(data_dir, broken)]
    result = limited_run(args, 64 * 1024)  # config.json and log.txt fit, a checkpoint (~400 KB) does not
    assert_one_line(result, "train_gpt2.py", checkpoints.checkpoint_path(broken, 20), 20, None)
    assert sorted(os.listdir(broken)) == ["config.json", "log.txt"]
    assert_whole_files(broken)
    cli(args)
    assert_same_run(straight, broken, 40)


def test_log_line_too_large_stops_in_one_line_and_the_rerun_continues_exactly(data_dir, tmp_path):
    """log.txt grows past the limit a few steps after a resume from model_00120.pt (config.json, ~1.8 KB, fits).
    The lr is constant, so a first run to step 120 is the first 120 steps of a run to 200."""
    straight, broken = str(tmp_path / "straight"), str(tmp_path / "broken")
    common = dict(min_lr=3e-3, warmup_steps=5, val_every=50, checkpoint_every=50)
    cli([SCRIPT, *tiny_args(data_dir, straight, max_steps=200, **common)])
    cli([SCRIPT, *tiny_args(data_dir, broken, max_steps=120, **common)])
    args = [SCRIPT, *tiny_args(data_dir, broken, max_steps=200, **common)]
    before = read_log(broken)
    result = limited_run(args, len(before) + 40)  # two lines more, and the third is cut by the limit
    newest = checkpoints.checkpoint_path(broken, 120)
    assert_one_line(result, "train_gpt2.py", os.path.join(broken, "log.txt"), 122, newest)
    assert_whole_files(broken)
    assert read_log(broken).startswith(before.split("120 val")[0]) and len(read_log(broken)) <= len(before) + 40
    assert [step for step, _ in checkpoints.list_checkpoints(broken)] == [50, 100, 120]
    cli(args)
    assert_same_run(straight, broken, 200)


def test_checkpoint_too_large_under_torchrun_stops_every_rank(data_dir, tmp_path):
    """Rank 0 alone writes: its failure reaches rank 1 in the next step's agreement, and both exit (none hangs)."""
    log_dir = str(tmp_path / "ddp")
    result = limited_run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SCRIPT,
                          *tiny_args(data_dir, log_dir)], 64 * 1024)
    line = (f"train_gpt2.py: error: cannot write {checkpoints.checkpoint_path(log_dir, 20)} (File too large) at step "
            f"20; no checkpoint yet{RERUN}")
    assert result.returncode == 1 and result.stderr.count(line) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr.split("torch/distributed/elastic")[0]  # torchrun's own report follows
    assert sorted(os.listdir(log_dir)) == ["config.json", "log.txt"]
    assert_whole_files(log_dir)


def test_unwritable_log_dir_files_stop_in_one_line(data_dir, tmp_path):
    """config.json over the limit: nothing trained, nothing half-written."""
    log_dir = str(tmp_path / "log")
    result = limited_run([SCRIPT, *tiny_args(data_dir, log_dir)], 1000)
    assert_one_line(result, "train_gpt2.py", os.path.join(log_dir, "config.json"), 0, None)
    assert not os.path.exists(log_dir)  # nothing left: no half config.json, no empty log_dir of a run never started


# -----------------------------------------------------------------------------
# chat_sft.py: the same checkpoint code

def test_sft_checkpoint_too_large_stops_in_one_line_and_the_rerun_continues_exactly(base_ckpt, sums_jsonl, tmp_path):
    straight, broken = str(tmp_path / "straight"), str(tmp_path / "broken")
    common = dict(max_steps=20, checkpoint_every=10, val_every=10)
    cli([SFT, *sft_args(base_ckpt, sums_jsonl, straight, **common)])
    args = [SFT, *sft_args(base_ckpt, sums_jsonl, broken, **common)]
    result = limited_run(args, 1 << 20)  # a checkpoint of the 50304-row model is ~20 MB
    assert_one_line(result, "chat_sft.py", checkpoints.checkpoint_path(broken, 10), 10, None)
    assert sorted(os.listdir(broken)) == ["config.json", "log.txt"]
    assert_whole_files(broken)
    cli(args)
    assert_same_run(straight, broken, 20)


# -----------------------------------------------------------------------------
# fineweb.py: its shards and manifest

@pytest.mark.parametrize("limit, what", [(2000, fineweb.shard_filename(0)), (2300, fineweb.MANIFEST)])
def test_fineweb_write_error_is_one_line_and_the_rerun_completes_the_shards(tmp_path, limit, what):
    """Shards of 1,000 tokens are 2,128 bytes: a limit of 2,000 stops the first shard, 2,300 the manifest once it
    lists some 20 shards (of 32)."""
    docs = make_docs(600, seed=5)
    data = write_jsonl(tmp_path / "data.jsonl", docs)
    reference, out = tmp_path / "reference", tmp_path / "out"
    argv = [os.path.join(ROOT, "fineweb.py"), "--input", data, "--shard_size", "1000", "--num_proc", "1"]
    cli([*argv, "--output_dir", str(reference)])
    assert len(shard_files(reference)) > 30
    result = limited_run([*argv, "--output_dir", str(out)], limit)
    path = os.path.join(out, what)
    lines = [line for line in re.split(r"[\r\n]", result.stderr) if line.strip()]  # the progress bar's, then ours
    assert result.returncode == 2 and result.stderr.endswith("\n"), result.stderr
    assert lines[-1] == f"fineweb.py: error: {path}: cannot write (File too large){RERUN}", result.stderr
    assert all(line.startswith("tokenizing: ") for line in lines[:-1]), result.stderr
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    assert len(shard_files(out)) > (10 if what == fineweb.MANIFEST else -1)  # the manifest stopped a run under way
    for name in shard_files(out):  # every file under a shard's name is a whole shard
        assert np.load(out / name).shape == (1000,) or name == shard_files(reference)[-1]
    cli([*argv, "--output_dir", str(out)])
    assert dir_bytes(out) == dir_bytes(reference)
    assert np.array_equal(read_shards(out, 1000), expected_tokens(docs))
