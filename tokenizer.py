"""The project's tokenizer: OpenAI's GPT-2 BPE through tiktoken, and its chat format.

    from tokenizer import get_encoding, get_chat_encoding, render_conversation
    enc = get_encoding()                                    # tiktoken's GPT-2 BPE: 50257 ids, <|endoftext|> = 50256
    ids, mask = render_conversation([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}])

The chat format (chat_sft.py trains it, chat.py speaks it): GPT-2's BPE plus six special tokens of its own, ids
50257-50262, rows that train_gpt2.py's padded 50304 vocabulary already has, so a model pretrained here needs no
resize. A conversation is one document:

    <|endoftext|><|system_start|>...<|system_end|><|user_start|>...<|user_end|><|assistant_start|>...<|assistant_end|>
    <|user_start|>...<|user_end|><|assistant_start|>...<|assistant_end|>...

<|endoftext|> opens it, as it opens every pretraining document; the system turn is optional and first; then user
and assistant turns alternate. Each content is encoded on its own as ordinary text (a literal "<|user_end|>" typed
by a user stays text). The loss covers the assistant's content tokens and its <|assistant_end|> (the model learns
to stop); a reply is asked for by ending the prompt with <|assistant_start|>. CHAT_TEMPLATE is the same format as a
Jinja template for transformers' apply_chat_template (export.py writes it into a chat model's export).

Importing this module does no work: tiktoken is imported by the functions that need it.
"""

import codecs
import functools

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


def is_chat_model(model, train_config):
    """Whether a model was fine-tuned in the chat format: a chat_sft.py checkpoint (its train_config names
    CHAT_FORMAT), or an export of exactly the chat vocabulary (train_config None)."""
    if train_config is not None:
        return train_config.get("chat_format") == CHAT_FORMAT
    return model.config.vocab_size == CHAT_VOCAB_SIZE


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
# a reply: its tokens and its text as they are sampled

def generate_reply(model, idx, *, max_new_tokens, temperature, top_k=None, generator=None):
    """Yield the token ids of the assistant's reply to the prompt idx (1, T) (ids ending with <|assistant_start|>)
    as the model samples them (GPT.stream: the KV cache, GPT-2's tokens and the chat tokens), until
    <|assistant_end|>, which is not yielded, or max_new_tokens. Run it under the device's autocast."""
    for next_id in model.stream(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator,
                                num_tokens=CHAT_VOCAB_SIZE):
        token = next_id.item()
        if token == ASSISTANT_END:
            return
        yield token


def decode_stream(tokens, enc):
    """Yield the text of token ids as they come. A character whose UTF-8 bytes span several tokens (an emoji, most
    CJK) is held back until its last byte arrives, so nothing half-decoded is printed; the pieces add up to
    enc.decode(all the ids), invalid bytes included (U+FFFD, as tiktoken's decode)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token in tokens:
        text = decoder.decode(enc.decode_single_token_bytes(token))
        if text:
            yield text
    tail = decoder.decode(b"", final=True)
    if tail:
        yield tail
