"""GPT-2, numerically identical to transformers' GPT2LMHeadModel, with flash attention, HF import/export and sampling.

    python -c "from model import GPT; m = GPT.from_pretrained('gpt2'); print(m.num_params())"

Everything about the network and its weights lives here; nothing about data, distributed training or files other
than weights. Importing this module does no work; `transformers` is imported only by the functions that need it.
"""

import dataclasses
import inspect
import json
import os
import tempfile
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

GPT2_VOCAB_SIZE = 50257  # the real GPT-2 BPE vocabulary; training pads it to 50304 (a multiple of 128) for speed
HUB_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
# What OpenAI's models score on this project's two evals: the numbers a GPT-2 (124M) reproduction is judged by
# (train_gpt2.py prints them next to its evals, plot.py draws them).
# GPT-2 124M: OpenAI's checkpoint evaluated on FineWeb-Edu's val shard (val loss) and HellaSwag's 10,042 validation
# examples (acc_norm); GPT-3 small (124M): HellaSwag zero-shot acc from the GPT-3 paper (Brown et al. 2020).
REFERENCES = {
    "gpt2": {"label": "OpenAI GPT-2 124M", "val": 3.2924, "hella": 0.2955},
    "gpt3": {"label": "OpenAI GPT-3 124M", "hella": 0.337},
}


@dataclass
class GPTConfig:
    block_size: int = 1024  # max sequence length
    vocab_size: int = GPT2_VOCAB_SIZE
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    norm: str = "layernorm"  # "layernorm" (GPT-2) | "rmsnorm"
    mlp: str = "gelu"  # "gelu" (GPT-2) | "swiglu"

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.norm not in ("layernorm", "rmsnorm"):
            raise ValueError(f"norm must be 'layernorm' or 'rmsnorm', got {self.norm!r}")
        if self.mlp not in ("gelu", "swiglu"):
            raise ValueError(f"mlp must be 'gelu' or 'swiglu', got {self.mlp!r}")

    @property
    def is_gpt2(self):
        """True for the exact GPT-2 architecture (the one transformers' GPT2LMHeadModel can run)."""
        return self.norm == "layernorm" and self.mlp == "gelu"

    @classmethod
    def from_dict(cls, d):
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"unknown GPTConfig fields: {', '.join(unknown)}")
        return cls(**d)


def make_norm(config):
    # GPT-2's LayerNorm has a bias and eps 1e-5 (transformers' layer_norm_epsilon); RMSNorm drops the mean and the bias.
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=1e-5)
    return nn.LayerNorm(config.n_embd, eps=1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        # key, query, value projections for all heads, in one matmul
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x):
        B, T, C = x.size()  # batch, sequence length, embedding dim (n_embd)
        q, k, v = self.c_attn(x).split(C, dim=2)
        # nh = number of heads, hs = head size, C = nh * hs
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        # softmax(q k^T / sqrt(hs)) v with the causal mask, never materializing the (T, T) matrix (flash attention)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs side by side
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        if config.mlp == "swiglu":
            # SwiGLU has three matrices instead of two; a hidden size of 8/3 * n_embd (rounded up to a multiple of 64
            # for the GPU) keeps the parameter count that of the 4 * n_embd GELU MLP: 2048 for n_embd 768, exactly.
            hidden = -(-8 * config.n_embd // (3 * 64)) * 64
            self.c_fc = nn.Linear(config.n_embd, 2 * hidden)  # gate and value in one matmul
        else:
            hidden = 4 * config.n_embd
            self.c_fc = nn.Linear(config.n_embd, hidden)
        self.swiglu = config.mlp == "swiglu"
        self.c_proj = nn.Linear(hidden, config.n_embd)

    def forward(self, x):
        h = self.c_fc(x)
        if self.swiglu:
            gate, value = h.chunk(2, dim=-1)
            h = F.silu(gate) * value
        else:
            h = F.gelu(h, approximate="tanh")  # GPT-2's "gelu_new"
        return self.c_proj(h)


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x):
        # pre-LN: the residual stream x is never normalized, so gradients flow straight through it
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embeddings
            wpe=nn.Embedding(config.block_size, config.n_embd),  # position embeddings
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=make_norm(config),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying (GPT-2, and "Using the Output Embedding to Improve Language Models"): one matrix maps tokens
        # in and logits out; it is 38.6M of GPT-2 small's 124M parameters.
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # Every block adds two residual projections into the stream, so its variance grows with 2 * n_layer
        # additions; scaling their init by 1/sqrt(2 * n_layer) keeps the stream's scale independent of depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 * (2 * config.n_layer) ** -0.5)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding=False):
        """Parameters, the tied wte/lm_head matrix counted once; non_embedding leaves out the position embeddings
        (as nanoGPT's FLOPs estimate does: they cost no matmul)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len):
        """Training FLOPs per token (forward + backward): 6 per weight of the matmuls plus the attention scores and
        values, 12 * n_layer * n_head * head_size * seq_len (PaLM appendix B, as nanoGPT's MFU estimate)."""
        c = self.config
        return 6 * self.num_params(non_embedding=True) + 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * seq_len

    def forward(self, idx, targets=None, positions=None):
        """idx (B, T) token ids -> (logits (B, T, vocab_size), mean cross-entropy against targets (B, T), or None).
        positions (B, E), optional: the logits of those positions only, (B, E, vocab_size) (and targets (B, E)). The
        lm_head is a third of GPT-2 small's matmul FLOPs; an eval that scores a few positions of each row skips most
        of it."""
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} is longer than block_size {self.config.block_size}")
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, n_embd) + (T, n_embd) broadcast
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if positions is not None:
            x = torch.gather(x, 1, positions.unsqueeze(-1).expand(-1, -1, x.size(-1)))  # (B, E, n_embd)
        logits = self.lm_head(x)  # (B, T or E, vocab_size)
        loss = None
        if targets is not None:
            # mean over the tokens whose target is not -1 (padding / masked positions)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, betas, eps, device_type, verbose=False):
        """AdamW with weight decay on the matrices and embeddings (2-D+) only: biases and norm gains stay undecayed."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        # the fused kernel updates all parameters in a few launches instead of a loop of small ones per tensor
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        if verbose:
            print(f"decayed tensors: {len(decay)} ({sum(p.numel() for p in decay):,} parameters), "
                  f"undecayed tensors: {len(no_decay)} ({sum(p.numel() for p in no_decay):,} parameters), "
                  f"fused AdamW: {fused}")
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, **({"fused": True} if fused else {}))

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None):
        """Append max_new_tokens sampled tokens to idx (B, T): top-k sampling, greedy when temperature is 0.
        Only the last block_size tokens are fed, so any length works. A model with the padded vocabulary never
        samples the padding ids (>= 50257), which are no GPT-2 tokens."""
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.config.block_size:])
            logits = logits[:, -1, :].float()  # (B, vocab_size)
            if self.config.vocab_size > GPT2_VOCAB_SIZE:
                logits[:, GPT2_VOCAB_SIZE:] = -float("inf")
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
        return idx

    @classmethod
    def from_pretrained(cls, name_or_path):
        """Load a transformers GPT-2 checkpoint: one of gpt2, gpt2-medium, gpt2-large, gpt2-xl (or any hub id), or a
        local directory with config.json and model.safetensors / pytorch_model.bin."""
        from transformers import GPT2LMHeadModel

        if os.path.isdir(name_or_path):
            _check_hf_dir(name_or_path)
        elif os.path.exists(name_or_path) or name_or_path.startswith((".", "/", "~")):
            raise ValueError(f"{name_or_path}: not a directory holding a transformers GPT-2 checkpoint")
        try:
            hf = GPT2LMHeadModel.from_pretrained(name_or_path)
        except Exception as e:  # network, hub id, or file format: say which model and why, in one line
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"could not load GPT-2 {name_or_path!r}: {first_line}") from None
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
                v.copy_(hf_sd[k].t() if _is_conv1d_weight(k) else hf_sd[k])
        return model

    def save_pretrained(self, directory):
        """Write config.json + model.safetensors that transformers.GPT2LMHeadModel.from_pretrained(directory) loads
        with the same logits. A padded vocabulary (50304) exports its first 50257 rows, the real GPT-2 tokens."""
        if not self.config.is_gpt2:
            raise ValueError(f"cannot export norm={self.config.norm!r}, mlp={self.config.mlp!r} as GPT-2: "
                             "transformers' GPT2LMHeadModel has only LayerNorm and the GELU MLP")
        from transformers import GPT2Config, GPT2LMHeadModel

        c = self.config
        vocab = min(c.vocab_size, GPT2_VOCAB_SIZE)
        hf_config = GPT2Config(vocab_size=vocab, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
                               n_head=c.n_head, activation_function="gelu_new", layer_norm_epsilon=1e-5,
                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # we train without dropout
        hf = GPT2LMHeadModel(hf_config)
        sd = {k: v.detach().to("cpu", torch.float32) for k, v in self.state_dict().items()}
        for k in ("transformer.wte.weight", "lm_head.weight"):
            sd[k] = sd[k][:vocab]
        hf.load_state_dict({k: (v.t() if _is_conv1d_weight(k) else v) for k, v in sd.items()}, strict=False)
        # write into a temporary sibling directory, then move each file into place: an interrupted export never
        # leaves a half-written model.safetensors under its real name
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=directory, prefix=".tmp-export-") as tmp:
            hf.save_pretrained(tmp)
            for name in os.listdir(tmp):
                os.replace(os.path.join(tmp, name), os.path.join(directory, name))


def _check_hf_dir(path):
    """A local checkpoint must be transformers' GPT-2: say what is wrong before transformers tries to load it."""
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise ValueError(f"{path}: not a transformers checkpoint (no config.json)")
    try:
        with open(config_file) as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"{config_file}: not a readable JSON object ({e})") from None
    if model_type != "gpt2":
        raise ValueError(f"{config_file}: model_type is {model_type!r}, not a GPT-2 checkpoint ('gpt2')")
    weights = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")
    if not any(os.path.exists(os.path.join(path, w)) for w in weights):
        raise ValueError(f"{path}: no weights (expected model.safetensors or pytorch_model.bin)")


def _is_conv1d_weight(name):
    return name.endswith(("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"))
