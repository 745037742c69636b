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

import contextlib
import os
import sys
from dataclasses import dataclass

import torch

from checkpoints import load_model
from options import ConfigError, at_least, option, run
from runtime import autocast, get_device, setup_precision
from tokenizer import decode_stream, generate_reply, get_chat_encoding, is_chat_model, render_turns


# -----------------------------------------------------------------------------
# the model

def load_chat_model(source):
    """The chat model (GPT on the CPU) at source, a local path (see checkpoints.load_model). Raises ConfigError."""
    if not os.path.exists(source):
        raise ConfigError(f"--model {source}: no such file or directory (a chat_sft.py run directory, checkpoint "
                          "or export)")
    model, train_config = load_model(source)
    if not is_chat_model(model, train_config):
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


def respond(model, turns, *, enc, out, max_new_tokens, temperature, top_k, generator):
    """Write the reply to turns (ending with a user message) to out as it is sampled; return the turns with the
    reply added (and the oldest dropped, if the context needed it) and whether the reply was cut before its end."""
    prompt, turns, budget = fit_context(turns, model.config.block_size, max_new_tokens)
    reply = []

    def sampled():
        idx = torch.tensor([prompt], dtype=torch.long, device=next(model.parameters()).device)
        for token in generate_reply(model, idx, max_new_tokens=budget, temperature=temperature, top_k=top_k,
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


@dataclass
class ChatConfig:
    model: str = option("log_sft", "a chat_sft.py run directory, checkpoint (.pt) or exported transformers directory")
    prompt: str = option(None, "answer this one message, print the reply and exit")
    system: str = option("", "a system message opening the conversation")
    temperature: float = option(0.6, "0: greedy", type=at_least(0, float))
    top_k: int = option(50, "sample among the k likeliest", type=at_least(1))
    seed: int = option(1337, "the sampling's seed")
    max_new_tokens: int = option(256, "the longest reply", type=at_least(1))
    device: str = option("auto", "auto (cuda, then mps, then cpu), cuda, mps or cpu")


def talk(cfg):
    if cfg.prompt is not None and not cfg.prompt.strip():
        raise ConfigError("--prompt: empty message")
    device = get_device(cfg.device)
    model = load_chat_model(cfg.model).to(device).eval()
    autocast_dtype = setup_precision(device)  # bf16 on CUDA, as the model was fine-tuned
    enc = get_chat_encoding()
    turns = [("system", enc.encode_ordinary(cfg.system))] if cfg.system.strip() else []
    reply_options = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                         generator=torch.Generator().manual_seed(cfg.seed))  # a CPU generator serves any device
    with autocast(device.type, autocast_dtype):
        if cfg.prompt is not None:
            try:
                respond(model, turns + [("user", enc.encode_ordinary(cfg.prompt))], enc=enc, out=sys.stdout,
                        **reply_options)
            except ValueError as e:
                raise ConfigError(f"--prompt: {e}") from None
            return 0
        print(f"chat.py: {cfg.model}, {model.num_params():,} parameters, a context of {model.config.block_size} "
              f"tokens, on {device}. /clear starts over; /quit, Ctrl-D or Ctrl-C ends.", file=sys.stderr)
        try:
            return chat_loop(model, turns, enc=enc, reply_options=reply_options)
        except KeyboardInterrupt:
            print()
            return 130


def main(argv=None):
    return run("chat.py", __doc__, ChatConfig, argv, talk)


if __name__ == "__main__":
    sys.exit(main())
