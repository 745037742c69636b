"""The project's tokenizer: OpenAI's GPT-2 BPE through tiktoken, its chat format, and their export as transformers
tokenizer files.

    from tokenizer import get_encoding, get_chat_encoding, render_conversation, save_hf_tokenizer
    enc = get_encoding()                                    # tiktoken's GPT-2 BPE: 50257 ids, <|endoftext|> = 50256
    save_hf_tokenizer("my-gpt2/", model_max_length=1024)    # what transformers.AutoTokenizer.from_pretrained reads
    ids, mask = render_conversation([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}])

The exported files are OpenAI's GPT-2 tokenizer, rebuilt from tiktoken's mergeable ranks with no download:
vocab.json and merges.txt (the same contents as OpenAI's encoder.json and vocab.bpe), and tokenizer.json +
tokenizer_config.json written by transformers' own GPT2Tokenizer (byte-level BPE with GPT-2's pre-tokenizer regex).
AutoTokenizer.from_pretrained(directory) then encodes any text to the ids of
`get_encoding().encode(text, allowed_special="all")` and decodes them back to the text; eos = bos = <|endoftext|>,
as in OpenAI's gpt2. GPT.save_pretrained (model.py) calls save_hf_tokenizer, so an export holds weights and tokenizer.

The chat format (chat_sft.py trains it, chat.py speaks it): GPT-2's BPE plus six special tokens of its own, ids
50257-50262, rows that train_gpt2.py's padded 50304 vocabulary already has, so a model pretrained here needs no
resize. A conversation is one document:

    <|endoftext|><|system_start|>...<|system_end|><|user_start|>...<|user_end|><|assistant_start|>...<|assistant_end|>
    <|user_start|>...<|user_end|><|assistant_start|>...<|assistant_end|>...

<|endoftext|> opens it, as it opens every pretraining document; the system turn is optional and first; then user
and assistant turns alternate. Each content is encoded on its own as ordinary text (a literal "<|user_end|>" typed
by a user stays text). The loss covers the assistant's content tokens and its <|assistant_end|> (the model learns
to stop); a reply is asked for by ending the prompt with <|assistant_start|>. CHAT_TEMPLATE is the same format as a
Jinja template for transformers' apply_chat_template (save_hf_tokenizer(..., chat=True) writes it).

Importing this module does no work: tiktoken and transformers are imported by the functions that need them.
"""

import functools
import os
import tempfile

ENDOFTEXT = "<|endoftext|>"  # GPT-2's one special token (id 50256): document separator, eos and bos
ENDOFTEXT_ID = 50256

# -----------------------------------------------------------------------------
# the chat format

CHAT_ROLES = ("system", "user", "assistant")
# the start and end token of each role's turns, right after GPT-2's 50257 ids
CHAT_SPECIAL_TOKENS = {f"<|{role}_{edge}|>": 50257 + 2 * i + j
                       for i, role in enumerate(CHAT_ROLES) for j, edge in enumerate(("start", "end"))}
CHAT_VOCAB_SIZE = 50257 + len(CHAT_SPECIAL_TOKENS)  # 50263: the ids a chat model reads and may sample
TURN_TOKENS = {role: (CHAT_SPECIAL_TOKENS[f"<|{role}_start|>"], CHAT_SPECIAL_TOKENS[f"<|{role}_end|>"])
               for role in CHAT_ROLES}
ASSISTANT_START, ASSISTANT_END = TURN_TOKENS["assistant"]
CHAT_FORMAT = "gpt2-chat-v1"  # the train_config of a chat_sft.py checkpoint names the format it was trained on
# The format for transformers (apply_chat_template): the string whose tokens render_conversation gives; with
# add_generation_prompt, render_prompt's. One line, so Jinja adds no whitespace. (One difference: transformers'
# tokenizer turns a special token's name written inside a message into that token; ours keeps it text.)
CHAT_TEMPLATE = (
    "{{ '<|endoftext|>' }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role'] + ': expected system, user or assistant') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '_start|>' + message['content'] + '<|' + message['role'] + '_end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant_start|>' }}{% endif %}"
)


def get_encoding():
    """tiktoken's GPT-2 encoding (tiktoken caches it: every call returns the same object)."""
    import tiktoken

    return tiktoken.get_encoding("gpt2")


@functools.cache
def get_chat_encoding():
    """GPT-2's BPE with the chat format's special tokens: the same ids for every text, plus ids 50257-50262."""
    import tiktoken

    gpt2 = get_encoding()
    return tiktoken.Encoding(name="gpt2-chat", pat_str=gpt2._pat_str, mergeable_ranks=gpt2._mergeable_ranks,
                             special_tokens={**gpt2._special_tokens, **CHAT_SPECIAL_TOKENS})


def check_messages(messages):
    """Raise ValueError (one line, saying which message and why) unless messages is a conversation of the chat
    format: a non-empty list of {"role", "content"} dicts, an optional system message first, then user and
    assistant messages alternating from a user's, every content a non-empty string. Other keys are ignored."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"'messages' must be a non-empty list of messages, got {messages!r:.60}")
    expected = "user"
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"messages[{i}]: expected an object with 'role' and 'content', got {message!r:.60}")
        role, content = message["role"], message["content"]
        if role not in CHAT_ROLES:
            raise ValueError(f"messages[{i}]: unknown role {role!r} (expected system, user or assistant)")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}] ({role}): content must be a string, got {type(content).__name__}")
        if not content.strip():
            raise ValueError(f"messages[{i}] ({role}): empty content")
        if role != expected and not (role == "system" and i == 0):
            raise ValueError(f"messages[{i}]: roles out of order: expected {expected}, got {role} (an optional "
                             "system message first, then user and assistant alternating)")
        if role != "system":
            expected = "assistant" if role == "user" else "user"


def render_turns(turns, prompt=False):
    """(ids, mask) of a conversation given as [(role, content token ids)]: the chat format's token sequence, and
    for each token 1 if it is a target the loss covers (the assistant's content and its <|assistant_end|>), else 0.
    prompt: end with <|assistant_start|>, asking for the next assistant turn."""
    ids, mask = [ENDOFTEXT_ID], [0]
    for role, content in turns:
        start, end = TURN_TOKENS[role]
        trained = int(role == "assistant")
        ids += [start, *content, end]
        mask += [0] + [trained] * (len(content) + 1)
    if prompt:
        ids.append(ASSISTANT_START)
        mask.append(0)
    return ids, mask


def encode_messages(messages, enc=None):
    """[(role, content token ids)] of checked messages (check_messages): each content encoded as ordinary text."""
    check_messages(messages)
    enc = enc or get_chat_encoding()
    return [(m["role"], enc.encode_ordinary(m["content"])) for m in messages]


def render_conversation(messages, enc=None):
    """(ids, mask) of a conversation (a list of {"role", "content"}) in the chat format: see render_turns."""
    return render_turns(encode_messages(messages, enc))


def render_prompt(messages, enc=None):
    """The ids that ask for the assistant's next reply to messages: the conversation, then <|assistant_start|>
    (what apply_chat_template(messages, add_generation_prompt=True) gives in transformers)."""
    return render_turns(encode_messages(messages, enc), prompt=True)[0]


# -----------------------------------------------------------------------------
# export as transformers tokenizer files

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
        names = sorted(os.listdir(tmp))
        for name in names:
            os.replace(os.path.join(tmp, name), os.path.join(directory, name))
    return names
