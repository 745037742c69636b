r"""Export a model trained here as a transformers directory: weights, config and GPT-2's tokenizer files.

    python export.py --model=log --out=my-gpt2          # a run directory (its newest checkpoint), or a checkpoint file
    python export.py --model=log_sft --out=my-chat      # a chat model: its chat tokens, template and end of reply

Then `transformers.AutoModelForCausalLM.from_pretrained("my-gpt2")`, `AutoTokenizer`, `pipeline("text-generation")`
work on it with this project's logits and token ids. A GPT-2 architecture (--recipe=gpt2) goes out as
GPT2LMHeadModel, --recipe=fast's (nanochat's block) as NanoChatForCausalLM; a padded vocabulary (50304) exports its
first 50257 rows, the real GPT-2 tokens. Files are written into a temporary directory inside DIR first and moved
into place one by one: an interrupted export never leaves a half-written file under its real name.

The tokenizer files are OpenAI's GPT-2 tokenizer, rebuilt from tiktoken's mergeable ranks with no download:
vocab.json and merges.txt (the same contents as OpenAI's encoder.json and vocab.bpe), and tokenizer.json +
tokenizer_config.json written by transformers' own GPT2Tokenizer (byte-level BPE with GPT-2's pre-tokenizer regex).
AutoTokenizer.from_pretrained(directory) then encodes any text to the ids of
`get_encoding().encode(text, allowed_special="all")` and decodes them back to the text; eos = bos = <|endoftext|>,
as in OpenAI's gpt2.
"""

import os
import re
import sys
import tempfile
from dataclasses import dataclass

import torch
from safetensors import SafetensorError

from checkpoints import load_model
from files import WriteError
from model import GPT2_VOCAB_SIZE, NANOCHAT_SWITCHES, ROPE_BASE, is_conv1d_weight, to_nanochat
from options import ConfigError, option, run
from tokenizer import (ASSISTANT_END, CHAT_TEMPLATE, CHAT_VOCAB_SIZE, ENDOFTEXT, ENDOFTEXT_ID, get_chat_encoding,
                       get_encoding, is_chat_model)


# -----------------------------------------------------------------------------
# the model: GPT-2's architecture as transformers' GPT2LMHeadModel, --recipe=fast's as its NanoChatForCausalLM

def hf_architecture(config):
    """The transformers model that runs config's architecture (a model.GPTConfig): "gpt2" for GPT2LMHeadModel (every
    switch GPT-2's), "nanochat" for NanoChatForCausalLM (model.NANOCHAT_SWITCHES, any norm_eps and logit_softcap).
    Anything else: ValueError, one line naming the fields that keep it from the nearer of the two."""
    if config.is_gpt2:
        return "gpt2"
    off_nanochat = {k: getattr(config, k) for k, v in NANOCHAT_SWITCHES.items() if getattr(config, k) != v}
    if not off_nanochat:
        return "nanochat"
    off_gpt2 = config.non_gpt2_fields()
    nearer, off = ("GPT-2", off_gpt2) if len(off_gpt2) <= len(off_nanochat) else ("NanoChat", off_nanochat)
    changed = ", ".join(f"{k}={v!r}" + (" (gains)" if v == "rmsnorm" else "") for k, v in off.items())
    nanochat = ", ".join(f"{k}={v!r}" for k, v in NANOCHAT_SWITCHES.items())
    raise ValueError(f"cannot export {changed} as {nearer}: transformers has GPT2LMHeadModel (GPT-2's switches) and "
                     f"NanoChatForCausalLM ({nanochat}; any norm_eps and logit_softcap)")


def save_pretrained(model, directory, chat=False):
    """Write a GPT's config.json + model.safetensors that transformers' AutoModelForCausalLM.from_pretrained(directory)
    loads with the same logits, and GPT-2's tokenizer files (tokenizer.py), so AutoTokenizer and pipeline() work on
    the directory: GPT-2's architecture as GPT2LMHeadModel, --recipe=fast's as NanoChatForCausalLM (hf_architecture
    says which, or why neither). A padded vocabulary (50304) exports its first 50257 rows, the real GPT-2 tokens.
    chat (a chat_sft.py model): the rows up to the last chat token (tokenizer.CHAT_VOCAB_SIZE, 50263), the
    tokenizer with the chat tokens and its chat_template, and <|assistant_end|> as the end of generation: in
    transformers, apply_chat_template(messages, add_generation_prompt=True) then generate() answers as chat.py."""
    architecture = hf_architecture(model.config)
    c = model.config
    if chat and c.vocab_size < CHAT_VOCAB_SIZE:
        raise ValueError(f"a chat model needs the chat tokens' rows ({CHAT_VOCAB_SIZE}), this one has "
                         f"{c.vocab_size}: fine-tune it with chat_sft.py first")
    vocab = CHAT_VOCAB_SIZE if chat else min(c.vocab_size, GPT2_VOCAB_SIZE)
    sd = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    for k in ("transformer.wte.weight", "lm_head.weight"):
        sd[k] = sd[k][:vocab]
    hf = (gpt2_model if architecture == "gpt2" else nanochat_model)(c, vocab, sd)
    if chat:  # generate() ends a reply where chat.py does. pad = eos: generate() then takes no prompt token
        # for padding when it guesses an attention mask (a pad of <|endoftext|> would mask every prompt's first)
        hf.generation_config.eos_token_id = hf.generation_config.pad_token_id = ASSISTANT_END
    # write into a temporary sibling directory, then move each file into place: an interrupted export never
    # leaves a half-written model.safetensors under its real name
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=directory, prefix=".tmp-export-") as tmp:
            hf.save_pretrained(tmp)
            save_hf_tokenizer(tmp, model_max_length=c.block_size, chat=chat)  # weights and tokenizer arrive together
            move_into(tmp, directory)
    except (OSError, SafetensorError) as e:  # a full disk, say: the files written so far are whole ones
        if isinstance(e, OSError):
            raise WriteError.of(directory, e) from e
        raise WriteError(directory, safetensors_reason(e)) from e


def gpt2_model(c, vocab, sd):
    """GPT2LMHeadModel with the weights sd (ours, fp32, vocab rows) of a GPT-2 architecture c."""
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_config = GPT2Config(vocab_size=vocab, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
                           n_head=c.n_head, activation_function="gelu_new", layer_norm_epsilon=1e-5,
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # we train without dropout
    hf = GPT2LMHeadModel(hf_config)
    hf.load_state_dict({k: (v.t() if is_conv1d_weight(k) else v) for k, v in sd.items()}, strict=False)
    return hf


def nanochat_model(c, vocab, sd):
    """NanoChatForCausalLM with the weights sd (ours, fp32, vocab rows) of a NANOCHAT_SWITCHES architecture c. Its
    rotary tables are ours (rope_theta ROPE_BASE, head size n_embd / n_head) for block_size positions; bos = eos =
    <|endoftext|> as in OpenAI's gpt2. The pad token is generate()'s only: in the config it would be the
    embedding's padding_idx, a row that fine-tuning in transformers never trains."""
    from transformers import NanoChatConfig, NanoChatForCausalLM

    hf_config = NanoChatConfig(vocab_size=vocab, hidden_size=c.n_embd, intermediate_size=4 * c.n_embd,
                               num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_head,
                               max_position_embeddings=c.block_size, hidden_act="relu2", rms_norm_eps=c.norm_eps,
                               rope_parameters={"rope_type": "default", "rope_theta": ROPE_BASE},
                               final_logit_softcapping=c.logit_softcap or None, attention_bias=False,
                               tie_word_embeddings=False, bos_token_id=ENDOFTEXT_ID, eos_token_id=ENDOFTEXT_ID,
                               pad_token_id=None)
    hf = NanoChatForCausalLM(hf_config)
    hf.load_state_dict(to_nanochat(sd, c))
    hf.generation_config.pad_token_id = ENDOFTEXT_ID  # = eos: no prompt token is taken for padding
    return hf


def safetensors_reason(error):
    """The OS's words in safetensors' "Error while serializing: I/O error: File too large (os error 27)"."""
    found = re.search(r"I/O error: (.*?) \(os error \d+\)", str(error))
    return found.group(1) if found else str(error)


# -----------------------------------------------------------------------------
# the tokenizer files

def _bpe(ranks, token, max_rank):
    """tiktoken's byte pair merging of `token` using only the merges ranked below max_rank: repeatedly join the
    adjacent pair whose concatenation has the lowest rank."""
    parts = [bytes([b]) for b in token]
    while True:
        best_rank, best_i = None, None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < max_rank and (best_rank is None or rank < best_rank):
                best_rank, best_i = rank, i
        if best_rank is None:
            return parts
        parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]


def hf_vocab_and_merges(enc=None):
    """GPT-2's vocab.json and merges.txt contents, derived from a tiktoken encoding's mergeable ranks.

    vocab: {byte-level unicode string: id} for every token (special tokens included, as in OpenAI's encoder.json);
    merges: [(left, right)] in rank order, one per multi-byte token: the two pieces that BPE with only the lower
    ranks leaves for that token's bytes, which is how the token was made. For GPT-2 this reproduces OpenAI's
    encoder.json and vocab.bpe exactly (checked against the originals)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    enc = enc or get_encoding()
    ranks = enc._mergeable_ranks
    byte_to_char = bytes_to_unicode()  # GPT-2's reversible map of the 256 bytes onto printable characters

    def as_str(b):
        return "".join(byte_to_char[x] for x in b)

    vocab = {as_str(token): rank for token, rank in ranks.items()}
    vocab.update(enc._special_tokens)
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = _bpe(ranks, token, rank)
        if len(parts) != 2:
            raise ValueError(f"token {token!r} (rank {rank}) is not one merge of two lower-ranked tokens: {parts}")
        merges.append((as_str(parts[0]), as_str(parts[1])))
    return vocab, merges


def hf_tokenizer(model_max_length, enc=None, chat=False):
    """transformers' GPT2Tokenizer (tokenizers-backed, what AutoTokenizer loads) with GPT-2's vocab and merges.
    chat: the chat encoding's, its special tokens registered as such (each one id, never split), and CHAT_TEMPLATE."""
    from transformers import GPT2Tokenizer

    enc = enc or (get_chat_encoding() if chat else get_encoding())
    vocab, merges = hf_vocab_and_merges(enc)
    tok = GPT2Tokenizer(vocab=vocab, merges=merges, unk_token=ENDOFTEXT, bos_token=ENDOFTEXT, eos_token=ENDOFTEXT,
                        add_prefix_space=False, model_max_length=model_max_length,
                        clean_up_tokenization_spaces=False)  # cleanup would turn "don 't" into "don't" on decode
    extra = [name for name in enc._special_tokens if name != ENDOFTEXT]
    if extra:  # already in the vocab at their ids: registering them makes them special, not new
        tok.add_special_tokens({"additional_special_tokens": extra})
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    # every special token of the encoding must be one id in transformers too, the id tiktoken gives it
    for name, token_id in enc._special_tokens.items():
        got = tok.encode(name)
        if got != [token_id]:
            raise ValueError(f"special token {name!r}: transformers encodes it as {got}, tiktoken as [{token_id}]")
    return tok


def save_hf_tokenizer(directory, model_max_length, chat=False):
    """Write GPT-2's tokenizer into `directory` (created if missing): tokenizer.json, tokenizer_config.json,
    vocab.json, merges.txt. Each file is written in a temporary sibling directory first and then moved into place
    with os.replace, so an interrupted export never leaves a half-written file under its real name.
    model_max_length: the model's context (block_size). chat: the chat format's tokenizer, with CHAT_TEMPLATE in
    tokenizer_config.json (where every transformers version reads it). Returns the names of the files written."""
    tok = hf_tokenizer(model_max_length, chat=chat)
    os.makedirs(directory, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".tmp-tokenizer-") as tmp:
        tok.save_pretrained(tmp, save_jinja_files=False)  # tokenizer.json + tokenizer_config.json
        tok.backend_tokenizer.model.save(tmp)  # vocab.json + merges.txt, for tools that read GPT-2's two files
        return move_into(tmp, directory)


def move_into(tmp, directory):
    """Move the files of tmp into directory with os.replace, each with the mode the user's umask gives a new file:
    a writer may create its file 0600 (safetensors does, through a temporary file), and a shared or served export
    must be as readable as every other file the user writes. Returns the names moved, sorted."""
    mode = 0o666 & ~current_umask()
    names = sorted(os.listdir(tmp))
    for name in names:
        os.chmod(os.path.join(tmp, name), mode)
        os.replace(os.path.join(tmp, name), os.path.join(directory, name))
    return names


def current_umask():
    """The process's umask (reading it means setting it: set it back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# -----------------------------------------------------------------------------
# the command

@dataclass
class ExportConfig:
    model: str = option("", "a train_gpt2.py or chat_sft.py run directory (its newest checkpoint) or checkpoint file")
    out: str = option("", "the transformers directory to write (created if missing)")


def export(cfg):
    if not cfg.model or not cfg.out:
        raise ConfigError("--model and --out are both needed (see --help)")
    model, train_config = load_model(cfg.model)
    chat = is_chat_model(model, train_config)
    try:
        kind = {"gpt2": "GPT-2", "nanochat": "NanoChat"}[hf_architecture(model.config)]
        save_pretrained(model, cfg.out, chat=chat)
    except ValueError as e:
        raise ConfigError(f"{cfg.model}: {e}") from None
    print(f"exported {cfg.model} ({kind}{', a chat model' if chat else ''}, {model.num_params():,} parameters) to "
          f"{cfg.out}: transformers.AutoModelForCausalLM.from_pretrained({cfg.out!r})")


def main(argv=None):
    return run("export.py", __doc__, ExportConfig, argv, export)


if __name__ == "__main__":
    sys.exit(main())
