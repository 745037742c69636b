"""GPT-2, numerically identical to transformers' GPT2LMHeadModel, with a KV cache and the fast recipes' switches."""

import dataclasses
import json
import os
from functools import partial

import torch
import torch.nn as nn
from torch.nn import functional as F

GPT2_VOCAB_SIZE = 50257  # the real GPT-2 BPE vocabulary
PADDED_VOCAB_SIZE = 50304  # GPT-2's padded to 393 * 128: friendlier matmul shapes on a GPU; train_gpt2.py's default
CHOICES = {"norm": ("layernorm", "rmsnorm", "rmsnorm_nogain"), "mlp": ("gelu", "swiglu", "relu2"),
           "pos_emb": ("learned", "rope"),
           **dict.fromkeys(("embed_norm", "qk_norm", "tie_embeddings", "bias", "zero_init"), (True, False))}


@dataclasses.dataclass
class GPTConfig:
    block_size: int = 1024  # max sequence length
    vocab_size: int = GPT2_VOCAB_SIZE
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    norm: str = "layernorm"  # "layernorm" (GPT-2) | "rmsnorm" | "rmsnorm_nogain" (no gains, in fp32: nanochat's)
    norm_eps: float = 1e-5  # the eps of every norm, QK-norm's too: GPT-2's 1e-5 (nanochat's is 1e-6)
    embed_norm: bool = False  # a norm right after the token embedding (nanochat's)
    mlp: str = "gelu"  # "gelu" (GPT-2) | "swiglu" | "relu2" (relu(x)**2, 4 * n_embd hidden)
    pos_emb: str = "learned"  # "learned" (GPT-2's wpe table) | "rope" (rotary embeddings on q and k, no wpe)
    qk_norm: bool = False  # RMS-normalize q and k of every head before attention
    tie_embeddings: bool = True  # one matrix for wte and lm_head (GPT-2); False: two
    bias: bool = True  # biases in the Linear layers and LayerNorms (GPT-2); False: none
    logit_softcap: float = 0.0  # > 0: logits = cap * tanh(logits / cap); 0: raw logits (GPT-2)
    zero_init: bool = False  # an init (still GPT-2): the residual projections, and an untied head, start at zero
    init: str = "gpt2"  # "gpt2": N(0, 0.02), residual projections / sqrt(2 * n_layer) | "nanochat": its gpt.py's

    def __post_init__(self):
        for name, choices in CHOICES.items():
            value = getattr(self, name)
            if value not in choices or not isinstance(value, type(choices[0])):  # 1 == True, but is no bool
                raise ValueError(f"{name} must be {one_of(choices)}, got {value!r}")
        eps, cap = self.norm_eps, self.logit_softcap
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < float("inf"):
            raise ValueError(f"norm_eps must be a finite number > 0, got {eps!r}")
        if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not 0 <= cap < float("inf"):
            raise ValueError(f"logit_softcap must be a finite number >= 0 (0: no cap), got {cap!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.pos_emb == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"pos_emb='rope' rotates pairs of dimensions: the head size "
                             f"n_embd / n_head = {self.n_embd // self.n_head} must be even")
        if self.init not in ("gpt2", "nanochat"):
            raise ValueError(f"init must be 'gpt2' or 'nanochat', got {self.init!r}")
        if self.init == "nanochat" and self.tie_embeddings:
            raise ValueError("init='nanochat' needs tie_embeddings=False: its wte of std 1 would be the head too")

    def non_gpt2_fields(self):
        """{name: value} of the architecture fields that differ from GPT-2's; never zero_init or init, inits only."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        names = ("norm", "norm_eps", "embed_norm", "mlp", "pos_emb", "qk_norm", "tie_embeddings", "bias",
                 "logit_softcap")
        return {name: getattr(self, name) for name in names if getattr(self, name) != defaults[name]}

    @property
    def is_gpt2(self):
        """True for the exact GPT-2 architecture (the one transformers' GPT2LMHeadModel can run)."""
        return not self.non_gpt2_fields()

    @classmethod
    def from_dict(cls, d):
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"unknown GPTConfig fields: {', '.join(unknown)}")
        return cls(**d)


def one_of(choices):
    """("a", "b", "c") as "'a', 'b' or 'c'"."""
    return f"{', '.join(map(repr, choices[:-1]))} or {choices[-1]!r}"


class RMSNormNoGain(nn.Module):
    def __init__(self, eps):
        super().__init__()
        self.eps = eps

    def forward(self, x):  # in fp32 whatever x's dtype, as transformers' NanoChatRMSNorm (nanochat's)
        return F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).type_as(x)


def make_norm(config):
    if config.norm == "rmsnorm":  # no mean, no bias; GPT-2's LayerNorm has both
        return nn.RMSNorm(config.n_embd, eps=config.norm_eps)
    if config.norm == "rmsnorm_nogain":  # nothing to learn: the blocks' matrices scale what they read
        return RMSNormNoGain(config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


ROPE_BASE = 10000.0  # RoPE's frequency base (RoFormer, Su et al. 2021; Llama): dimension pair i turns by base^(-2i/hs)


def rope_tables(block_size, head_size):
    """cos and sin of the rotation angle of every (position, dimension pair): two (block_size, head_size / 2)."""
    inv_freq = ROPE_BASE ** (-torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)  # (hs / 2,)
    angles = torch.outer(torch.arange(block_size, dtype=torch.float32), inv_freq)  # (block_size, hs / 2)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate the pairs (x[..., i], x[..., i + hs/2]) of x (B, nh, T, hs) by their position's angles, cos/sin (T, hs/2).
    q.k then depends on the two positions only through their difference: attention sees relative positions."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, nh, T, hs / 2) each
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # bf16 under autocast: no fp32 copy of q and k
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class KVCache:
    """One layer's keys and values for generation: max_len positions, allocated on first use."""

    def __init__(self, max_len):
        self.max_len, self.pos, self.k, self.v = max_len, 0, None, None  # pos: positions cached

    def update(self, k, v):
        """Store k, v (B, nh, T, hs) as positions pos..pos+T-1; return the keys and values of all pos+T positions."""
        B, nh, T, hs = k.shape
        if self.k is None:  # in the dtype k and v come in (bf16 under autocast)
            self.k = k.new_empty(B, nh, self.max_len, hs)
            self.v = v.new_empty(B, nh, self.max_len, hs)
        self.k[:, :, self.pos:self.pos + T] = k
        self.v[:, :, self.pos:self.pos + T] = v
        self.pos += T
        return self.k[:, :, :self.pos], self.v[:, :, :self.pos]  # (B, nh, pos, hs) each


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.qk_norm, self.norm_eps = config.n_head, config.qk_norm, config.norm_eps
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v of all heads: one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x, rope=None, kv_cache=None):
        B, T, C = x.size()  # batch, sequence length, embedding dim (n_embd)
        q, k, v = self.c_attn(x).split(C, dim=2)
        # nh = number of heads, hs = head size, C = nh * hs
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if self.qk_norm:  # q, k of RMS 1 bound every attention logit by sqrt(hs): no blow-up at high lrs
            q, k = (F.rms_norm(t, (t.size(-1),), eps=self.norm_eps) for t in (q, k))
        if rope is not None:  # (cos, sin) of these T positions: rotary embeddings
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv_cache is not None:  # generation: these T follow the cached positions
            y = self._attend_cached(q, k, v, kv_cache)  # (B, nh, T, hs)
        else:  # softmax(q k^T / sqrt(hs)) v, causal, never materializing the (T, T) matrix (flash attention)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs side by side
        return self.c_proj(y)

    @staticmethod
    def _attend_cached(q, k, v, kv_cache):
        """Attention of q (B, nh, T, hs) to kv_cache's positions and these T, whose k, v join the cache."""
        past, T = kv_cache.pos, q.size(2)
        k, v = kv_cache.update(k, v)  # (B, nh, past + T, hs): the cached positions, then these T
        mask = None  # one new token after cached ones (T == 1) sees every key: no mask
        if past and T > 1:  # SDPA's is_causal aligns the mask top-left: query i must see keys 0..past+i
            mask = torch.ones(T, past + T, dtype=torch.bool, device=q.device).tril(diagonal=past)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=past == 0)


def relu2(h):
    """ReLU² (Primer, So et al. 2021): cheaper than GELU's tanh, and sparse."""
    return F.relu(h).square()


def swiglu(h):
    """SwiGLU (Shazeer 2020): h holds a gate and a value side by side."""
    gate, value = h.chunk(2, dim=-1)
    return F.silu(gate) * value


ACTIVATIONS = {"gelu": partial(F.gelu, approximate="tanh"), "swiglu": swiglu, "relu2": relu2}  # gelu: GPT-2's gelu_new


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        gated = config.mlp == "swiglu"  # three matrices: 8/3 * n_embd hidden (2048 at 768) keeps GELU's parameters
        hidden = -(-8 * config.n_embd // (3 * 64)) * 64 if gated else 4 * config.n_embd
        self.c_fc = nn.Linear(config.n_embd, 2 * hidden if gated else hidden, bias=config.bias)  # gate, value
        self.activation = ACTIVATIONS[config.mlp]
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)

    def forward(self, x):
        return self.c_proj(self.activation(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, rope=None, kv_cache=None):
        # pre-LN: the residual stream x is never normalized, so gradients flow straight through it
        x = x + self.attn(self.ln_1(x), rope, kv_cache)
        return x + self.mlp(self.ln_2(x))


LOSS_CHUNK_ROWS = 256  # softcap_cross_entropy's rows per chunk: 52 MB of fp32 logits; fewer are slower on CPU


def softcap_cross_entropy(x, weight, targets, cap, chunk_rows):
    """F.cross_entropy(cap * tanh(F.linear(x, weight).float() / cap), targets, ignore_index=-1) for hidden states x
    (..., C), weight (V, C) and targets (...), up to float rounding, chunk_rows rows at a time: the mean over the
    targets that are not -1, the matmuls in autocast's dtype as a plain F.linear's, the cap in fp32. The gradients wrt
    x and weight are computed in the forward pass, chunk by chunk (as Liger's fused linear cross-entropy): backward only
    scales them by the loss's gradient."""
    return _SoftcapCrossEntropy.apply(x.reshape(-1, x.size(-1)), weight, targets.reshape(-1), cap, chunk_rows)


class _SoftcapCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, cap, chunk_rows):
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        x_cap, wc = (x / cap).to(dtype), weight.to(dtype)  # as autocast casts them, once for all chunks
        valid = targets != -1
        safe = targets.masked_fill(~valid, 0)  # a gatherable index in the ignored rows, whose loss is then zeroed
        n = valid.sum()
        grads = any(ctx.needs_input_grad[:2])  # none under torch.no_grad (an eval)
        grad_x = torch.empty_like(x) if grads else None
        grad_w = torch.zeros_like(weight) if grads else None
        loss = torch.zeros((), device=x.device)
        with torch.autocast(device, enabled=False):
            for i in range(0, x.size(0), chunk_rows):
                rows = slice(i, i + chunk_rows)
                # (rows, V): tanh(z / cap) = y / cap for the raw logits z = x @ weight.T and the capped ones y
                t = F.linear(x_cap[rows], wc).float().tanh_()
                m = t.amax(dim=1, keepdim=True) * cap  # each row's largest y: exp(y - m) <= 1
                e = torch.add(-m, t, alpha=cap).exp_()  # exp(y - m)
                s = e.sum(dim=1, keepdim=True)
                # -log softmax(y)[target] = log(sum(exp(y - m))) + m - y[target]
                nll = (s.log() + m - cap * t.gather(1, safe[rows, None])).squeeze(1)
                loss += (nll * valid[rows]).sum()
                if not grads:
                    continue
                # dloss/dz = (softmax(y) - onehot(target)) * w * dy/dz, w a row's weight in the mean (1 / n, or 0 if
                # ignored), dy/dz = 1 - t^2: (e - s onehot(target)) (1 - t^2) times r = w / s, a factor per row
                # that scales the matmuls' (rows, C) operands instead of the (rows, V) gradient
                g = e.scatter_add_(1, safe[rows, None], -s).addcmul_(e, t.square_(), value=-1).to(dtype)
                r = valid[rows, None] / (n * s)
                grad_x[rows] = (g @ wc) * r
                x_r = (x[rows] * r).to(dtype)
                if grad_w.dtype == dtype:
                    grad_w.addmm_(g.t(), x_r)
                else:  # autocast's bf16 products, summed over the chunks in fp32
                    grad_w += g.t() @ x_r
        ctx.save_for_backward(grad_x, grad_w)
        return loss / n

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        return grad_x * grad_loss, grad_w * grad_loss, None, None, None


class GPT(nn.Module):
    chunked_loss = True  # softcap_cross_entropy where it applies (guards.fits_on_gpu measures the plain path)

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(wte=nn.Embedding(config.vocab_size, config.n_embd)))  # token embeddings
        if config.pos_emb == "learned":
            self.transformer.wpe = nn.Embedding(config.block_size, config.n_embd)  # position embeddings
        else:  # rotary embeddings: no table to learn
            self._init_rope()
        if config.embed_norm:
            self.transformer.ln_emb = make_norm(config)
        self.transformer.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.transformer.ln_f = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:  # GPT-2: one matrix maps tokens in and logits out, 38.6M of its 124M parameters
            self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        if config.zero_init or config.init == "nanochat":
            self._init_zero_or_nanochat()
        else:  # the stream sums 2 * n_layer residual projections: std / sqrt(2 * n_layer) keeps its variance
            for name, p in self.named_parameters():
                if name.endswith("c_proj.weight"):
                    nn.init.normal_(p, mean=0.0, std=0.02 * (2 * config.n_layer) ** -0.5)

    def _init_rope(self):
        """rope's cos and sin, computed once: buffers follow .to(device), non-persistent ones skip the state_dict."""
        cos, sin = rope_tables(self.config.block_size, self.config.n_embd // self.config.n_head)
        self.register_buffer("rope_cos", cos, persistent=False)  # (block_size, hs / 2)
        self.register_buffer("rope_sin", sin, persistent=False)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def _init_zero_or_nanochat(self):
        """The residual projections at zero, every block starting as the identity; zero_init zeroes an untied lm_head
        too (a tied one is also the input embedding, which must not be zero). An init, not an architecture."""
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.zeros_(p)
        if self.config.init == "nanochat":
            self._init_nanochat()
        if self.config.zero_init and not self.config.tie_embeddings:
            nn.init.zeros_(self.lm_head.weight)

    @torch.no_grad()
    def _init_nanochat(self):
        # nanochat's gpt.py init_weights, the residual projections at zero already. wte's rows at RMS 1, what the norm
        # after the embedding makes of them anyway: AdamW's steps (of about its lr per element) then change a row by a
        # fraction of its size, where 0.02 rows would be swamped by the first one. The head small, not zero: its
        # gradient into the blocks is then small but not zero, and Muon's orthogonalized updates do not depend on a
        # gradient's size, so the blocks learn from the first step on.
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        bound = (3 / self.config.n_embd) ** 0.5  # uniform(-b, b) has std b / sqrt(3), and no outliers
        for name, p in self.transformer.h.named_parameters():
            if p.dim() == 2 and not name.endswith("c_proj.weight"):  # c_attn, c_fc: n_embd inputs
                nn.init.uniform_(p, -bound, bound)

    def num_params(self, non_embedding=False):
        """Parameters, a tied wte/lm_head once; non_embedding: less the tables that are looked up, not multiplied."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:  # wpe and wte, unless wte is the lm_head too
            tables = [m.weight for m in self.transformer.values() if isinstance(m, nn.Embedding)]
            n -= sum(t.numel() for t in tables if t is not self.lm_head.weight)
        return n

    def flops_per_token(self, seq_len):
        """Training FLOPs per token: 6 per matmul weight, attention's 12 * n_layer * n_embd * seq_len (PaLM's)."""
        return 6 * self.num_params(non_embedding=True) + 12 * self.config.n_layer * self.config.n_embd * seq_len

    def forward(self, idx, targets=None, positions=None, kv_cache=None, return_logits=None):
        B, T = idx.size()  # token ids; targets (B, T): the next ones, -1 where no loss is taken
        start = 0 if kv_cache is None else kv_cache[0].pos  # position of idx[:, 0]: after generate's cached ones
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of length {start + T} is longer than block_size {self.config.block_size}")
        x = self.transformer.wte(idx)  # (B, T, n_embd)
        if self.config.embed_norm:  # the blocks read normalized embeddings, whatever the scale of wte's rows
            x = self.transformer.ln_emb(x)
        rope = None
        if self.config.pos_emb == "rope":
            rope = (self.rope_cos[start:start + T], self.rope_sin[start:start + T])  # (T, hs / 2) each
        else:
            pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
            x = x + self.transformer.wpe(pos)  # (B, T, n_embd) + (T, n_embd) broadcast
        for i, block in enumerate(self.transformer.h):
            x = block(x, rope, None if kv_cache is None else kv_cache[i])
        x = self.transformer.ln_f(x)
        if positions is not None:  # (B, E): only those positions' logits (an eval scoring a few skips most of lm_head)
            x = torch.gather(x, 1, positions.unsqueeze(-1).expand(-1, -1, x.size(-1)))  # (B, E, n_embd)
        if (self.config.logit_softcap and targets is not None and not return_logits and self.chunked_loss
                and not torch.compiler.is_compiling()):  # torch.compile fuses the plain path below instead
            # eager, the same loss in chunks of rows: the (B*T, V) fp32 capped logits are never all in memory, and
            # fewer passes go over them (docs/training.md)
            return None, softcap_cross_entropy(x, self.lm_head.weight, targets, self.config.logit_softcap,
                                               LOSS_CHUNK_ROWS)
        logits = self.lm_head(x)  # (B, T or E, vocab_size), in autocast's dtype: the dtype of the logits returned
        scores = self._softcap(logits) if self.config.logit_softcap else logits
        if targets is None:
            return scores.to(logits.dtype), None
        loss = F.cross_entropy(scores.view(-1, scores.size(-1)), targets.reshape(-1), ignore_index=-1)  # -1: ignored
        return (scores.to(logits.dtype) if return_logits else None), loss  # `_, loss = model(x, y)` holds no GBs

    def _softcap(self, logits):
        """cap * tanh(logits / cap): no logit runs away (Gemma 2). In fp32: tanh's backward is 1 - y^2 of its own
        output, which bf16 rounds to 0 once |y| is near 1 (nanochat and modded-nanogpt cap logits.float() too); inside
        forward, so torch.compile fuses it."""
        cap = self.config.logit_softcap
        return cap * torch.tanh(logits.float() / cap)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None, use_cache=True):
        """Append max_new_tokens sampled tokens to idx (B, T): top-k sampling, greedy when temperature is 0.
        Only the last block_size tokens are fed, so any length works. A model with the padded vocabulary never
        samples the padding ids (>= 50257), which are no GPT-2 tokens.
        use_cache: run the prompt once, keeping every layer's keys and values, then feed one token per step that
        attends to them: the same tokens as use_cache=False, which feeds the whole sequence every step. Past
        block_size the window slides, every position shifts and the cache is stale: from then on each step is a
        full forward pass over the last block_size tokens, exactly as without the cache. The sampling is stream's."""
        return torch.cat([idx, *self.stream(idx, max_new_tokens, temperature, top_k, generator, use_cache)], dim=1)

    @torch.no_grad()
    def stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None, use_cache=True,
               num_tokens=GPT2_VOCAB_SIZE):
        """generate's tokens one step at a time: yields the (B, 1) ids sampled at each step, so that a caller can
        show them as they come and stop early (chat.py stops at <|assistant_end|>: closing the generator ends it).
        num_tokens: only ids below it are sampled, GPT-2's 50257 by default; a chat model's special tokens follow
        GPT-2's (tokenizer.CHAT_VOCAB_SIZE)."""
        block_size = self.config.block_size
        cache = None
        for _ in range(max_new_tokens):
            B, T = idx.size()
            if not use_cache or T > block_size:
                logits, _ = self(idx[:, -block_size:])
            elif cache is None:  # prefill, the lm_head at the last position only: it is all sampling needs
                cache = [KVCache(min(block_size, T + max_new_tokens)) for _ in self.transformer.h]
                last = torch.full((B, 1), T - 1, dtype=torch.long, device=idx.device)
                logits, _ = self(idx, positions=last, kv_cache=cache)
            else:  # the newest token, at position T - 1, after the T - 1 cached ones
                logits, _ = self(idx[:, -1:], kv_cache=cache)
            logits = logits[:, -1, :].float()  # (B, vocab_size)
            if self.config.vocab_size > num_tokens:
                logits[:, num_tokens:] = -float("inf")
            if temperature == 0:
                next_id = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]  # (B, 1)
                    logits = logits.masked_fill(logits < kth, -float("inf"))
                probs = F.softmax(logits, dim=-1)
                # multinomial on the CPU when the generator lives there: one generator then works for any device
                gen_device = generator.device if generator is not None else probs.device
                next_id = torch.multinomial(probs.to(gen_device), 1, generator=generator).to(idx.device)
            idx = torch.cat((idx, next_id), dim=1)
            yield next_id

    @classmethod
    def from_pretrained(cls, name_or_path):
        """Load a transformers GPT-2 checkpoint: one of gpt2, gpt2-medium, gpt2-large, gpt2-xl (or any hub id), or a
        local directory with config.json and model.safetensors / pytorch_model.bin; or a local NanoChat directory
        (export.py's of a --recipe=fast model). Offline (HF_HUB_OFFLINE, or a hub that does not answer) a hub id
        loads from the local HF cache only, or fails at once."""
        from huggingface_hub import constants
        from files import hub_offline
        from transformers import GPT2LMHeadModel, NanoChatForCausalLM

        offline, model_type = "", "gpt2"  # offline: why only the local HF cache can serve a hub id
        if os.path.isdir(name_or_path):
            model_type = _check_hf_dir(name_or_path)
        elif os.path.exists(name_or_path) or name_or_path.startswith((".", "/", "~")):
            raise ValueError(f"{name_or_path}: not a directory holding a transformers GPT-2 checkpoint")
        else:
            offline = hub_offline(constants.HF_HUB_OFFLINE)
        kind, hf_class = {"gpt2": ("GPT-2", GPT2LMHeadModel), "nanochat": ("NanoChat", NanoChatForCausalLM)}[model_type]
        try:
            hf = hf_class.from_pretrained(name_or_path, local_files_only=bool(offline))
        except Exception as e:  # network, hub id, or file format: say which model and why, in one line
            if offline:
                raise ValueError(f"could not load GPT-2 {name_or_path!r}: {offline} and not in the local cache; "
                                 "pass a local transformers directory instead") from None
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"could not load {kind} {name_or_path!r}: {first_line}") from None
        if model_type == "nanochat":
            return cls._from_nanochat(hf, name_or_path)
        hf_config = hf.config
        problems = []
        if hf_config.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
            problems.append(f"activation_function={hf_config.activation_function!r}")
        if hf_config.n_inner not in (None, 4 * hf_config.n_embd):
            problems.append(f"n_inner={hf_config.n_inner}")
        if hf_config.layer_norm_epsilon != 1e-5:
            problems.append(f"layer_norm_epsilon={hf_config.layer_norm_epsilon}")
        if not hf_config.scale_attn_weights or hf_config.scale_attn_by_inverse_layer_idx:
            problems.append("non-standard attention scaling")
        if problems:
            raise ValueError(f"{name_or_path}: GPT-2 variant this model cannot represent: {', '.join(problems)}")
        config = GPTConfig(block_size=hf_config.n_positions, vocab_size=hf_config.vocab_size,
                           n_layer=hf_config.n_layer, n_head=hf_config.n_head, n_embd=hf_config.n_embd)
        model = cls(config)
        sd = model.state_dict()
        hf_sd = {k: v for k, v in hf.state_dict().items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
        missing = sorted(set(sd) - set(hf_sd))
        if missing:
            raise ValueError(f"{name_or_path}: checkpoint lacks {len(missing)} tensors, e.g. {missing[0]}")
        with torch.no_grad():
            for k, v in sd.items():
                # transformers' GPT-2 uses Conv1D modules whose weights are (in, out): transpose to nn.Linear's
                v.copy_(hf_sd[k].t() if is_conv1d_weight(k) else hf_sd[k])
        return model


    @classmethod
    def _from_nanochat(cls, hf, path):
        """transformers' NanoChatForCausalLM hf, loaded from path, as the GPT of its architecture (--recipe=fast's)."""
        h = hf.config
        rope = h.rope_parameters or {}
        problems = []
        if h.vocab_size > PADDED_VOCAB_SIZE:  # another tokenizer's (nanochat's own has 65536): ours is GPT-2's BPE
            problems.append(f"vocab_size={h.vocab_size} (GPT-2's tokenizer, padded: {PADDED_VOCAB_SIZE})")
        if h.hidden_act != "relu2" or h.intermediate_size != 4 * h.hidden_size:
            problems.append(f"hidden_act={h.hidden_act!r}, intermediate_size={h.intermediate_size}")
        if h.num_key_value_heads != h.num_attention_heads:
            problems.append(f"num_key_value_heads={h.num_key_value_heads}")
        if getattr(h, "head_dim", None) not in (None, h.hidden_size // h.num_attention_heads):
            problems.append(f"head_dim={h.head_dim}")
        if rope.get("rope_type", "default") != "default" or rope.get("rope_theta") != ROPE_BASE:
            problems.append(f"rope_parameters={rope}")
        if h.attention_bias or h.tie_word_embeddings:
            problems.append(f"attention_bias={h.attention_bias}, tie_word_embeddings={h.tie_word_embeddings}")
        if problems:
            raise ValueError(f"{path}: NanoChat variant this model cannot represent: {', '.join(problems)}")
        config = GPTConfig(block_size=h.max_position_embeddings, vocab_size=h.vocab_size, n_layer=h.num_hidden_layers,
                           n_head=h.num_attention_heads, n_embd=h.hidden_size, **NANOCHAT_SWITCHES,
                           norm_eps=h.rms_norm_eps, logit_softcap=h.final_logit_softcapping or 0.0)
        model = cls(config)
        model.load_state_dict(from_nanochat(hf.state_dict(), config))
        return model


NANOCHAT_SWITCHES = dict(norm="rmsnorm_nogain", embed_norm=True, mlp="relu2", pos_emb="rope", qk_norm=True,
                         tie_embeddings=False, bias=False)  # transformers' NanoChatForCausalLM: any norm_eps and cap


def rotate_half_rows(w, n_head):
    """q or k projection rows (n_embd, n_embd) for the other rotary convention: the second half of each head's rows
    negated. apply_rope turns each pair (x1, x2) by +angle, transformers' rotate_half (cat(x2, -x1)) by -angle,
    which gives (x1', -x2') on the pair (x1, -x2): q.k is the same, and the weightless QK-norm sees no sign. Its own
    inverse."""
    w = w.reshape(n_head, 2, -1, w.size(-1)).clone()  # (nh, halves, hs / 2, n_embd)
    w[:, 1] = -w[:, 1]
    return w.reshape(-1, w.size(-1))


def nanochat_names(n_layer):
    """{our weight name: NanoChatForCausalLM's} for every weight but c_attn's, which is its q, k and v_proj."""
    names = {"transformer.wte.weight": "model.embed_tokens.weight", "lm_head.weight": "lm_head.weight"}
    for i in range(n_layer):
        ours, theirs = f"transformer.h.{i}.", f"model.layers.{i}."
        names.update({ours + "attn.c_proj.weight": theirs + "self_attn.o_proj.weight",
                      ours + "mlp.c_fc.weight": theirs + "mlp.fc1.weight",
                      ours + "mlp.c_proj.weight": theirs + "mlp.fc2.weight"})
    return names


def to_nanochat(sd, config):
    """Our state dict (NANOCHAT_SWITCHES) as transformers' NanoChatForCausalLM's."""
    out = {theirs: sd[ours] for ours, theirs in nanochat_names(config.n_layer).items()}
    for i in range(config.n_layer):
        q, k, v = sd[f"transformer.h.{i}.attn.c_attn.weight"].split(config.n_embd)
        theirs = f"model.layers.{i}.self_attn."
        out.update({theirs + "q_proj.weight": rotate_half_rows(q, config.n_head),
                    theirs + "k_proj.weight": rotate_half_rows(k, config.n_head), theirs + "v_proj.weight": v})
    return out


def from_nanochat(hf_sd, config):
    """transformers' NanoChatForCausalLM state dict as ours: to_nanochat's inverse."""
    out = {ours: hf_sd[theirs] for ours, theirs in nanochat_names(config.n_layer).items()}
    for i in range(config.n_layer):
        theirs = f"model.layers.{i}.self_attn."
        q, k = (rotate_half_rows(hf_sd[theirs + f"{n}_proj.weight"], config.n_head) for n in "qk")
        out[f"transformer.h.{i}.attn.c_attn.weight"] = torch.cat([q, k, hf_sd[theirs + "v_proj.weight"]])
    return out


def _check_hf_dir(path):
    """A local checkpoint must be transformers' GPT-2 or NanoChat: say what is wrong before transformers tries to load
    it. Returns its model_type."""
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise ValueError(f"{path}: not a transformers checkpoint (no config.json)")
    try:
        with open(config_file) as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"{config_file}: not a readable JSON object ({e})") from None
    if model_type not in ("gpt2", "nanochat"):
        raise ValueError(f"{config_file}: model_type is {model_type!r}, not a GPT-2 ('gpt2') or NanoChat ('nanochat') "
                         "checkpoint")
    weights = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")
    if not any(os.path.exists(os.path.join(path, w)) for w in weights):
        raise ValueError(f"{path}: no weights (expected model.safetensors or pytorch_model.bin)")
    return model_type


def is_conv1d_weight(name):
    """Whether transformers' GPT-2 stores this weight as a Conv1D, (in, out): the transpose of nn.Linear's."""
    return name.endswith(("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"))
