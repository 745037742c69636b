"""Offline (HF_HUB_OFFLINE=1) or with the hub unreachable: fineweb.py and GPT.from_pretrained give one error line at
once (not after huggingface_hub's ~25 s of retries), and what the local HF cache holds still loads. CPU, no network.

    python -m pytest -q tests/test_hub_offline.py
"""

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT
from model import GPT
from test_fineweb import expected_tokens, make_docs, read_shards, write_jsonl

# Port 9 (discard) on loopback: nothing listens, so the connection is refused at once, a deterministic "unreachable".
CLOSED = "http://127.0.0.1:9"
MODES = {"offline": ({"HF_HUB_OFFLINE": "1"}, "offline mode (HF_HUB_OFFLINE)"),
         "unreachable": ({"HF_ENDPOINT": CLOSED}, f"no network ({CLOSED} unreachable: ")}
FAST = 10  # seconds; before: 24-28 s of retries


def hf_env(tmp_path, mode):
    """The environment of a subprocess with its own empty HF caches under tmp_path, in the given mode."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT")}
    return dict(env, HF_HOME=str(tmp_path / "hf"), HF_DATASETS_CACHE=str(tmp_path / "hf" / "datasets"),
                OMP_NUM_THREADS="1", **MODES[mode][0])


def cache_hub_dataset(cache_dir, repo_id, config_name, data_file, build_dir):
    """Puts a jsonl file into the datasets cache as if load_dataset(repo_id, config_name) had downloaded it:
    <namespace>___<name>/<config>/<version>/<commit>/ holding the arrow file and dataset_info.json."""
    from datasets.packaged_modules.json.json import Json

    namespace, name = repo_id.split("/")
    builder = Json(cache_dir=str(build_dir), dataset_name=name, config_name=config_name,
                   data_files={"train": str(data_file)})
    builder.download_and_prepare()
    os.renames(builder.cache_dir, os.path.join(cache_dir, f"{namespace}___{name}", config_name, "0.0.0", "0" * 40))


@pytest.mark.parametrize("mode", list(MODES))
def test_fineweb_hub_offline(tmp_path, mode):
    env = hf_env(tmp_path, mode)

    def cli(*argv):
        t0 = time.time()
        r = subprocess.run([sys.executable, os.path.join(ROOT, "fineweb.py"), *map(str, argv)], env=env,
                           capture_output=True, text=True, timeout=300)
        return r, time.time() - t0

    out = tmp_path / "out"
    r, seconds = cli("--output_dir", out, "--num_proc", 1)  # the default: FineWeb-Edu, not cached here
    assert r.returncode == 2 and seconds < FAST, (seconds, r.stderr)
    assert r.stderr.splitlines() == [r.stderr.strip()], r.stderr  # one line, no retry warnings
    assert r.stderr.startswith(f"fineweb.py: error: HuggingFaceFW/fineweb-edu (sample-10BT): cannot load: "
                               f"{MODES[mode][1]}"), r.stderr
    assert r.stderr.strip().endswith("and not in the local datasets cache; use --input with local files")
    assert not out.exists()

    # the same dataset already in the local cache (a download on a connected machine): it loads, offline
    docs = make_docs(40, seed=10)
    cache_hub_dataset(env["HF_DATASETS_CACHE"], "HuggingFaceFW/fineweb-edu", "sample-10BT",
                      write_jsonl(tmp_path / "docs.jsonl", docs), tmp_path / "build")
    r, seconds = cli("--output_dir", out, "--num_proc", 1, "--shard_size", 100)
    assert r.returncode == 0, r.stderr
    assert np.array_equal(read_shards(out, 100), expected_tokens(docs))


@pytest.mark.parametrize("mode", list(MODES))
def test_from_pretrained_hub_offline(tmp_path, tiny_hf_dir, mode):
    env = hf_env(tmp_path, mode)
    # "gpt2" in the hub cache as huggingface_hub lays it out (refs/main -> snapshots/<commit>/); gpt2-medium is not
    commit = "0" * 40
    repo = tmp_path / "hf" / "hub" / "models--gpt2"
    shutil.copytree(tiny_hf_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    code = """if True:
        import json, time
        from model import GPT
        t0 = time.time()
        try:
            GPT.from_pretrained("gpt2-medium")
        except ValueError as e:
            cold = str(e)
        print(json.dumps({"cold": cold, "seconds": time.time() - t0,
                          "warm_params": GPT.from_pretrained("gpt2").num_params()}))"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["seconds"] < FAST, result
    assert result["cold"].startswith(f"could not load GPT-2 'gpt2-medium': {MODES[mode][1]}"), result["cold"]
    assert "\n" not in result["cold"]
    assert result["cold"].endswith("and not in the local cache; pass a local transformers directory instead")
    assert "Retrying" not in r.stderr, r.stderr
    assert result["warm_params"] == GPT.from_pretrained(tiny_hf_dir).num_params()
