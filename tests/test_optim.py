"""optim.py: GPT-2's AdamW and Muon + AdamW (--recipe=fast), the learning-rate schedules, and one optimizer step
with gradient accumulation."""

import copy
import dataclasses
import math

import pytest
import torch
from torch.testing import assert_close

from model import GPT, GPTConfig
from optim import (MUON_MOMENTUM, MuonAdamW, adamw, configure_optimizers, get_lr, get_muon_momentum, muon_adamw,
                   train_step)
from test_model import FAST, SMALL, TINY, pattern_batch
from train_gpt2 import parse_config


# -----------------------------------------------------------------------------
# the schedule and the step

def test_lr_schedule():
    kw = dict(max_lr=6e-4, min_lr=6e-5, warmup_steps=715, max_steps=19073)
    assert get_lr(0, **kw) == pytest.approx(6e-4 / 715)
    assert get_lr(714, **kw) == pytest.approx(6e-4)  # the last warmup step reaches max_lr
    assert get_lr(715, **kw) == pytest.approx(6e-4)  # cosine starts at the top
    assert get_lr((715 + 19073) // 2, **kw) == pytest.approx((6e-4 + 6e-5) / 2, rel=1e-4)  # half way down
    assert get_lr(19073, **kw) == pytest.approx(6e-5)
    assert get_lr(25000, **kw) == 6e-5  # past the end: min_lr
    lrs = [get_lr(s, **kw) for s in range(715, 19074)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotonic decay
    assert get_lr(0, **{**kw, "warmup_steps": 0}) == pytest.approx(6e-4)


def test_warmdown_schedule():
    kw = dict(max_lr=0.02, min_lr=0.0, warmup_steps=0, max_steps=100, schedule="warmdown", warmdown_frac=0.4)
    assert [get_lr(s, **kw) for s in (0, 59, 60)] == [0.02, 0.02, 0.02]  # constant until the last 40 steps
    assert get_lr(80, **kw) == pytest.approx(0.01) and get_lr(99, **kw) == pytest.approx(0.0005)
    assert get_lr(100, **kw) == 0.0
    assert get_lr(4, **{**kw, "warmup_steps": 10}) == pytest.approx(0.01)  # warmup as in the cosine schedule


def test_muon_momentum_warmup():
    """modded-nanogpt's and nanochat's: 0.85 at step 0, linear to 0.95 at step 300, 0.95 after; 0 steps: 0.95."""
    assert [get_muon_momentum(s, 300) for s in (0, 150, 300, 1000)] == pytest.approx([0.85, 0.9, 0.95, 0.95])
    assert get_muon_momentum(299, 300) < 0.95 and get_muon_momentum(0, 0) == MUON_MOMENTUM == 0.95
    moms = [get_muon_momentum(s, 300) for s in range(302)]
    assert all(a < b for a, b in zip(moms[:300], moms[1:301])) and moms[300] == moms[301]


def test_train_step_sets_muons_momentum():
    """train_step's momentum reaches Muon's group (torch's Muon reads it each step) and no AdamW group: two steps at
    momentum 0.85 of an optimizer built at 0.95 equal two steps of one built at 0.85."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL, **FAST))
    ref, unchanged = copy.deepcopy(model), copy.deepcopy(model)
    opt, ref_opt, unchanged_opt = muon_optimizer(model), muon_optimizer(ref, momentum=0.85), muon_optimizer(unchanged)
    kw = dict(lr=0.02, grad_clip=1.0, device_type="cpu", autocast_dtype=None, ddp=False)
    for _ in range(3):  # zero_init leaves c_fc's first gradient at 0: the momentum shows from the third step on
        train_step(model, opt, [pattern_batch()], momentum=0.85, **kw)
        train_step(ref, ref_opt, [pattern_batch()], **kw)
        train_step(unchanged, unchanged_opt, [pattern_batch()], **kw)  # None: the 0.95 it was built with
    assert [g.get("momentum") for g in opt.param_groups] == [0.85, None, None, None]
    assert unchanged_opt.param_groups[0]["momentum"] == 0.95
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), name
    assert not torch.equal(model.transformer.h[0].mlp.c_fc.weight, unchanged.transformer.h[0].mlp.c_fc.weight)


def test_train_step_accumulation_equals_one_big_batch():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=16))
    other = copy.deepcopy(model)
    x, y = torch.randint(0, 64, (2, 4, 16)), torch.randint(0, 64, (2, 4, 16))
    kw = dict(lr=1e-2, grad_clip=1.0, device_type="cpu", autocast_dtype=None, ddp=False)
    opt_a = adamw(model, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, device_type="cpu")
    opt_b = adamw(other, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, device_type="cpu")
    loss_a, norm_a = train_step(model, opt_a, [(x[0], y[0]), (x[1], y[1])], **kw)
    loss_b, norm_b = train_step(other, opt_b, [(x.view(8, 16), y.view(8, 16))], **kw)
    assert_close(loss_a, loss_b)
    assert_close(norm_a, norm_b)
    for p, q in zip(model.parameters(), other.parameters()):
        assert_close(p, q)


def test_configure_optimizers_decays_matrices_only(capsys):
    model = GPT(GPTConfig(**TINY))
    opt = adamw(model, lr=6e-4, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, device_type="cpu")
    assert capsys.readouterr().out == ""  # silent unless verbose
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.num_params()
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-8
    adamw(model, lr=6e-4, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, device_type="cpu", verbose=True)
    assert "decayed tensors" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# the optimizers: AdamW (GPT-2's, the default) and Muon + AdamW (--recipe=fast)

MUON_LRS = dict(embedding_lr=0.2, head_lr=0.004, scalar_lr=0.04)


def muon_optimizer(model, learning_rate=0.02, weight_decay=0.0, **kw):
    return muon_adamw(model, lr=learning_rate, **MUON_LRS, weight_decay=weight_decay, betas=(0.8, 0.95), eps=1e-10,
                      device_type="cpu", **kw)


def set_lr(optimizer, lr):
    """train_step's rule: every group at the schedule's lr times its lr_scale (none: 1)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def ids(params):
    return [id(p) for p in params]  # tensors compare elementwise: compare them by identity


def test_default_optimizer_is_gpt2_adamw():
    model = GPT(GPTConfig(**TINY))
    opt = adamw(model, lr=6e-4, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, device_type="cpu")
    assert type(opt) is torch.optim.AdamW
    params = list(model.parameters())
    assert [ids(g["params"]) for g in opt.param_groups] == [ids(p for p in params if p.dim() >= 2),
                                                            ids(p for p in params if p.dim() < 2)]
    assert all(g["lr"] == 6e-4 and "lr_scale" not in g for g in opt.param_groups)
    cfg = parse_config([])  # train_gpt2.py's options: GPT-2's AdamW, whose lr is max_lr
    explicit = configure_optimizers(model, cfg, "cpu")
    assert explicit.state_dict() == opt.state_dict()
    with pytest.raises(ValueError, match="optimizer must be 'adamw' or 'muon'"):
        configure_optimizers(model, dataclasses.replace(cfg, optimizer="sgd"), "cpu")


@pytest.mark.parametrize("switches", [{}, FAST], ids=["gpt2", "fast"])
def test_muon_gets_the_block_matrices_adamw_the_rest(switches, capsys):
    model = GPT(GPTConfig(**SMALL, **switches))
    opt = muon_optimizer(model, weight_decay=0.05)
    assert isinstance(opt, MuonAdamW) and capsys.readouterr().out == ""
    assert type(opt.muon) is torch.optim.Muon and type(opt.adamw) is torch.optim.AdamW
    assert opt.param_groups == opt.muon.param_groups + opt.adamw.param_groups
    matrices = [m.weight for b in model.transformer.h for m in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj)]
    muon, *adam = opt.param_groups
    assert sorted(ids(muon["params"])) == sorted(ids(matrices))
    assert muon["lr"] == 0.02 and muon["weight_decay"] == 0.05 and muon["momentum"] == 0.95 and muon["nesterov"]
    # the head (the tied wte too), the embeddings, the gains and biases: each parameter in exactly one group
    head, embeddings, scalars = adam
    assert ids(head["params"]) == [id(model.lm_head.weight)] and head["lr"] == 0.004
    expected = [] if model.config.tie_embeddings else [model.transformer.wte.weight]
    expected += [model.transformer.wpe.weight] if "wpe" in model.transformer else []
    assert ids(embeddings["params"]) == ids(expected) and embeddings["lr"] == 0.2
    assert all(p.dim() == 1 for p in scalars["params"]) and scalars["lr"] == 0.04
    assert all(g["weight_decay"] == 0.0 and g["betas"] == (0.8, 0.95) and g["eps"] == 1e-10 for g in adam)
    everything = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(everything) == sorted(ids(model.parameters()))  # parameters() yields a tied matrix once
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.num_params()
    for g in opt.param_groups:  # each group's lr relative to the schedule's peak, Muon's lr
        assert_close(g["lr_scale"], g["lr"] / 0.02)
    muon_optimizer(model, verbose=True)
    assert "Muon: 8 matrices" in capsys.readouterr().out


def test_muon_trains_the_fast_model():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL, **FAST))
    opt = muon_optimizer(model)
    x, y = pattern_batch()
    losses = []
    for _ in range(15):
        opt.zero_grad(set_to_none=True)
        _, loss = model(x, y)
        loss.backward()
        set_lr(opt, 0.02)
        opt.step()
        losses.append(loss.item())
    assert_close(losses[0], math.log(256))  # zero_init, untied: the uniform distribution
    assert losses[-1] < 0.6 * losses[0], losses


def test_lr_scale_gives_every_group_its_own_lr():
    """The schedule's lr times lr_scale is each group's lr: a step of MuonAdamW at a quarter of the schedule's peak
    (Muon's lr) is a step of torch's Muon and AdamW built with a quarter of Muon's lr, head_lr, embedding_lr and
    scalar_lr."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL, **FAST))
    ref = GPT(GPTConfig(**SMALL, **FAST))
    ref.load_state_dict(model.state_dict())
    opt = muon_optimizer(model, weight_decay=0.1)
    set_lr(opt, 0.25 * 0.02)
    assert [g["lr"] for g in opt.param_groups] == [0.25 * lr for lr in (0.02, 0.004, 0.2, 0.04)]
    r = dict(ref.named_parameters())
    blocks = [p for n, p in r.items() if n.startswith("transformer.h.") and p.dim() == 2]
    ref_muon = torch.optim.Muon(blocks, lr=0.25 * 0.02, weight_decay=0.1, momentum=0.95, nesterov=True)
    ref_adamw = torch.optim.AdamW([{"params": [r["lm_head.weight"]], "lr": 0.25 * 0.004},
                                   {"params": [r["transformer.wte.weight"]], "lr": 0.25 * 0.2},
                                   {"params": [p for p in r.values() if p.dim() == 1], "lr": 0.25 * 0.04}],
                                  betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0)
    x, y = pattern_batch()
    for _ in range(2):  # two steps: zero_init leaves c_fc's first gradient at 0
        for m, opts in ((model, [opt]), (ref, [ref_muon, ref_adamw])):
            _, loss = m(x, y)
            loss.backward()
            for o in opts:
                o.step()
                o.zero_grad(set_to_none=True)
    for name, p in model.named_parameters():
        assert_close(p, r[name], rtol=1e-6, atol=0, msg=name)
    assert not torch.equal(model.lm_head.weight, torch.zeros_like(model.lm_head.weight))  # it did learn


def test_muon_state_dict_resumes_exactly(tmp_path):
    """state_dict -> torch.save -> torch.load(weights_only=True) -> a fresh optimizer (as checkpoints load it): the
    next steps give bitwise the parameters and state of the run that went on, at the lrs set after loading."""
    from checkpoints import load_optimizer_state

    torch.manual_seed(0)
    x, y = pattern_batch()
    model = GPT(GPTConfig(**SMALL, **FAST))
    opt = muon_optimizer(model)

    def step(m, o, lr):
        o.zero_grad(set_to_none=True)
        _, loss = m(x, y)
        loss.backward()
        set_lr(o, lr)
        o.step()

    for i in range(3):
        step(model, opt, 0.02 * (1 - i / 10))
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed = GPT(GPTConfig(**SMALL, **FAST))
    resumed.load_state_dict(saved["model"])
    resumed_opt = muon_optimizer(resumed)
    load_optimizer_state(resumed_opt, saved["optimizer"])
    for i in range(3, 5):  # lrs the checkpoint never saw: set through param_groups after the load
        step(model, opt, 0.02 * (1 - i / 10))
        step(resumed, resumed_opt, 0.02 * (1 - i / 10))
    for (name, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name
    a, b = opt.state_dict(), resumed_opt.state_dict()
    assert a["param_groups"] == b["param_groups"] and a["state"].keys() == b["state"].keys()
    for i, state in a["state"].items():
        assert state.keys() == b["state"][i].keys()
        assert all(torch.equal(v, b["state"][i][k]) for k, v in state.items()), i
    assert len(a["state"]) == len(list(model.parameters()))  # Muon's momenta and AdamW's moments, one id each


def test_muon_needs_its_torch_and_macos_14_on_mps(monkeypatch):
    """torch.optim.Muon ships from torch 2.9, and its bf16 Newton-Schulz runs on mps from macOS 14: one clear line
    each, naming what is needed; fused AdamW on cuda and mps."""
    import optim
    from options import ConfigError

    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: False)
    with pytest.raises(ConfigError, match=r"^--optimizer=muon on mps needs macOS 14 or later"):
        optim.check_muon("mps")
    optim.check_muon("cpu")
    monkeypatch.delattr(torch.optim, "Muon")
    with pytest.raises(ConfigError, match=r"^--optimizer=muon \(--recipe=fast\) needs torch>=2\.9 "):
        optim.check_muon("cuda")
    assert optim.FUSED_ADAMW_DEVICES == ("cuda", "mps")
