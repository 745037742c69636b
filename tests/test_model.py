"""model.py against transformers' GPT-2: logits, loss, generation; attention, sizes, init, variants, errors."""

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import model as model_module
from model import GPT, GPTConfig, GPT2_VOCAB_SIZE, KVCache, apply_rope, rope_tables
from optim import adamw

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
        logits, loss = ours(idx, targets, return_logits=True)
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
        picked, loss = ours(idx, targets, positions=positions, return_logits=True)
    expected = torch.stack([full[b, positions[b]] for b in range(2)])  # (2, 3, vocab)
    assert_close(picked, expected, rtol=1e-5, atol=1e-5)
    assert_close(loss, F.cross_entropy(expected.view(-1, expected.size(-1)), targets.view(-1)))


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
    opt = adamw(model, lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, device_type="cpu")
    x = random_tokens((4, 33), vocab=128)  # one fixed batch: a model that learns must drive its loss down
    losses = []
    for _ in range(20):
        _, loss = model(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


# the --recipe=fast combination: every architecture switch away from GPT-2
FAST = dict(pos_emb="rope", qk_norm=True, mlp="relu2", norm="rmsnorm", tie_embeddings=False, bias=False,
            logit_softcap=15.0, zero_init=True)
SWITCHES = [dict(pos_emb="rope"), dict(qk_norm=True), dict(mlp="relu2"), dict(norm="rmsnorm"),
            dict(tie_embeddings=False), dict(bias=False), dict(logit_softcap=15.0), dict(zero_init=True),
            dict(zero_init=True, tie_embeddings=False), FAST]
SMALL = dict(block_size=32, n_layer=2, n_head=2, n_embd=32, vocab_size=256)


def switches_id(switches):
    return "fast" if switches is FAST else ",".join(f"{k}={v}" for k, v in switches.items())


def pattern_batch(B=4, T=32, vocab=256, period=8):
    """(x, y) (B, T): a random period-8 pattern of tokens repeated, each row shifted; learnable in a few steps."""
    pattern = torch.randint(0, vocab, (period,), generator=torch.Generator().manual_seed(0))
    rows = torch.stack([pattern.roll(-r).repeat(T // period + 1)[:T + 1] for r in range(B)])
    return rows[:, :-1], rows[:, 1:]


def pattern_losses(model, steps=15):
    """The losses of `steps` AdamW steps of model on pattern_batch()."""
    opt = adamw(model, lr=5e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, device_type="cpu")
    x, y = pattern_batch()
    losses = []
    for _ in range(steps):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("switches", SWITCHES, ids=switches_id)
def test_switches_train(switches):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL, **switches))
    c = model.config
    blocks = model.transformer.h
    assert ("wpe" in model.transformer) == (c.pos_emb == "learned")
    assert (model.transformer.wte.weight is model.lm_head.weight) == c.tie_embeddings
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.LayerNorm))]
    assert all((m.bias is not None) == c.bias for m in layers if m is not model.lm_head)
    if c.zero_init:
        assert all(torch.count_nonzero(b.attn.c_proj.weight) == 0 and torch.count_nonzero(b.mlp.c_proj.weight) == 0
                   for b in blocks)
        # an untied head starts at 0; a tied one is the input embedding and keeps its init
        assert (torch.count_nonzero(model.lm_head.weight) == 0) == (not c.tie_embeddings)
    losses = pattern_losses(model)
    if c.zero_init and not c.tie_embeddings:
        assert_close(losses[0], math.log(256))  # all logits 0: the uniform distribution
    assert losses[-1] < 0.6 * losses[0], losses


def test_nanochat_init():
    """init='nanochat': wte N(0, 1), an untied lm_head N(0, 0.001), c_attn and c_fc uniform with std 1/sqrt(n_embd),
    the residual projections 0; the architecture is the same (the state_dict's keys and shapes), and it trains."""
    torch.manual_seed(0)
    config = GPTConfig(**SMALL, **dict(FAST, zero_init=False), init="nanochat")
    model = GPT(config)
    assert model.state_dict().keys() == GPT(GPTConfig(**SMALL, **FAST)).state_dict().keys()
    assert config.non_gpt2_fields() == GPTConfig(**SMALL, **FAST).non_gpt2_fields()  # an init, not an architecture
    assert_close(model.transformer.wte.weight.std().item(), 1.0, rtol=0.02, atol=0)
    assert_close(model.lm_head.weight.std().item(), 0.001, rtol=0.02, atol=0)
    bound = (3 / SMALL["n_embd"]) ** 0.5
    for block in model.transformer.h:
        for w in (block.attn.c_attn.weight, block.mlp.c_fc.weight):
            assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound  # uniform in [-bound, bound]
            assert_close(w.std().item(), SMALL["n_embd"] ** -0.5, rtol=0.05, atol=0)
        assert torch.count_nonzero(block.attn.c_proj.weight) == 0 and torch.count_nonzero(block.mlp.c_proj.weight) == 0
    losses = pattern_losses(model)
    assert_close(losses[0], math.log(256), rtol=1e-3, atol=0)  # a head of 0.001: logits near 0, near uniform
    assert losses[-1] < 0.6 * losses[0], losses


def test_state_dict_keys_default_and_fast():
    blocks = [f"transformer.h.0.{m}.{p}" for m in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc",
                                                    "mlp.c_proj") for p in ("weight", "bias")]
    keys = ["transformer.wte.weight", "transformer.wpe.weight", *blocks, "transformer.ln_f.weight",
            "transformer.ln_f.bias", "lm_head.weight"]
    assert list(GPT(GPTConfig(**dict(TINY, n_layer=1))).state_dict()) == keys
    assert GPTConfig().is_gpt2 and GPTConfig(zero_init=True).is_gpt2  # zero_init is an init, not an architecture
    # the fast model's keys: no wpe (rope's cos/sin buffers are not persistent), no biases, its own lm_head
    fast = GPT(GPTConfig(**dict(TINY, n_layer=1), **FAST))
    assert list(fast.state_dict()) == [k for k in keys if "wpe" not in k and not k.endswith("bias")]


def test_variant_sizes_and_flops():
    L, C, V, T, H = 2, 32, 256, 32, 2
    attention = 12 * L * H * (C // H) * T
    block = 12 * C * C + 13 * C  # c_attn, c_proj, c_fc, c_proj with biases, two LayerNorms
    default = V * C + T * C + L * block + 2 * C

    def sizes(**switches):
        model = GPT(GPTConfig(**SMALL, **switches))
        return model.num_params(), model.flops_per_token(T)

    assert sizes() == (default, 6 * (default - T * C) + attention)
    # every variant's matmuls: the untied wte is a lookup (left out of the FLOPs), the head still a matmul
    assert sizes(pos_emb="rope") == (default - T * C, 6 * (default - T * C) + attention)
    assert sizes(tie_embeddings=False) == (default + V * C, 6 * (default - T * C) + attention)
    assert sizes(bias=False) == (default - L * 11 * C - C, 6 * (default - L * 11 * C - C - T * C) + attention)
    assert sizes(mlp="relu2") == sizes()
    fast = 2 * V * C + L * (12 * C * C + 2 * C) + C  # two vocab matrices, bias-free blocks, RMSNorm gains
    assert sizes(**FAST) == (fast, 6 * (fast - V * C) + attention)


def test_old_configs_load_and_variants_roundtrip():
    old = dict(block_size=1024, vocab_size=50304, n_layer=12, n_head=12, n_embd=768)  # a checkpoint from before
    assert GPTConfig.from_dict(old) == GPTConfig(**old) and GPTConfig.from_dict(old).is_gpt2
    fast = GPTConfig(**FAST)
    assert GPTConfig.from_dict(dataclasses.asdict(fast)) == fast and not fast.is_gpt2


# today's --recipe=fast block: nanochat's (transformers' NanoChatForCausalLM), RMSNorm without gains
NANOCHAT = dict(FAST, norm="rmsnorm_nogain", norm_eps=1e-6, embed_norm=True)


def fast_logits(model, idx, eps, embed_norm):
    """The fast block's logits written out from model's state dict: RMSNorm (with the gains the state dict has, if
    any) and QK-norm at eps, rope after QK-norm, ReLU², the tanh soft-cap; embed_norm: a norm after the embedding."""
    c, sd = model.config, model.state_dict()
    B, T = idx.shape
    C, nh = c.n_embd, c.n_head
    cos, sin = (t[:T] for t in rope_tables(c.block_size, C // nh))

    def norm(x, name):
        return F.rms_norm(x, (x.size(-1),), sd.get(name), eps=eps)

    x = sd["transformer.wte.weight"][idx]
    if embed_norm:
        x = norm(x, "transformer.ln_emb.weight")
    for i in range(c.n_layer):
        p = f"transformer.h.{i}."
        qkv = norm(x, p + "ln_1.weight") @ sd[p + "attn.c_attn.weight"].T
        q, k, v = (t.view(B, T, nh, C // nh).transpose(1, 2) for t in qkv.split(C, dim=-1))
        q, k = (apply_rope(norm(t, None), cos, sin) for t in (q, k))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + y @ sd[p + "attn.c_proj.weight"].T
        h = F.relu(norm(x, p + "ln_2.weight") @ sd[p + "mlp.c_fc.weight"].T).square()
        x = x + h @ sd[p + "mlp.c_proj.weight"].T
    logits = norm(x, "transformer.ln_f.weight") @ sd["lm_head.weight"].T
    return c.logit_softcap * torch.tanh(logits / c.logit_softcap)


def randomized(model, embedding_std):
    """model with every weight drawn at random (zero_init's zeros would hide the blocks), gains around 1."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if p.dim() == 1 else 0.3 * torch.randn_like(p))
        model.transformer.wte.weight.mul_(embedding_std / 0.3)
    return model.eval()


def test_old_fast_config_gives_the_old_block():
    """A fast checkpoint from before norm_eps and embed_norm stores a config dict without them: it builds the block
    it was trained with (RMSNorm gains at eps 1e-5, no norm after the embedding), the same keys and logits."""
    old = {k: v for k, v in dataclasses.asdict(GPTConfig(**SMALL, **FAST)).items()
           if k not in ("norm_eps", "embed_norm")}
    config = GPTConfig.from_dict(old)
    assert (config.norm, config.norm_eps, config.embed_norm) == ("rmsnorm", 1e-5, False)
    model = randomized(GPT(config), embedding_std=0.003)  # tiny rows: the eps matters
    assert list(model.state_dict()) == [k for k in GPT(GPTConfig(**SMALL, **FAST)).state_dict()]
    assert "transformer.ln_emb.weight" not in model.state_dict() and "transformer.ln_f.weight" in model.state_dict()
    idx = random_tokens((2, 20), vocab=256)
    with torch.no_grad():
        logits = model(idx)[0]
        assert_close(logits, fast_logits(model, idx, eps=1e-5, embed_norm=False))
        assert not torch.allclose(logits, fast_logits(model, idx, eps=1e-6, embed_norm=False), atol=1e-3)


def test_nanochat_block():
    """norm="rmsnorm_nogain", norm_eps, embed_norm: no parameters but the matrices, one more norm, every eps."""
    config = GPTConfig(**SMALL, **NANOCHAT)
    assert config.non_gpt2_fields() == {k: v for k, v in NANOCHAT.items() if k != "zero_init"}
    model = randomized(GPT(config), embedding_std=0.003)
    V, C, L = SMALL["vocab_size"], SMALL["n_embd"], SMALL["n_layer"]
    assert model.num_params() == 2 * V * C + L * 12 * C * C  # two vocab matrices and the blocks' matrices only
    assert not any(".ln_" in k for k in model.state_dict())
    idx = random_tokens((2, 20), vocab=256)
    with torch.no_grad():
        logits = model(idx)[0]
        assert_close(logits, fast_logits(model, idx, eps=1e-6, embed_norm=True))
        assert not torch.allclose(logits, fast_logits(model, idx, eps=1e-6, embed_norm=False), atol=1e-3)
        assert not torch.allclose(logits, fast_logits(model, idx, eps=1e-5, embed_norm=True), atol=1e-3)
        # bf16 in, bf16 out, the norm computed in fp32 (as transformers' NanoChatRMSNorm)
        x = torch.randn(3, C, dtype=torch.bfloat16)
        out = model.transformer.ln_emb(x)
        assert out.dtype == torch.bfloat16 and torch.equal(out, F.rms_norm(x.float(), (C,), eps=1e-6).bfloat16())
    assert not GPTConfig(norm_eps=1e-6).is_gpt2 and not GPTConfig(embed_norm=True).is_gpt2


@pytest.mark.parametrize("field,value,message", [
    ("pos_emb", "alibi", "pos_emb must be 'learned' or 'rope'"),
    ("mlp", "tanh", "mlp must be 'gelu', 'swiglu' or 'relu2'"),
    ("qk_norm", "yes", "qk_norm must be True or False"),
    ("tie_embeddings", 1, "tie_embeddings must be True or False"),
    ("bias", None, "bias must be True or False"),
    ("zero_init", "false", "zero_init must be True or False"),
    ("logit_softcap", -1.0, "logit_softcap must be a finite number >= 0"),
    ("logit_softcap", float("inf"), "logit_softcap must be"),
    ("logit_softcap", float("nan"), "logit_softcap must be"),
    ("logit_softcap", "15", "logit_softcap must be"),
    ("norm", "rms", "norm must be 'layernorm', 'rmsnorm' or 'rmsnorm_nogain'"),
    ("norm_eps", 0, "norm_eps must be a finite number > 0"),
    ("norm_eps", True, "norm_eps must be"),
    ("norm_eps", float("nan"), "norm_eps must be"),
    ("embed_norm", 1, "embed_norm must be True or False"),
    ("init", "xavier", "init must be 'gpt2' or 'nanochat', got 'xavier'"),
    ("init", "nanochat", "init='nanochat' needs tie_embeddings=False"),
])
def test_bad_switches(field, value, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**{field: value})


def test_rope_needs_even_head_size():
    with pytest.raises(ValueError, match="head size n_embd / n_head = 3 must be even"):
        GPTConfig(n_embd=6, n_head=2, pos_emb="rope")


def test_rope_scores_depend_on_relative_position():
    cos, sin = rope_tables(block_size=64, head_size=8)
    q, k = torch.randn(2, 1, 1, 1, 8, generator=torch.Generator().manual_seed(0))  # (B, nh, T, hs) each

    def score(m, n):  # q at position m against k at position n
        return (apply_rope(q, cos[m:m + 1], sin[m:m + 1]) * apply_rope(k, cos[n:n + 1], sin[n:n + 1])).sum()

    assert_close(score(0, 0), (q * k).sum())  # position 0: no rotation
    assert_close(score(5, 2), score(60, 57))
    assert_close(score(2, 5), score(40, 43))
    assert not torch.allclose(score(5, 2), score(5, 3))


@pytest.mark.parametrize("qk_norm", [True, False])
def test_qk_norm_makes_attention_independent_of_qk_scale(qk_norm):
    torch.manual_seed(0)
    attn = GPT(GPTConfig(**TINY, qk_norm=qk_norm)).transformer.h[0].attn
    x = torch.randn(2, 10, 32)
    with torch.no_grad():
        before = attn(x)
        attn.c_attn.weight[:64].mul_(10)  # the q and k rows (n_embd 32 each): 10x larger q and k
        attn.c_attn.bias[:64].mul_(10)
        after = attn(x)
    assert torch.allclose(before, after, atol=1e-5) == qk_norm


def test_logit_softcap_squashes_logits_and_loss():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=256, **TINY, logit_softcap=2.0))
    with torch.no_grad():
        model.lm_head.weight.mul_(100)  # logits far beyond the cap
    idx, targets = random_tokens((2, 20), vocab=256), random_tokens((2, 20), vocab=256, seed=1)
    with torch.no_grad():
        capped, loss = model(idx, targets, return_logits=True)
        model.config.logit_softcap = 0.0
        raw, _ = model(idx)
    assert raw.abs().max() > 10
    assert_close(capped, 2.0 * torch.tanh(raw / 2.0))
    assert_close(loss, F.cross_entropy(capped.view(-1, 256), targets.view(-1)))


def test_logit_softcap_gradients_in_fp32_under_bf16():
    """Under bf16 autocast the cap runs in fp32: the gradients of the saturated raw logits (|z| > 1.5 cap, where
    tanh's 1 - y^2 is small and bf16 would round y) match a float64 cap and loss at the same raw logits to 1% (a cap
    in bf16: ~4% median error here)."""
    torch.manual_seed(0)
    cap = 2.0
    model = GPT(GPTConfig(vocab_size=256, **TINY, logit_softcap=cap))
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # many logits far beyond the cap
    idx, targets = random_tokens((4, 20), vocab=256), random_tokens((4, 20), vocab=256, seed=1)
    raw = []

    def keep_raw_logits(module, inputs, out):
        out.retain_grad()
        raw.append(out)

    model.lm_head.register_forward_hook(keep_raw_logits)
    with torch.autocast("cpu", torch.bfloat16):
        logits, loss = model(idx, targets, return_logits=True)  # the plain path: lm_head's logits to hook
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    loss.backward()
    z = raw[0].detach().double().requires_grad_()  # the bf16 raw logits, exactly
    F.cross_entropy((cap * torch.tanh(z / cap)).view(-1, 256), targets.view(-1)).backward()
    saturated = z.detach().abs() > 1.5 * cap
    assert saturated.float().mean() > 0.2
    error = (raw[0].grad.double() - z.grad).abs() / z.grad.abs().clamp_min(1e-30)
    assert error[saturated].median() < 0.01, error[saturated].median()


def loss_and_grads(model, idx, targets, **kwargs):
    model.zero_grad(set_to_none=True)
    logits, loss = model(idx, targets, **kwargs)
    loss.backward()
    return logits, loss.detach(), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("chunk_rows", [1, 7, 16, 40, 64])  # 40 rows: 7 and 16 leave a shorter last chunk
@pytest.mark.parametrize("variant", [dict(), dict(tie_embeddings=False, norm="rmsnorm", pos_emb="rope", bias=False)])
def test_chunked_softcap_loss_equals_the_plain_path(chunk_rows, variant, monkeypatch):
    """With targets and no logits asked for, a soft-capped loss is computed chunk_rows rows at a time
    (model.softcap_cross_entropy): the plain path's loss and the gradients of every parameter, in fp32 up to float
    rounding, with ignored (-1) targets; none of it under no_grad (an eval)."""
    monkeypatch.setattr(model_module, "LOSS_CHUNK_ROWS", chunk_rows)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=256, **TINY, logit_softcap=2.0, **variant))
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # logits far beyond the cap: tanh is far from linear
    idx, targets = random_tokens((2, 20), vocab=256), random_tokens((2, 20), vocab=256, seed=1)
    targets[0, :5] = targets[1, -3:] = -1
    chunked = loss_and_grads(model, idx, targets)
    plain = loss_and_grads(model, idx, targets, return_logits=True)
    assert chunked[0] is None and plain[0].shape == (2, 20, 256)
    assert_close(chunked[1], plain[1])
    assert chunked[2].keys() == plain[2].keys() and all(g is not None for g in chunked[2].values())
    for name in plain[2]:
        assert_close(chunked[2][name], plain[2][name], msg=name)
    with torch.no_grad():
        logits, loss = model(idx, targets)
    assert logits is None and not loss.requires_grad
    assert_close(loss, plain[1])


def test_chunked_softcap_loss_under_bf16_autocast(monkeypatch):
    """Under bf16 autocast the chunked loss runs the head's matmuls in bf16 and the cap in fp32, as the plain path:
    the same loss and gradients, to bf16's precision (rounded at other points: each gradient's norm of error)."""
    monkeypatch.setattr(model_module, "LOSS_CHUNK_ROWS", 16)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=256, **TINY, logit_softcap=2.0, tie_embeddings=False))
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    idx, targets = random_tokens((2, 20), vocab=256), random_tokens((2, 20), vocab=256, seed=1)
    with torch.autocast("cpu", torch.bfloat16):
        chunked = loss_and_grads(model, idx, targets)
        plain = loss_and_grads(model, idx, targets, return_logits=True)
    assert chunked[1].dtype == torch.float32
    assert_close(chunked[1], plain[1], rtol=1e-3, atol=0)
    for name in plain[2]:
        assert chunked[2][name].dtype == torch.float32
        assert (chunked[2][name] - plain[2][name]).norm() < 0.01 * plain[2][name].norm(), name


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


def widened(model, seed=0):
    """model with noise added to every weight: logits far from ties (and from zero_init's all-zero head)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


GENERATE_VARIANTS = [dict(), dict(pos_emb="rope", qk_norm=True), dict(logit_softcap=2.0), FAST]


@pytest.mark.parametrize("switches", GENERATE_VARIANTS, ids=switches_id)
def test_kv_cache_forward_equals_full_forward(switches):
    torch.manual_seed(0)
    model = widened(GPT(GPTConfig(vocab_size=256, **TINY, **switches)))
    idx = random_tokens((2, 30), vocab=256)
    with torch.no_grad():
        full, _ = model(idx)
        cache = [KVCache(TINY["block_size"]) for _ in range(TINY["n_layer"])]
        # a prompt, a chunk of several tokens after it (masked), then one token at a time
        chunks = [model(idx[:, a:b], kv_cache=cache)[0] for a, b in [(0, 10), (10, 17)] + [(t, t + 1)
                                                                                          for t in range(17, 30)]]
    assert cache[0].pos == 30
    assert_close(torch.cat(chunks, dim=1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="sequence of length 65 is longer than block_size 64"):
        model(random_tokens((2, 35), vocab=256), kv_cache=cache)


@pytest.mark.parametrize("switches", GENERATE_VARIANTS, ids=switches_id)
def test_cached_generate_equals_uncached(switches):
    torch.manual_seed(0)
    model = widened(GPT(GPTConfig(vocab_size=256, **dict(TINY, block_size=16), **switches)))
    prompt = random_tokens((2, 10), vocab=256)
    # 30 new tokens: past block_size 16 the window slides and every step is a full forward pass again
    cached = model.generate(prompt, 30, temperature=0)
    assert cached.shape == (2, 40) and torch.equal(cached[:, :10], prompt)
    assert torch.equal(cached, model.generate(prompt, 30, temperature=0, use_cache=False))
    assert torch.equal(cached[1:], model.generate(prompt[1:], 30, temperature=0))  # rows don't interact
    sampled = [model.generate(prompt, 30, top_k=20, generator=torch.Generator().manual_seed(3), use_cache=use_cache)
               for use_cache in (True, False)]
    assert torch.equal(*sampled)


def test_cached_generate_under_autocast():
    """Under bf16 autocast the cached path is as close to the fp32 logits as the uncached one is. bf16 keeps 8
    significant bits, so both are some 1e-2 of the logits' size away from fp32 in different places (other shapes,
    other roundings): the bound is the uncached path's own distance from fp32, measured here on this CPU's kernels,
    not a number written down on one machine."""
    torch.manual_seed(0)
    model = widened(GPT(GPTConfig(vocab_size=50304, **TINY, **FAST)))
    prompt = random_tokens((2, 10))
    with torch.no_grad():
        exact, _ = model(prompt)  # fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.generate(prompt, 20, top_k=50, generator=torch.Generator().manual_seed(0))
        cache = [KVCache(TINY["block_size"]) for _ in range(TINY["n_layer"])]
        with torch.no_grad():
            full, _ = model(prompt)
            chunks = [model(prompt[:, :6], kv_cache=cache)[0]] + [model(prompt[:, t:t + 1], kv_cache=cache)[0]
                                                                   for t in range(6, 10)]
    assert out.shape == (2, 30) and out.max() < GPT2_VOCAB_SIZE  # padding ids are never sampled
    assert cache[0].k.dtype == full.dtype == torch.bfloat16  # the cache holds what autocast computes in
    bf16_error = (full.float() - exact).abs().max()
    assert 0 < bf16_error < 0.05 * exact.abs().max()  # bf16 did round, by its own precision's order
    assert (torch.cat(chunks, dim=1).float() - exact).abs().max() <= 1.5 * bf16_error


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
