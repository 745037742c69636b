"""The project's tokenizer: OpenAI's GPT-2 BPE through tiktoken, and its export as transformers' GPT-2 tokenizer files.

    from tokenizer import get_encoding, save_hf_tokenizer
    enc = get_encoding()                                    # tiktoken's GPT-2 BPE: 50257 ids, <|endoftext|> = 50256
    save_hf_tokenizer("my-gpt2/", model_max_length=1024)    # what transformers.AutoTokenizer.from_pretrained reads

The exported files are OpenAI's GPT-2 tokenizer, rebuilt from tiktoken's mergeable ranks with no download:
vocab.json and merges.txt (the same contents as OpenAI's encoder.json and vocab.bpe), and tokenizer.json +
tokenizer_config.json written by transformers' own GPT2Tokenizer (byte-level BPE with GPT-2's pre-tokenizer regex).
AutoTokenizer.from_pretrained(directory) then encodes any text to the ids of
`get_encoding().encode(text, allowed_special="all")` and decodes them back to the text; eos = bos = <|endoftext|>,
as in OpenAI's gpt2. GPT.save_pretrained (model.py) calls save_hf_tokenizer, so an export holds weights and tokenizer.

Importing this module does no work: tiktoken and transformers are imported by the functions that need them.
"""

import os
import tempfile

ENDOFTEXT = "<|endoftext|>"  # GPT-2's one special token (id 50256): document separator, eos and bos


def get_encoding():
    """tiktoken's GPT-2 encoding (tiktoken caches it: every call returns the same object)."""
    import tiktoken

    return tiktoken.get_encoding("gpt2")


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


def hf_tokenizer(model_max_length, enc=None):
    """transformers' GPT2Tokenizer (tokenizers-backed, what AutoTokenizer loads) with GPT-2's vocab and merges."""
    from transformers import GPT2Tokenizer

    enc = enc or get_encoding()
    vocab, merges = hf_vocab_and_merges(enc)
    tok = GPT2Tokenizer(vocab=vocab, merges=merges, unk_token=ENDOFTEXT, bos_token=ENDOFTEXT, eos_token=ENDOFTEXT,
                        add_prefix_space=False, model_max_length=model_max_length,
                        clean_up_tokenization_spaces=False)  # cleanup would turn "don 't" into "don't" on decode
    # every special token of the encoding must be one id in transformers too, the id tiktoken gives it
    for name, token_id in enc._special_tokens.items():
        got = tok.encode(name)
        if got != [token_id]:
            raise ValueError(f"special token {name!r}: transformers encodes it as {got}, tiktoken as [{token_id}]")
    return tok


def save_hf_tokenizer(directory, model_max_length):
    """Write GPT-2's tokenizer into `directory` (created if missing): tokenizer.json, tokenizer_config.json,
    vocab.json, merges.txt. Each file is written in a temporary sibling directory first and then moved into place
    with os.replace, so an interrupted export never leaves a half-written file under its real name.
    model_max_length: the model's context (block_size). Returns the names of the files written."""
    tok = hf_tokenizer(model_max_length)
    os.makedirs(directory, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".tmp-tokenizer-") as tmp:
        tok.save_pretrained(tmp)  # tokenizer.json + tokenizer_config.json
        tok.backend_tokenizer.model.save(tmp)  # vocab.json + merges.txt, for tools that read GPT-2's two files
        names = sorted(os.listdir(tmp))
        for name in names:
            os.replace(os.path.join(tmp, name), os.path.join(directory, name))
    return names
