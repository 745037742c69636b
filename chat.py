"""Talk to a model fine-tuned by chat_sft.py: a multi-turn chat in the terminal, each reply streamed as it is sampled.

    python chat.py                                                   # the newest checkpoint of log_sft/
    python chat.py --model log_sft/model_00240.pt --temperature 0.8 --top_k 50
    python chat.py --model my-chat/ --prompt "What is the capital of France?"     # one answer, printed, then exit
    python chat.py --prompt "..." --temperature 0                    # greedy: transformers' generate says the same

--model is a chat_sft.py run directory (its newest checkpoint), one of its checkpoints (.pt), or a transformers
directory it exported (--export_dir). In the chat, /clear starts over and /quit, Ctrl-D or Ctrl-C end it. The model
reads at most block_size tokens: before each reply the oldest exchanges (a user message and its reply) are dropped
until the conversation and --max_new_tokens fit, the system message (--system) always kept; a reply stops at
<|assistant_end|>, or after --max_new_tokens tokens, or at the end of the context.
"""

import argparse
import codecs
import contextlib
import os
import sys

import torch

from checkpoints import list_checkpoints, load_checkpoint, load_model, model_from_checkpoint
from runtime import ConfigError, autocast, get_device, setup_precision
from tokenizer import (ASSISTANT_END, CHAT_FORMAT, CHAT_VOCAB_SIZE, get_chat_encoding, render_turns)

TRANSFORMERS_FILES = ("config.json", ".safetensors", ".bin")  # what load_model refuses as a file: pass the directory


# -----------------------------------------------------------------------------
# the model

def load_any_model(source):
    """(GPT on the CPU, chat) from a run directory of chat_sft.py or train_gpt2.py (its newest checkpoint), a
    checkpoint file, a transformers directory or a hub id. chat: whether it was fine-tuned in the chat format:
    a chat_sft.py checkpoint (its train_config names CHAT_FORMAT), or a transformers model of exactly the chat
    vocabulary (what save_pretrained(chat=True) exports). Raises ConfigError."""
    path = source
    if os.path.isdir(source):  # a run directory (its config.json is the run's), else a transformers directory
        found = list_checkpoints(source)
        if found:
            path = found[-1][1]
        elif not os.path.exists(os.path.join(source, "config.json")):
            raise ConfigError(f"{source}: holds no checkpoint (model_NNNNN.pt) and no transformers model "
                              "(config.json)")
    if os.path.isfile(path) and not path.endswith(TRANSFORMERS_FILES):
        checkpoint = load_checkpoint(path, keys=("model", "config"), kind="chat_sft.py or train_gpt2.py checkpoint")
        try:
            model = model_from_checkpoint(checkpoint)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        train_config = checkpoint.get("train_config")
        return model, isinstance(train_config, dict) and train_config.get("chat_format") == CHAT_FORMAT
    model = load_model(source)
    return model, model.config.vocab_size == CHAT_VOCAB_SIZE


def load_chat_model(source):
    """The chat model (GPT on the CPU) at source, a local path (see load_any_model). Raises ConfigError."""
    if not os.path.exists(source):
        raise ConfigError(f"--model {source}: no such file or directory (a chat_sft.py run directory, checkpoint "
                          "or export)")
    model, chat = load_any_model(source)
    if not chat:
        raise ConfigError(f"{source}: not a chat model (neither a chat_sft.py checkpoint nor its export); "
                          f"fine-tune it first: python chat_sft.py --init_from={source}")
    return model


# -----------------------------------------------------------------------------
# a reply: the context, sampling, text

def fit_context(turns, block_size, max_new_tokens):
    """(prompt ids, turns kept, most tokens the reply may have) for turns [(role, content ids)] that end with the
    user's new message: the oldest exchanges (user message and reply) are dropped until the prompt and
    max_new_tokens fit in block_size, or only the new message is left (then the reply gets the room that is left);
    a system message first is always kept. Raises ValueError if the prompt alone fills the context."""
    system = [turn for turn in turns[:1] if turn[0] == "system"]
    rest = turns[len(system):]
    while True:
        prompt = render_turns(system + rest, prompt=True)[0]
        if len(prompt) + max_new_tokens <= block_size or len(rest) == 1:
            break
        rest = rest[2:]  # the oldest user message and the assistant's reply to it
    if len(prompt) >= block_size:
        raise ValueError(f"the message is too long: {len(prompt)} tokens in the chat format"
                         f"{' with the system message' if system else ''}, and the model reads {block_size}")
    return prompt, system + rest, min(max_new_tokens, block_size - len(prompt))


def generate_reply(model, prompt, *, max_new_tokens, temperature, top_k=None, generator=None):
    """Yield the token ids of the assistant's reply to prompt (ids ending with <|assistant_start|>) as the model
    samples them (GPT.stream: the KV cache, GPT-2's tokens and the chat tokens), until <|assistant_end|>, which is
    not yielded, or max_new_tokens. Run it under the device's autocast."""
    idx = torch.tensor([prompt], dtype=torch.long, device=next(model.parameters()).device)
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


def respond(model, turns, *, enc, out, max_new_tokens, temperature, top_k, generator):
    """Write the reply to turns (ending with a user message) to out as it is sampled; return the turns with the
    reply added (and the oldest dropped, if the context needed it) and whether the reply was cut before its end."""
    prompt, turns, budget = fit_context(turns, model.config.block_size, max_new_tokens)
    reply = []

    def sampled():
        for token in generate_reply(model, prompt, max_new_tokens=budget, temperature=temperature, top_k=top_k,
                                    generator=generator):
            reply.append(token)
            yield token

    for text in decode_stream(sampled(), enc):
        out.write(text)
        out.flush()
    out.write("\n")
    out.flush()
    return turns + [("assistant", reply)], len(reply) == budget


# -----------------------------------------------------------------------------
# command line

class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line (argparse prints the usage too)
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def number(kind, low):
    def parse(text):
        value = kind(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its message
    return parse


def chat_loop(model, turns, *, enc, reply_options):
    """The interactive chat on stdin/stdout; returns the exit code."""
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  line editing and history for input(), where the platform has it
    system = list(turns)
    while True:
        try:
            line = input("\nUser: ")
        except EOFError:  # Ctrl-D, or the end of piped input
            print()
            return 0
        command = line.strip()
        if not command:
            continue
        if command in ("/quit", "/exit"):
            return 0
        if command == "/clear":
            turns = list(system)
            print("(a new conversation)")
            continue
        print("Assistant: ", end="", flush=True)
        try:
            turns, cut = respond(model, turns + [("user", enc.encode_ordinary(line))], enc=enc, out=sys.stdout,
                                 **reply_options)
        except ValueError as e:  # this message does not fit: say so, keep the conversation as it was
            print(f"\nchat.py: {e}; send a shorter one", file=sys.stderr)
            continue
        if cut:
            print("(the reply was cut: --max_new_tokens, or the end of the context)", file=sys.stderr)


def main(argv=None):
    parser = Parser(prog="chat.py", description=__doc__.strip().splitlines()[0], epilog=__doc__.split("\n", 1)[1],
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="log_sft", help="a chat_sft.py run directory, checkpoint (.pt) or "
                                                           "exported transformers directory (default: log_sft)")
    parser.add_argument("--prompt", default=None, help="answer this one message, print the reply and exit")
    parser.add_argument("--system", default="", help="a system message opening the conversation")
    parser.add_argument("--temperature", type=number(float, 0.0), default=0.6, help="0: greedy (default 0.6)")
    parser.add_argument("--top_k", type=number(int, 1), default=50, help="sample among the k likeliest (default 50)")
    parser.add_argument("--seed", type=int, default=1337, help="the sampling's seed (default 1337)")
    parser.add_argument("--max_new_tokens", type=number(int, 1), default=256, help="the longest reply (default 256)")
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, mps or cpu")
    args = parser.parse_args(argv)
    if args.prompt is not None and not args.prompt.strip():
        parser.error("--prompt: empty message")
    try:
        device = get_device(args.device)
        model = load_chat_model(args.model)
    except ConfigError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    model.to(device).eval()
    autocast_dtype = setup_precision(device)  # bf16 on CUDA, as the model was fine-tuned
    enc = get_chat_encoding()
    turns = [("system", enc.encode_ordinary(args.system))] if args.system.strip() else []
    reply_options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         generator=torch.Generator().manual_seed(args.seed))  # a CPU generator serves any device
    with autocast(device.type, autocast_dtype):
        if args.prompt is not None:
            try:
                respond(model, turns + [("user", enc.encode_ordinary(args.prompt))], enc=enc, out=sys.stdout,
                        **reply_options)
            except ValueError as e:
                parser.exit(2, f"{parser.prog}: error: --prompt: {e}\n")
            return 0
        print(f"chat.py: {args.model}, {model.num_params():,} parameters, a context of {model.config.block_size} "
              f"tokens, on {device}. /clear starts over; /quit, Ctrl-D or Ctrl-C ends.", file=sys.stderr)
        try:
            return chat_loop(model, turns, enc=enc, reply_options=reply_options)
        except KeyboardInterrupt:
            print()
            return 130


if __name__ == "__main__":
    sys.exit(main())
