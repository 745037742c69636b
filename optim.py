"""How the weights move: the optimizers, the learning-rate schedule, and one optimizer step over micro-batches.

    python -c "import optim; print(optim.get_lr(715, max_lr=6e-4, min_lr=6e-5, warmup_steps=715, max_steps=19073))"
"""

import contextlib
import math

import torch
import torch.distributed as dist

from options import ConfigError
from runtime import autocast


# -----------------------------------------------------------------------------
# the optimizers

def configure_optimizers(model, cfg, device_type, verbose=False):
    """GPT-2's AdamW, or (cfg.optimizer "muon") Muon for the blocks' matrices, AdamW for the rest; peak cfg.max_lr."""
    if cfg.optimizer not in ("adamw", "muon"):
        raise ValueError(f"optimizer must be 'adamw' or 'muon', got {cfg.optimizer!r}")
    kw = dict(lr=cfg.max_lr, weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
              device_type=device_type, verbose=verbose)
    if cfg.optimizer == "muon":
        return muon_adamw(model, embedding_lr=cfg.embedding_lr, head_lr=cfg.head_lr, scalar_lr=cfg.scalar_lr, **kw)
    return adamw(model, **kw)


MUON_MOMENTUM = 0.95  # Muon's (Nesterov) momentum: torch's default, modded-nanogpt's and nanochat's
FUSED_ADAMW_DEVICES = ("cuda", "mps")  # one kernel for all parameters instead of a loop of small ones per tensor
MUON_TORCH = "2.9"  # the first torch with torch.optim.Muon


def check_muon(device_type):
    """ConfigError where torch.optim.Muon cannot run: a torch before 2.9, or mps before macOS 14 (its Newton-Schulz
    iterations run in bf16, which Metal supports from macOS 14 on)."""
    if not hasattr(torch.optim, "Muon"):
        raise ConfigError(f"--optimizer=muon (--recipe=fast) needs torch>={MUON_TORCH} (torch.optim.Muon); this is "
                          f"torch {torch.__version__}: pip install 'torch>={MUON_TORCH}', or --optimizer=adamw")
    if device_type == "mps" and not torch.backends.mps.is_macos_or_newer(14, 0):
        raise ConfigError("--optimizer=muon on mps needs macOS 14 or later (bf16 on Metal); use --optimizer=adamw "
                          "or --device=cpu here")


def adamw(model, *, lr, weight_decay, betas, eps, device_type, verbose=False):
    """GPT-2's AdamW: weight decay on the matrices and embeddings (2-D+) only; biases and norm gains undecayed."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    fused = device_type in FUSED_ADAMW_DEVICES
    if verbose:
        print(f"decayed tensors: {len(decay)} ({sum(p.numel() for p in decay):,} parameters), undecayed tensors: "
              f"{len(no_decay)} ({sum(p.numel() for p in no_decay):,} parameters), fused AdamW: {fused}")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **({"fused": True} if fused else {}))


def muon_adamw(model, *, lr, embedding_lr, head_lr, scalar_lr, weight_decay, betas, eps, device_type, verbose=False,
               momentum=MUON_MOMENTUM):
    """A MuonAdamW: Muon at lr (momentum, weight_decay) for the blocks' matrices; AdamW (betas, eps, no weight decay)
    for the lm_head (tied or not) at head_lr, the untied wte and the wpe at embedding_lr, the norm gains and biases
    at scalar_lr. Each group's "lr_scale" is its lr over lr, the schedule's peak: train_step sets group["lr"] to the
    schedule's lr times it."""
    # Two optimizers. Muon (Keller Jordan, "Muon: An optimizer for hidden layers in neural networks", 2024)
    # replaces the momentum of each weight matrix by its nearest semi-orthogonal matrix (Newton-Schulz
    # iterations): every direction of the update moves by the same amount, where a raw gradient is dominated by a
    # few. That is for the blocks' Linear weights, maps from vectors to vectors (the fused c_attn, (3C, C), is
    # orthogonalized as one matrix). The embeddings are lookup tables (row i learns only when token i occurs:
    # orthogonalizing would mix the rows of tokens that were not seen), the lm_head a classifier over the
    # vocabulary, the gains and biases no matrices at all: for those Adam stays the standard (Keller Jordan's
    # write-up, modded-nanogpt, nanochat).
    # The default lrs are nanochat's, tuned at n_embd 768 (matrix 0.02, embedding 0.2, unembedding 0.004; its
    # AdamW ones scale as (n_embd / 768) ** -0.5, which the caller applies), and modded-nanogpt's 0.04 for its
    # scalar parameters. The head's lr is 50x below the embedding's: a head update moves every logit of every
    # position, a wte row only its own token's input, which the blocks see through their pre-norms. A tied
    # wte/lm_head is the head too, so it takes head_lr.
    heads, matrices, embeddings, scalars = [], [], [], []
    for name, p in model.named_parameters():  # a tied wte/lm_head once
        if not p.requires_grad:
            continue
        if p is model.lm_head.weight:
            heads.append(p)
        elif name.startswith("transformer.h.") and p.dim() == 2:
            matrices.append(p)
        elif p.dim() >= 2:
            embeddings.append(p)
        else:
            scalars.append(p)

    def group(params, group_lr, **kw):
        return {"params": params, "lr": group_lr, "lr_scale": group_lr / lr, **kw}

    # Weight decay on Muon's matrices only, decoupled (p *= 1 - lr * weight_decay every step: it follows the
    # schedule). The AdamW groups get none: a wte row would shrink at every step but learn only when its token
    # occurs, eroding the rare tokens, and neither nanochat nor modded-nanogpt decays embeddings or the head;
    # gains and biases are not decayed in the AdamW default either. Muon's lr is ~30x AdamW's, and so is the decay
    # per step for the same weight_decay: modded-nanogpt and nanochat use 0.
    # Nesterov momentum, Keller Jordan's quintic Newton-Schulz (5 steps) and his lr adjustment
    # (lr * sqrt(max(1, fan_out / fan_in)): the same update RMS for tall matrices) are torch's defaults.
    check_muon(device_type)
    muon = torch.optim.Muon([group(matrices, lr, weight_decay=weight_decay)], momentum=momentum,
                            nesterov=True)
    adam_groups = [group(ps, group_lr, weight_decay=0.0) for ps, group_lr in
                   ((heads, head_lr), (embeddings, embedding_lr), (scalars, scalar_lr)) if ps]  # no empty groups
    fused = device_type in FUSED_ADAMW_DEVICES
    adam = torch.optim.AdamW(adam_groups, betas=betas, eps=eps, **({"fused": True} if fused else {}))
    if verbose:
        print(f"Muon: {len(matrices)} matrices ({sum(p.numel() for p in matrices):,} parameters), lr {lr:g}, "
              f"weight decay {weight_decay}; AdamW (fused: {fused}): " + ", ".join(
                  f"{len(g['params'])} tensors ({sum(p.numel() for p in g['params']):,} parameters) lr {g['lr']:.4g}"
                  for g in adam_groups))
    return MuonAdamW(muon, adam)


class MuonAdamW:
    """A torch.optim.Muon and a torch.optim.AdamW as the one optimizer a training loop and its checkpoints expect."""

    def __init__(self, muon, adamw):
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self):
        # the optimizers' own group dicts, so setting group["lr"] reaches them; a property, because load_state_dict
        # replaces each optimizer's list of groups with new dicts
        return self.muon.param_groups + self.adamw.param_groups

    def zero_grad(self, set_to_none=True):
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def step(self):
        self.muon.step()
        self.adamw.step()

    def state_dict(self):
        """The layout of one torch optimizer's, {"state": {id: {...}}, "param_groups": [...]}, Muon's parameters
        numbered first: code that reads or merges a single optimizer's state (param_groups zipped with the current
        ones, torch.load(weights_only=True)) reads this one too."""
        muon, adamw = self.muon.state_dict(), self.adamw.state_dict()
        n = sum(len(g["params"]) for g in muon["param_groups"])  # AdamW's ids continue after Muon's
        groups = muon["param_groups"] + [{**g, "params": [i + n for i in g["params"]]} for g in adamw["param_groups"]]
        state = {**muon["state"], **{i + n: s for i, s in adamw["state"].items()}}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict):
        k = len(self.muon.param_groups)  # the first k saved groups are Muon's, holding ids 0..n-1
        groups, state = state_dict["param_groups"], state_dict["state"]
        n = sum(len(g["params"]) for g in groups[:k])
        self.muon.load_state_dict({"state": {i: s for i, s in state.items() if i < n}, "param_groups": groups[:k]})
        adam_groups = [{**g, "params": [i - n for i in g["params"]]} for g in groups[k:]]
        adam_state = {i - n: s for i, s in state.items() if i >= n}
        self.adamw.load_state_dict({"state": adam_state, "param_groups": adam_groups})


# -----------------------------------------------------------------------------
# the schedule and the step

def get_lr(step, *, max_lr, min_lr, warmup_steps, max_steps, schedule="cosine", warmdown_frac=0.0):
    """Learning rate of optimizer step `step` (0-based): linear warmup to max_lr, then cosine decay to min_lr."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps  # step 0 already learns; step warmup_steps - 1 is at max_lr
    if step >= max_steps:
        return min_lr
    if schedule == "warmdown":
        return warmdown_lr(step, max_lr=max_lr, min_lr=min_lr, max_steps=max_steps, warmdown_frac=warmdown_frac)
    decay_ratio = (step - warmup_steps) / (max_steps - warmup_steps)  # 0 -> 1
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # 1 -> 0
    return min_lr + coeff * (max_lr - min_lr)


def warmdown_lr(step, *, max_lr, min_lr, max_steps, warmdown_frac):
    """get_lr's schedule "warmdown" after the warmup: max_lr until the last warmdown_frac of the steps, then linear
    to min_lr."""
    decay_start = max_steps - round(warmdown_frac * max_steps)
    if step < decay_start:
        return max_lr
    return max_lr + (step - decay_start) / (max_steps - decay_start) * (min_lr - max_lr)  # max_lr -> min_lr


def get_muon_momentum(step, warmup_steps, start=0.85, end=MUON_MOMENTUM):
    """Muon's momentum at step `step` (0-based): linear from start to end over warmup_steps (nanochat's 0.85 -> 0.95
    over 300), then end. Early gradients turn fast: 0.85 averages over ~7 steps (1 / (1 - momentum)), 0.95 over ~20."""
    if step >= warmup_steps:
        return end
    frac = step / warmup_steps
    return (1 - frac) * start + frac * end


def due(step, every, last):
    """Whether a periodic task (every N steps, 0: never) runs at step: at its multiples and at the last step."""
    return every > 0 and (step % every == 0 or last)


def train_step(model, optimizer, batches, *, lr, grad_clip, device_type, autocast_dtype, ddp, also_reduce=None,
               momentum=None):
    """One optimizer step over the micro-batches [(x, y), ...] -> (mean loss over all ranks, gradient norm before
    clipping) as device tensors: no host sync. grad_clip 0: no clipping; momentum: Muon's (None: as it is)."""
    optimizer.zero_grad(set_to_none=True)
    grad_accum_steps = len(batches)
    loss_accum = torch.zeros((), device=batches[0][0].device)
    for micro_step, (x, y) in enumerate(batches):
        # DDP all-reduces the gradients in backward: skip it for the micro-steps before the last, sync the sum once
        with model.no_sync() if ddp and micro_step < grad_accum_steps - 1 else contextlib.nullcontext():
            with autocast(device_type, autocast_dtype):
                _, loss = model(x, y)
            # backward() sums the micro-steps' gradients: loss / grad_accum_steps makes that sum the batch's mean
            loss = loss / grad_accum_steps
            loss_accum += loss.detach()  # a device tensor: no host sync in the loop
            loss.backward()
    if ddp:
        loss_accum = all_reduce_loss(loss_accum, also_reduce)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)  # Muon+AdamW: each group its own peak (muon_adamw)
        if momentum is not None and "momentum" in group:  # Muon's group (AdamW's have betas instead)
            group["momentum"] = momentum
    optimizer.step()
    return loss_accum, grad_norm


def all_reduce_loss(loss_accum, also_reduce=None):
    """The mean of loss_accum over the ranks, as DDP averaged the gradients (SUM / N: gloo has no AVG). also_reduce: a
    1-D device tensor replaced by its sum over the ranks in the same all-reduce (the stop flags: no collective of their
    own)."""
    packed = loss_accum.view(1) if also_reduce is None else torch.cat([loss_accum.view(1), also_reduce])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    if also_reduce is not None:
        also_reduce.copy_(packed[1:])
    return packed[0] / dist.get_world_size()
