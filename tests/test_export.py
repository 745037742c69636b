"""export.py: a model trained here as a transformers directory, its logits and greedy tokens those of transformers;
what GPT-2's architecture cannot hold is refused before anything is written."""

import json
import os
import stat

import pytest
import torch
from torch.testing import assert_close

from export import save_pretrained
from model import GPT, GPTConfig, GPT2_VOCAB_SIZE
from test_model import SWITCHES, TINY, hf_model, ours, random_tokens, switches_id  # noqa: F401, F811 (a fixture)


def test_export_roundtrip_and_greedy_generation(tmp_path, tiny_hf_dir, ours):
    save_pretrained(ours, tmp_path / "export")
    exported = hf_model(tmp_path / "export")
    idx = random_tokens((2, 30), seed=2)
    with torch.no_grad():
        assert_close(exported(idx).logits, ours(idx)[0], rtol=1e-5, atol=1e-5)
    prompt = random_tokens((1, 8), seed=3)
    ref = exported.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=GPT2_VOCAB_SIZE - 1)
    assert torch.equal(ours.generate(prompt, 20, temperature=0), ref)
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "export").iterdir())


def test_padded_vocab_exports_real_rows(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50304, **TINY)).eval()
    save_pretrained(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["vocab_size"] == GPT2_VOCAB_SIZE
    idx = random_tokens((2, 16), seed=4)
    with torch.no_grad():
        assert_close(hf_model(tmp_path)(idx).logits, model(idx)[0][..., :GPT2_VOCAB_SIZE], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("switches", [s for s in SWITCHES if s != dict(zero_init=True)], ids=switches_id)
def test_save_pretrained_refuses_variants(tmp_path, switches):
    model = GPT(GPTConfig(**TINY, **switches))
    changed = [k for k in switches if k != "zero_init"]
    with pytest.raises(ValueError, match="cannot export .* as GPT-2") as e:
        save_pretrained(model, tmp_path)
    assert all(f"{k}={switches[k]!r}" in str(e.value) for k in changed), str(e.value)
    assert not any(tmp_path.iterdir())  # refused before anything is written


def test_export_refuses_rmsnorm(tmp_path):
    with pytest.raises(ValueError, match="cannot export norm='rmsnorm'"):
        save_pretrained(GPT(GPTConfig(norm="rmsnorm", **TINY)), tmp_path / "x")


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_exported_files_have_the_umask_mode(tmp_path, ours, umask):
    """model.safetensors was 0600 (its writer's temporary file) while the other files were 0644: every file now has
    the mode the user's umask gives, as any file the user writes."""
    old = os.umask(umask)
    try:
        save_pretrained(ours, tmp_path / "export")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "export").iterdir()}
    assert "model.safetensors" in modes and "tokenizer.json" in modes
    assert set(modes.values()) == {0o666 & ~umask}, modes
