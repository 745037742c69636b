"""The repository itself: what README's own commands create is ignored by git, so it never shows in git status."""

import re
import shutil
import subprocess

import pytest

from conftest import ROOT

# the options through which README's commands name a directory they create
CREATES = re.compile(r"--(?:log_dir|output_dir|out|export_dir)[= ]([A-Za-z0-9_-]+)(?=[\s`)]|$)")


def readme_outputs():
    """The directories README's code blocks create (--log_dir=NAME, --output_dir NAME, --out=..., --export_dir=...)."""
    with open(f"{ROOT}/README.md", encoding="utf-8") as f:
        blocks = re.findall(r"```.*?\n(.*?)```", f.read(), re.S)
    return sorted({name for block in blocks for name in CREATES.findall(block)})


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_readme_outputs_are_ignored():
    names = readme_outputs() + ["cpu_shards", "cpu_log", "vim_shards", "log_gpt2", "log_fast", "log_sft", "log"]
    assert len(names) > 7  # README's commands were found
    paths = [f"{name}/x" for name in names]
    result = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=ROOT, capture_output=True, text=True)
    assert sorted(result.stdout.split()) == sorted(paths), f"not ignored: {set(paths) - set(result.stdout.split())}"
