"""model.py against transformers' GPT-2: logits, loss, export, generation; attention, sizes, init, variants, errors."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from model import GPT, GPTConfig, GPT2_VOCAB_SIZE

TINY = dict(block_size=64, n_layer=2, n_head=2, n_embd=32)


def hf_model(path):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(path).eval()


def random_tokens(shape, vocab=GPT2_VOCAB_SIZE, seed=0):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def ours(tiny_hf_dir):
    return GPT.from_pretrained(tiny_hf_dir).eval()


def test_logits_and_loss_equal_transformers(tiny_hf_dir, ours):
    idx = random_tokens((3, 40))
    targets = random_tokens((3, 40), seed=1)
    targets[0, :5] = -1  # ignored positions
    ref = hf_model(tiny_hf_dir)
    with torch.no_grad():
        logits, loss = ours(idx, targets)
        ref_logits = ref(idx).logits
    assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    ref_loss = F.cross_entropy(ref_logits.view(-1, ref_logits.size(-1)), targets.view(-1), ignore_index=-1)
    assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    # the loss is the mean over the kept targets only
    assert_close(loss, F.cross_entropy(ref_logits[targets != -1], targets[targets != -1]))


def test_logits_at_positions(ours):
    idx = random_tokens((2, 20))
    positions = torch.tensor([[0, 5, 19], [3, 3, 7]])
    targets = random_tokens((2, 3), seed=5)
    with torch.no_grad():
        full, _ = ours(idx)
        picked, loss = ours(idx, targets, positions=positions)
    expected = torch.stack([full[b, positions[b]] for b in range(2)])  # (2, 3, vocab)
    assert_close(picked, expected, rtol=1e-5, atol=1e-5)
    assert_close(loss, F.cross_entropy(expected.view(-1, expected.size(-1)), targets.view(-1)))


def test_export_roundtrip_and_greedy_generation(tmp_path, tiny_hf_dir, ours):
    ours.save_pretrained(tmp_path / "export")
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
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["vocab_size"] == GPT2_VOCAB_SIZE
    idx = random_tokens((2, 16), seed=4)
    with torch.no_grad():
        assert_close(hf_model(tmp_path)(idx).logits, model(idx)[0][..., :GPT2_VOCAB_SIZE], rtol=1e-5, atol=1e-5)


def explicit_attention(attn, x):
    """Textbook causal attention with the module's own weights: (q k^T / sqrt(hs)), -inf above the diagonal, softmax."""
    B, T, C = x.shape
    nh = attn.n_head
    q, k, v = attn.c_attn(x).split(C, dim=2)
    q, k, v = (t.view(B, T, nh, C // nh).transpose(1, 2) for t in (q, k, v))
    att = (q @ k.transpose(-2, -1)) / math.sqrt(C // nh)
    att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = F.softmax(att, dim=-1) @ v
    return attn.c_proj(y.transpose(1, 2).reshape(B, T, C))


def test_flash_attention_equals_explicit_softmax():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY))
    attn = model.transformer.h[0].attn
    x = torch.randn(2, 50, 32)
    with torch.no_grad():
        assert_close(attn(x), explicit_attention(attn, x), rtol=1e-5, atol=1e-6)


def test_gpt2_small_sizes_and_init():
    torch.manual_seed(0)
    model = GPT(GPTConfig())
    assert model.num_params() == 124_439_808
    assert model.transformer.wte.weight is model.lm_head.weight
    # nanoGPT's FLOPs estimate: 6 * (params without wpe) + 12 * L * H * Q * T
    assert model.flops_per_token(1024) == 6 * (124_439_808 - 1024 * 768) + 12 * 12 * 12 * 64 * 1024
    sd = dict(model.named_parameters())
    for name, p in sd.items():
        if name.endswith("bias"):
            assert torch.count_nonzero(p) == 0, name
        elif ".ln_" in name or "ln_f" in name:
            assert torch.all(p == 1), name
    std = lambda name: sd[name].std().item()
    residual = 0.02 / math.sqrt(2 * 12)
    for name in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.attn.c_attn.weight",
                 "transformer.h.11.mlp.c_fc.weight"):
        assert abs(std(name) - 0.02) < 0.0005, name
    for name in ("transformer.h.0.attn.c_proj.weight", "transformer.h.11.mlp.c_proj.weight"):
        assert abs(std(name) - residual) < residual * 0.03, name
    assert abs(sd["transformer.h.3.mlp.c_fc.weight"].mean().item()) < 1e-4
    assert GPT(GPTConfig(vocab_size=50304)).num_params() == 124_475_904


@pytest.mark.parametrize("norm,mlp", [("layernorm", "gelu"), ("rmsnorm", "gelu"), ("layernorm", "swiglu"),
                                      ("rmsnorm", "swiglu")])
def test_variants_train_and_keep_size(norm, mlp):
    base = GPT(GPTConfig(n_layer=1)).num_params()  # one full-width block: the MLP's share is largest
    variant = GPT(GPTConfig(n_layer=1, norm=norm, mlp=mlp)).num_params()
    assert abs(variant - base) / base < 0.01
    if mlp == "swiglu":
        assert GPT(GPTConfig(n_layer=1, mlp=mlp)).transformer.h[0].mlp.c_proj.in_features == 2048
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=128, norm=norm, mlp=mlp, **TINY))
    opt = model.configure_optimizers(0.1, 3e-3, (0.9, 0.95), 1e-8, "cpu")
    x = random_tokens((4, 33), vocab=128)  # one fixed batch: a model that learns must drive its loss down
    losses = []
    for _ in range(20):
        _, loss = model(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_configure_optimizers_decays_matrices_only(capsys):
    model = GPT(GPTConfig(**TINY))
    opt = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), 1e-8, "cpu")
    assert capsys.readouterr().out == ""  # silent unless verbose
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.num_params()
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-8
    model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), 1e-8, "cpu", verbose=True)
    assert "decayed tensors" in capsys.readouterr().out


def test_generate_past_block_size_top_k_and_seeded():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50304, **dict(TINY, block_size=16))).eval()
    prompt = random_tokens((2, 10))
    out = model.generate(prompt, 30, top_k=5, generator=torch.Generator().manual_seed(1))
    assert out.shape == (2, 40) and torch.equal(out[:, :10], prompt)
    assert out.max() < GPT2_VOCAB_SIZE  # padding ids are never sampled
    again = model.generate(prompt, 30, top_k=5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again)
    # top_k=1 is greedy whatever the temperature
    assert torch.equal(model.generate(prompt, 5, top_k=1), model.generate(prompt, 5, temperature=0))
    # every sampled token is among the top 5 of its step, computed from the last block_size tokens only
    with torch.no_grad():
        for p in range(10, 40):
            logits, _ = model(out[:, max(0, p - 16):p])
            top5 = torch.topk(logits[:, -1, :GPT2_VOCAB_SIZE], 5).indices
            assert (top5 == out[:, p:p + 1]).any(dim=1).all(), p


def test_bad_inputs(tmp_path):
    model = GPT(GPTConfig(**TINY))
    with pytest.raises(ValueError, match="longer than block_size 64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="norm must be"):
        GPTConfig(norm="batchnorm")
    with pytest.raises(ValueError, match="unknown GPTConfig fields: dropout"):
        GPTConfig.from_dict({"dropout": 0.1})
    with pytest.raises(ValueError, match="cannot export norm='rmsnorm'"):
        GPT(GPTConfig(norm="rmsnorm", **TINY)).save_pretrained(tmp_path / "x")
    with pytest.raises(ValueError, match="no config.json"):
        GPT.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type is 'bert', not a GPT-2"):
        GPT.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="no weights"):
        GPT.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a readable JSON"):
        GPT.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="not a directory"):
        GPT.from_pretrained(str(tmp_path / "missing"))


def test_non_gpt2_activation_is_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=8, n_positions=8, vocab_size=100,
                               activation_function="relu")).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="activation_function='relu'"):
        GPT.from_pretrained(str(tmp_path))
