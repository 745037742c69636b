"""README.md's own commands and links: the first run, copied from README (fewer steps), runs and learns; every
relative link of README.md and docs/ names a file that exists."""

import glob
import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT
from test_train import SUBPROCESS_ENV, losses, read_log


def readme():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


def first_run_commands():
    """The commands of README's first-run block (its bash block after '## The first run'), one argv each."""
    section = readme().split("## The first run", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    text = block.replace("\\\n", " ")
    return [shlex.split(part, comments=True) for line in text.splitlines() for part in line.split("&&")
            if part.strip()]


def with_option(argv, name, value):
    """argv with --name=value (or --name value) replaced by value."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg.startswith(f"--{name}="):
            out.append(f"--{name}={value}")
        elif arg == f"--{name}":
            out += [arg, str(value)]
            skip = True
        else:
            out.append(arg)
    return out


def test_readme_first_run_learns(tmp_path):
    """README's first run, as written but for the output directories and 30 steps instead of 300: the shards are
    made from the shipped text, the loss falls, samples print, and plot.py draws the log."""
    commands = first_run_commands()
    assert [c[:2] for c in commands] == [["pip", "install"], ["python", "fineweb.py"], ["python", "train_gpt2.py"],
                                         ["python", "plot.py"]]
    fineweb, train, plot = commands[1], commands[2], commands[3]
    readme_log_dir = next(a.split("=", 1)[1] for a in train if a.startswith("--log_dir="))
    assert plot[2:] == [f"{readme_log_dir}/log.txt"]  # plot.py draws the run just trained
    shards, log_dir = tmp_path / "shakespeare", tmp_path / "log"
    fineweb = with_option(fineweb, "output_dir", shards)
    train = with_option(with_option(with_option(train, "data_dir", shards), "log_dir", log_dir), "max_steps", 30)
    train = with_option(with_option(train, "val_every", 15), "sample_every", 30)
    for argv in (fineweb, train):
        p = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=600,
                           env=SUBPROCESS_ENV)
        assert p.returncode == 0, p.stderr[-2000:]
    assert "| sample 0: " in p.stdout
    val = losses(read_log(log_dir), "val")
    assert sorted(val) == [0, 15, 30] and val[30] < val[0] - 2, val
    pytest.importorskip("matplotlib")
    p = subprocess.run([sys.executable, plot[1], str(log_dir / "log.txt")], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=SUBPROCESS_ENV)
    assert p.returncode == 0 and os.path.exists(log_dir / "plot.png"), p.stderr


def test_every_relative_link_exists():
    pages = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "**", "*.md"),
                                                                 recursive=True))
    broken = []
    for page in pages:
        with open(page, encoding="utf-8") as f:
            text = f.read()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://|#|mailto:", target):
                continue
            path = os.path.join(os.path.dirname(page), target.split("#", 1)[0])
            if not os.path.exists(path):
                broken.append(f"{os.path.relpath(page, ROOT)}: {target}")
    assert not broken, broken
