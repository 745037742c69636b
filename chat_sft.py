r"""Fine-tune a GPT-2 into a chat model (supervised fine-tuning on conversations), then talk to it with chat.py.

    python chat_sft.py                                        # OpenAI's gpt2 on OpenAssistant/oasst1's English trees
    python chat_sft.py --init_from=log/model_19073.pt         # the model train_gpt2.py pretrained
    torchrun --standalone --nproc_per_node=8 chat_sft.py --init_from=log/model_19073.pt
    python chat_sft.py --data=HuggingFaceTB/smol-smoltalk     # any hub dataset with a `messages` column
    python chat_sft.py --data=chats.jsonl --export_dir=my-chat    # {"messages": [{"role": ..., "content": ...}]} a line
    python chat.py --model log_sft                            # then: talk to it

The model: --init_from is a train_gpt2.py checkpoint, a transformers GPT-2 directory, a hub id, or a chat model to
fine-tune further (a chat_sft.py run directory or checkpoint). It gets rows for the chat tokens of tokenizer.py's
format (ids 50257-50262): a model of 50257 rows is grown to train_gpt2.py's 50304 (see with_chat_rows).

The data: conversations of system (optional, first), user and assistant messages, user and assistant alternating.
- a hub dataset (datasets.load_dataset) or a local one (a directory written by save_to_disk): either oasst1's
  message trees (rows with message_id, parent_id, role prompter/assistant, text, rank, lang: each root prompt becomes
  one conversation that follows, at every level, the best-ranked reply; see oasst_conversations), or a `messages`
  column of [{"role", "content"}] (HuggingFaceTB/smol-smoltalk). A conversation of a dataset that breaks the format
  is skipped, and the log says how many and why.
- a .jsonl file, a {"messages": [...]} object per line: anything that breaks the format is an error (file:line).
The val loss uses the dataset's validation (else test) split; else a fixed, seeded --val_frac of the conversations
is held out. The log says which.

Each conversation is one row: its tokens in the chat format, the targets the next tokens, and the loss on the
assistant's tokens only (its content and <|assistant_end|>: the model learns to answer and to stop); every other
target is -1, which the model's cross-entropy ignores. A row holds at most block_size + 1 tokens: a longer
conversation is cut there, its later turns dropped (a reply cut in two is trained up to the cut), and one with no
assistant token left inside the window is dropped; the log counts both. The rows of a micro-batch are padded (to a
multiple of 64 tokens, targets -1) and the loss is the mean over a micro-batch's assistant tokens.

Everything train_gpt2.py guarantees holds here: its options' dialect (--help), torchrun (every rank sees what one
process accumulating the same total batch sees), bf16 and torch.compile on CUDA, checkpoints with an exact resume
after kill -9 (Ctrl-C and SIGTERM save one first), the log_dir lock, log.txt lines that plot.py draws, one error
line (exit code 2) for every bad input.
"""

import contextlib
import dataclasses
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from checkpoints import (append_log, compare_configs, failure_context, find_checkpoint, load_model,
                         load_optimizer_state, locked_run_dir, model_from_checkpoint, prepare_log_dir,
                         save_run_checkpoint, set_rng_state)
from export import hf_architecture, save_pretrained
from files import JSONLinesError, hub_offline, jsonl_records
from guards import check_finite, check_ranges, check_same_step
from model import GPT, GPT2_VOCAB_SIZE, PADDED_VOCAB_SIZE
from optim import adamw, due, get_lr, train_step
from options import ConfigError, help_text, option, parse
from runtime import (StopSignal, Writes, autocast, dist_from_env, get_device, init_distributed, script_main,
                     setup_precision, step_progress, wrap_ddp)
from tokenizer import (CHAT_FORMAT, CHAT_VOCAB_SIZE, ENDOFTEXT_ID, check_messages, decode_stream, generate_reply,
                       get_chat_encoding, is_chat_model, render_conversation, render_prompt)

SCRIPT = "chat_sft.py"
PAD_MULTIPLE = 64  # a micro-batch is padded to a multiple of this many tokens: few shapes for torch.compile
VAL_SPLITS = ("validation", "test")  # a dataset's held-out split, the first found


@dataclass
class SFTConfig:
    init_from: str = option("gpt2", "the model to fine-tune: a train_gpt2.py checkpoint (.pt), a transformers GPT-2 "
                                    "directory, a hub id (gpt2, gpt2-medium...), or a chat_sft.py run / checkpoint",
                            section="model and data")
    data: str = option("OpenAssistant/oasst1", "conversations: a hub dataset (oasst1's message trees, or a messages "
                                               "column), a save_to_disk directory, or a .jsonl file")
    data_config: str = option("", "the hub dataset's configuration, where it has several")
    lang: str = option("en", "oasst1 trees: only conversations in this language (its lang column; \"\": all)")
    val_frac: float = option(0.05, "data without a validation or test split: this fraction of the conversations "
                                    "is held out for the val loss (a fixed choice drawn from seed; 0: none)")
    val_conversations: int = option(1000, "the val loss covers the first N held-out conversations (0: all)")
    log_dir: str = option("log_sft", "log.txt, config.json and checkpoints model_NNNNN.pt")
    export_dir: str = option("", "at the end, write the model here as a transformers directory with the chat "
                                 "tokenizer and template (\"\": no export)")
    block_size: int = option(0, "the longest row: a conversation is cut after block_size + 1 tokens (0: the "
                                "model's own block_size)",
                             section="batch: total_batch_size conversations per step = batch_size * processes * "
                                     "grad_accum_steps")
    batch_size: int = option(4, "conversations per micro-batch and process")
    total_batch_size: int = option(32, "conversations per optimizer step")
    num_epochs: int = option(2, "passes over the train conversations, when max_steps is 0",
                             section="optimizer: AdamW, linear warmup then cosine decay to min_lr")
    max_steps: int = option(0, "optimizer steps (0: num_epochs * train conversations / total_batch_size)")
    max_lr: float = option(1e-4, "peak learning rate (pretraining's was 6e-4)")
    min_lr: float = option(0.0, "learning rate at the last step")
    warmup_steps: int = option(10, "linear warmup from max_lr / warmup_steps")
    weight_decay: float = option(0.0, "on matrices and embeddings")
    beta1: float = option(0.9, "AdamW's betas and eps (pretraining's)")
    beta2: float = option(0.95, "")
    eps: float = option(1e-8, "")
    grad_clip: float = option(1.0, "clip the global gradient norm (0: no clipping)")
    val_every: int = option(50, "val loss on the held-out conversations",
                            section="evaluation and checkpoints, every N steps and at the last step (0: never)")
    sample_every: int = option(50, "the greedy reply to sample_prompt")
    sample_prompt: str = option("What is the capital of France?", "the user message the samples answer")
    sample_length: int = option(48, "the longest sample reply, in tokens")
    checkpoint_every: int = option(100, "for an exact resume (Ctrl-C and SIGTERM save one too; the last step's always)")
    keep_checkpoints: int = option(2, "the newest N checkpoints are kept (0: all)")
    resume: str = option("auto", "\"auto\": the newest checkpoint in log_dir if any; a checkpoint path; \"\": a fresh "
                                 "run")
    device: str = option("auto", "auto (cuda, then mps, then cpu), cuda, mps or cpu", section="system")
    compile: bool = option(True, "torch.compile the model (cuda and cpu; ignored on mps)")
    seed: int = option(1337, "the held-out choice and the order of the conversations")


def check_config(cfg, world_size):
    """Raise ConfigError for a setting that can't work; return grad_accum_steps."""
    check_ranges(cfg, positive=("batch_size", "total_batch_size", "num_epochs", "max_lr", "sample_length"),
                 non_negative=("block_size", "max_steps", "min_lr", "warmup_steps", "weight_decay", "grad_clip",
                               "val_every", "sample_every", "checkpoint_every", "keep_checkpoints", "val_conversations"))
    if not 0 <= cfg.val_frac < 1:
        raise ConfigError(f"--val_frac must be in [0, 1), got {cfg.val_frac}")
    if not cfg.init_from or not cfg.data:
        raise ConfigError("--init_from and --data must name a model and conversations")
    per_micro_step = cfg.batch_size * world_size
    if cfg.total_batch_size % per_micro_step:
        raise ConfigError(f"total_batch_size {cfg.total_batch_size} is not a multiple of batch_size * processes = "
                          f"{cfg.batch_size} * {world_size} = {per_micro_step}")
    return cfg.total_batch_size // per_micro_step


# -----------------------------------------------------------------------------
# data: conversations from a .jsonl file or a dataset, with the split for the val loss

def read_jsonl(path):
    """The conversations of a .jsonl file, a {"messages": [...]} object per line (blank lines skipped), every one
    checked: anything else is a ConfigError naming the file and line."""
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such file")
    conversations = []
    try:
        for where, record in jsonl_records(path):
            if not isinstance(record, dict) or "messages" not in record:
                raise ConfigError(f"{where}: expected an object with a \"messages\" list, got {json.dumps(record):.60}")
            try:
                conversations.append(checked_conversation(record["messages"]))
            except ValueError as e:
                raise ConfigError(f"{where}: {e}") from None
    except JSONLinesError as e:
        raise ConfigError(str(e)) from None
    if not conversations:
        raise ConfigError(f"{path}: no conversations")
    return conversations


def checked_conversation(messages):
    """messages if they are a conversation to learn from, a user message at the end (no reply to learn) dropped;
    ValueError saying why not (check_messages, or no assistant message)."""
    check_messages(messages)
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant message: nothing to learn")
    return messages[:-1] if messages[-1]["role"] == "user" else messages


def open_dataset(name, config):
    """{split: datasets.Dataset} of a directory written by save_to_disk, or of a hub dataset. Offline
    (HF_HUB_OFFLINE, or a hub that does not answer) a hub dataset comes from the local datasets cache or not at all,
    at once (not after huggingface_hub's retries), as in fineweb.py."""
    import datasets

    label = f"{name} ({config})" if config else name
    if os.path.isdir(name):
        try:
            loaded = datasets.load_from_disk(name)
        except Exception as e:  # not a save_to_disk directory, or a damaged one: any type, one line
            raise ConfigError(f"{name}: not a dataset saved with save_to_disk ({type(e).__name__}: "
                              f"{(str(e).strip().splitlines() or [''])[0]})") from None
        return loaded if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    if os.path.exists(name) or name.startswith((".", "/", "~")) or name.endswith(".json"):
        raise ConfigError(f"--data {name}: expected a .jsonl file, a save_to_disk directory or a hub dataset id")
    offline = hub_offline(datasets.config.HF_HUB_OFFLINE)
    if offline:
        datasets.config.HF_HUB_OFFLINE = True  # fail at once where the cache lacks it
    try:
        loaded = datasets.load_dataset(name, name=config or None)
    except Exception as e:  # hub, network and format errors come in many types
        if offline:
            raise ConfigError(f"{label}: cannot load: {offline} and not in the local datasets cache; pass a .jsonl "
                              "file or a save_to_disk directory") from None
        raise ConfigError(f"{label}: cannot load ({type(e).__name__}: "
                          f"{(str(e).strip().splitlines() or [''])[0]})") from None
    return dict(loaded)


OASST_ROLES = {"prompter": "user", "assistant": "assistant"}
OASST_COLUMNS = ("message_id", "parent_id", "role", "text", "rank")


def oasst_conversations(rows, lang=""):
    """[(row of the root prompt, messages)]: the conversations of oasst1's message trees (rows: dicts with
    message_id, parent_id, role "prompter"/"assistant", text, rank, and optionally lang, deleted, review_result).

    Each root (no parent) starts one conversation, which follows the best-ranked reply at every level: the child
    with the lowest rank (0 is the best; an unranked child, rank None, counts as the worst; ties go to the first in
    the data) until a message without replies. A conversation ending with a prompt drops it (no reply to learn);
    a root without any reply gives none. Deleted messages and those that failed review, with their subtrees, are
    left out. lang: only roots of that language ("" for all)."""
    children, roots = {}, []
    for i, row in enumerate(rows):
        if row.get("deleted") or row.get("review_result") is False:
            continue
        if row["parent_id"] is None:
            roots.append((i, row))
        else:
            children.setdefault(row["parent_id"], []).append(row)
    conversations = []
    for i, root in roots:
        if lang and root.get("lang", lang) != lang:
            continue
        path = [root]
        while children.get(path[-1]["message_id"]):
            path.append(min(children[path[-1]["message_id"]],  # min keeps the first of equal keys
                            key=lambda r: (r["rank"] is None, r["rank"] or 0)))
        if path[-1]["role"] == "prompter":
            path.pop()
        if len(path) > 1:
            conversations.append((i, [{"role": OASST_ROLES.get(r["role"], r["role"]), "content": r["text"]}
                                      for r in path]))
    return conversations


def dataset_conversations(ds, label, lang, log):
    """Yield the conversations of one split, oasst1-style message rows or a messages column, one at a time. One that
    breaks the format is skipped; the log says how many, and the first one's row and problem."""
    columns = ds.column_names
    if "messages" in columns:
        found = ((i, messages) for start, batch in zip(range(0, len(ds), 1000), ds.select_columns(["messages"])
                                                        .iter(batch_size=1000))
                 for i, messages in enumerate(batch["messages"], start=start))
    elif all(c in columns for c in OASST_COLUMNS):
        wanted = [c for c in columns if c in OASST_COLUMNS + ("lang", "deleted", "review_result")]
        table = ds.select_columns(wanted).to_dict()
        rows = [dict(zip(table, values)) for values in zip(*table.values())]
        found = oasst_conversations(rows, lang)
    else:
        raise ConfigError(f"{label}: expected a \"messages\" column or oasst1's message rows "
                          f"({', '.join(OASST_COLUMNS)}); the columns are {', '.join(columns)}")
    skipped, first = 0, ""
    for i, messages in found:
        try:
            yield checked_conversation(messages)
        except ValueError as e:
            skipped += 1
            first = first or f"row {i}: {e}"
    if skipped:
        log(f"warning: {label}: skipped {skipped} conversations that break the chat format, the first: {first}")


def hold_out(rows, frac, seed):
    """(train, val): round(frac * N) rows (at least one) drawn with seed for val, the rest in order."""
    n_val = max(1, round(frac * len(rows)))
    if n_val >= len(rows):
        raise ConfigError(f"{len(rows)} conversations: too few to hold out {n_val} for the val loss "
                          "(--val_frac=0: no val loss)")
    held = set(np.random.default_rng(seed).permutation(len(rows))[:n_val].tolist())
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def load_rows(cfg, log):
    """(train rows, val rows, where val comes from) of --data: its conversations read, checked and tokenized one at a
    time (only their tokens are kept, not the text of a dataset of hundreds of thousands). Logs the counts."""
    if cfg.data.endswith(".jsonl"):
        label, splits = cfg.data, {"train": None}
    else:
        label = f"{cfg.data} ({cfg.data_config})" if cfg.data_config else cfg.data
        splits = open_dataset(cfg.data, cfg.data_config)
    train_split = "train" if "train" in splits else next(iter(splits)) if len(splits) == 1 else None
    if train_split is None:
        raise ConfigError(f"{label}: no train split (splits: {', '.join(splits)})")
    val_split = next((s for s in VAL_SPLITS if s in splits and s != train_split), None)

    def rows_of(split):
        if splits[split] is None:
            conversations = read_jsonl(cfg.data)
        else:
            conversations = dataset_conversations(splits[split], f"{label} {split}", cfg.lang, log)
        rows, cut, dropped = tokenize(conversations, cfg.block_size)
        if not rows and not dropped:
            raise ConfigError(f"{label} {split}: no conversations with an assistant turn"
                              + (f" in lang {cfg.lang!r} (--lang=\"\": every language)" if cfg.lang else ""))
        log(f"data: {label} {split}: {n_conversations(len(rows) + dropped)}, {cut:,} cut after block_size + 1 = "
            f"{cfg.block_size + 1} tokens, {dropped:,} dropped (no assistant token inside)")
        return rows

    train = rows_of(train_split)
    if val_split:
        return train, rows_of(val_split), f"the {val_split!r} split"
    if cfg.val_frac == 0:
        return train, [], "none (--val_frac=0)"
    train, val = hold_out(train, cfg.val_frac, cfg.seed)
    return train, val, f"{cfg.val_frac:g} of the conversations held out (drawn with seed {cfg.seed})"


# -----------------------------------------------------------------------------
# rows: conversations as tokens and targets, batches, the train order

def tokenize(conversations, block_size):
    """([(ids, trained)] numpy rows, number cut, number dropped): each conversation in the chat format
    (tokenizer.render_conversation), cut after block_size + 1 tokens (inputs: all tokens but the last, targets: all
    but the first), dropped if no assistant token is left to learn inside the cut."""
    enc = get_chat_encoding()
    rows, cut, dropped = [], 0, 0
    for messages in conversations:
        ids, mask = render_conversation(messages, enc)
        if len(ids) > block_size + 1:
            ids, mask = ids[:block_size + 1], mask[:block_size + 1]
            cut += 1
        if not any(mask[1:]):
            dropped += 1
            continue
        rows.append((np.array(ids, dtype=np.uint16), np.array(mask, dtype=bool)))
    return rows, cut, dropped


def collate(rows, block_size, device):
    """Inputs x and targets y (B, T) long on device for rows [(ids, trained)]: T the longest row's inputs rounded up
    to a multiple of PAD_MULTIPLE (at most block_size); y is -1 where a target is not trained and on padding."""
    longest = max(len(ids) for ids, _ in rows) - 1
    T = min(block_size, -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE)
    x = np.full((len(rows), T), ENDOFTEXT_ID, dtype=np.int64)
    y = np.full((len(rows), T), -1, dtype=np.int64)
    for i, (ids, trained) in enumerate(rows):
        n = len(ids) - 1
        x[i, :n] = ids[:-1]
        y[i, :n] = np.where(trained[1:], ids[1:].astype(np.int64), -1)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def fingerprint(rows):
    """A digest of the rows' tokens and targets: a resume checks it is training on the same rows."""
    digest = hashlib.sha256()
    for ids, trained in rows:
        digest.update(len(ids).to_bytes(4, "little"))
        digest.update(ids.tobytes())
        digest.update(trained.tobytes())
    return digest.hexdigest()[:16]


class ConversationLoader:
    """Micro-batches of the train rows for one rank, in a new seeded order every epoch.

    The rows form one stream, epoch after epoch, each epoch a permutation of them drawn from (seed, epoch). As in
    train_gpt2.TrainLoader, the stream is cut into micro-batches of B rows and micro-step m of rank r takes
    micro-batch m*W + r of its step: W ranks accumulating A micro-steps see the rows, in the same order, that one
    process accumulating W*A micro-steps sees. The position, rows taken by all ranks, resumes on any number of
    ranks, and the fingerprint of the rows is checked on resume."""

    def __init__(self, rows, B, block_size, rank, world_size, seed, device):
        self.rows, self.B, self.block_size, self.device = rows, B, block_size, device
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.position = 0  # stream index of the first row of the next group of W micro-batches
        self.fingerprint = fingerprint(rows)
        self._epoch, self._order = None, None

    def row(self, k):
        epoch, i = divmod(k, len(self.rows))
        if epoch != self._epoch:
            self._epoch, self._order = epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))
        return self.rows[self._order[i]]

    def next_batch(self):
        start = self.position + self.rank * self.B
        self.position += self.B * self.world_size
        return collate([self.row(k) for k in range(start, start + self.B)], self.block_size, self.device)

    def state_dict(self):
        return {"position": self.position, "rows": len(self.rows), "fingerprint": self.fingerprint}

    def load_state_dict(self, state):
        if (state["rows"], state["fingerprint"]) != (len(self.rows), self.fingerprint):
            raise ConfigError(f"the train conversations differ from the checkpoint's ({len(self.rows)} rows, "
                              f"fingerprint {self.fingerprint}; the checkpoint: {state['rows']}, "
                              f"{state['fingerprint']}): the data, --block_size or --lang changed, an exact resume "
                              "is impossible")
        self.position = state["position"]


@torch.no_grad()
def evaluate_loss(model, rows, *, B, block_size, device, autocast_dtype, rank, world_size):
    """Mean loss per assistant token over rows, in micro-batches of B rows, rank r taking micro-batches r, r+W...:
    the same value (up to float rounding) for any number of ranks."""
    totals = torch.zeros(2, device=device)  # sum of the token losses, number of tokens
    for start in range(rank * B, len(rows), world_size * B):
        x, y = collate(rows[start:start + B], block_size, device)
        with autocast(device.type, autocast_dtype):
            _, loss = model(x, y)
        count = (y != -1).sum()
        totals += torch.stack([loss.float() * count, count.float()])
    if world_size > 1:
        dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    return (totals[0] / totals[1]).item()


def sample_reply(model, prompt, length, device, autocast_dtype):
    """The model's greedy reply to one user message, as text (what chat.py --temperature=0 prints)."""
    ids = render_prompt([{"role": "user", "content": prompt}])
    length = min(length, model.config.block_size - len(ids))
    with autocast(device.type, autocast_dtype):
        tokens = list(generate_reply(model, torch.tensor([ids], device=device), max_new_tokens=length, temperature=0))
    return "".join(decode_stream(tokens, get_chat_encoding()))


# -----------------------------------------------------------------------------
# the model

def with_chat_rows(model, reset):
    """model with rows for the chat tokens (ids 50257-50262): a vocabulary under 50304 (OpenAI's 50257, an export's
    50263) grown to train_gpt2.py's padded 50304, so that every model fine-tuned here has the shapes of one
    pretrained here. Rows added take the mean of GPT-2's 50257 rows, and so do the chat tokens' rows when reset (a
    model never trained on them: in a train_gpt2.py model those rows never were an input and were only pushed to
    be never predicted); in wte, and in lm_head when it is untied.

    Why the mean: as an input it reads as an average token, not an outlier the blocks never saw. As an output row
    it gives a new token the logit h . mean = the mean of GPT-2's logits, which is at most the log of the mean of
    their exponentials (Jensen): each new token starts with at most the average token's probability, so the model's
    predictions over GPT-2's tokens barely move (Hewitt 2021, "Initializing New Word Embeddings for Pretrained
    Language Models"). A random row could start with any probability, and a zero row with logit 0, which can be
    far above a trained GPT-2's typical logit."""
    config = model.config
    if config.vocab_size < GPT2_VOCAB_SIZE:
        raise ConfigError(f"vocab_size {config.vocab_size} < {GPT2_VOCAB_SIZE}: not a GPT-2 vocabulary, which the "
                          "chat format extends")
    vocab = max(config.vocab_size, PADDED_VOCAB_SIZE)
    state = model.state_dict()
    keys = ["transformer.wte.weight"] + ([] if config.tie_embeddings else ["lm_head.weight"])
    for key in keys:
        old = state[key]
        mean = old[:GPT2_VOCAB_SIZE].mean(dim=0)
        new = mean.repeat(vocab, 1)
        new[:config.vocab_size] = old
        if reset:
            new[GPT2_VOCAB_SIZE:CHAT_VOCAB_SIZE] = mean
        state[key] = new
    if config.tie_embeddings:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    grown = GPT(dataclasses.replace(config, vocab_size=vocab))
    grown.load_state_dict(state)
    return grown


def initial_model(init_from, log):
    """The model to fine-tune, on the CPU, with its chat rows (with_chat_rows): a chat model keeps its own."""
    model, train_config = load_model(init_from)
    chat = is_chat_model(model, train_config)
    log(f"init_from={init_from}: " + ("a chat model, fine-tuned further" if chat else
                                      "a GPT-2; the chat tokens' rows start at the mean of GPT-2's rows"))
    return with_chat_rows(model, reset=not chat)


def row_length(block_size, model_block_size):
    """The --block_size in force: the model's own for 0; a longer one than the model has positions is refused."""
    if block_size > model_block_size:
        raise ConfigError(f"block_size {block_size} > the model's {model_block_size} positions: pass "
                          f"--block_size={model_block_size} or less (or leave it out: the model's own)")
    return block_size or model_block_size


def n_conversations(n):
    """'1 conversation', '1,234 conversations'."""
    return f"{n:,} conversation{'s' * (n != 1)}"


# -----------------------------------------------------------------------------
# the run

def run(cfg, d):
    """Fine-tune with cfg on this process's share of the ranks d; returns the exit code. Rank 0 holds log_dir's lock
    from the start: a second run into the same log_dir stops there."""
    with locked_run_dir(cfg.log_dir) if d.master else contextlib.nullcontext():
        return train(cfg, d)


def train(cfg, d):
    def log(message):
        if d.master:
            print(message, flush=True)

    grad_accum_steps = check_config(cfg, d.world_size)
    resume_path, checkpoint = find_checkpoint(cfg.log_dir, cfg.resume, log)
    device = get_device(cfg.device, d)
    if d.ddp:
        init_distributed(d, device)
        check_same_step(checkpoint["step"] if checkpoint else 0, device)
    autocast_dtype = setup_precision(device)

    # the model before the data: its block_size is the rows' length (--block_size=0), and a bad --init_from or
    # --block_size is one line before the data is read. The checkpoint's on resume, else init_from's with its chat rows
    if checkpoint:
        raw_model = model_from_checkpoint(checkpoint, resume_path)
    else:
        raw_model = initial_model(cfg.init_from, log)
    cfg = dataclasses.replace(cfg, block_size=row_length(cfg.block_size, raw_model.config.block_size))
    if cfg.export_dir:  # found out now, not after the training: save_pretrained's own check
        try:
            hf_architecture(raw_model.config)
        except ValueError as e:
            raise ConfigError(f"--export_dir: {e}") from None

    t0 = time.perf_counter()
    train_rows, val_rows, val_source = load_rows(cfg, log)
    if cfg.val_conversations:
        val_rows = val_rows[:cfg.val_conversations]
    if not train_rows:
        raise ConfigError(f"{cfg.data}: no conversation has an assistant token within block_size {cfg.block_size}")
    trained_tokens = sum(int(trained[1:].sum()) for _, trained in train_rows)
    log(f"data: train {n_conversations(len(train_rows))} ({trained_tokens:,} assistant tokens), val "
        f"{n_conversations(len(val_rows))}, {val_source} ({time.perf_counter() - t0:.1f} s)")
    max_steps = cfg.max_steps or max(1, cfg.num_epochs * len(train_rows) // cfg.total_batch_size)
    cfg = dataclasses.replace(cfg, max_steps=max_steps)  # what config.json and the checkpoints record
    loader = ConversationLoader(train_rows, cfg.batch_size, cfg.block_size, d.rank, d.world_size, cfg.seed, device)
    raw_model.to(device)
    optimizer = adamw(raw_model, lr=cfg.max_lr, weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2),
                      eps=cfg.eps, device_type=device.type, verbose=d.master)
    start_step = checkpoint["step"] if checkpoint else 0
    if checkpoint:
        load_optimizer_state(optimizer, checkpoint["optimizer"])
        loader.load_state_dict(checkpoint["loader"])
        set_rng_state(checkpoint["rng"], device)
        changed = compare_configs(checkpoint["train_config"], dataclasses.asdict(cfg))
        log(f"resuming from {resume_path} at step {start_step}" +
            (f"; changed options: {'; '.join(changed)}" if changed else ""))
        del checkpoint
    use_compile = cfg.compile and device.type != "mps"
    model = torch.compile(raw_model) if use_compile else raw_model
    train_model = wrap_ddp(model, d, device) if d.ddp else model  # train_gpt2's options: no gradient copies

    # rank 0's files: one that cannot be written (a full disk) stops every rank, one line naming the last checkpoint
    writes = Writes(d.ddp, context=lambda step: failure_context(cfg.log_dir, step))

    def export():
        if cfg.export_dir and d.master:
            writes.write(cfg.max_steps, save_pretrained, raw_model, cfg.export_dir, chat=True)
            if not writes.failed:
                log(f"exported to {cfg.export_dir}: python chat.py --model {cfg.export_dir}, or transformers")
        writes.agreed(device)

    if start_step >= cfg.max_steps:
        log(f"{resume_path} is at step {start_step}, max_steps is {cfg.max_steps}: nothing to do")
        export()
        return 0

    train_config = {**dataclasses.asdict(cfg), "chat_format": CHAT_FORMAT}  # chat.py knows a chat model by it
    log_path = None
    if d.master:
        resolved = {"train_config": train_config, "model_config": dataclasses.asdict(raw_model.config),
                    "world_size": d.world_size, "grad_accum_steps": grad_accum_steps, "device": str(device),
                    "num_params": raw_model.num_params(), "compile": use_compile, "val": val_source,
                    "train_conversations": len(train_rows), "val_conversations": len(val_rows),
                    "autocast_dtype": str(autocast_dtype) if autocast_dtype else "float32"}
        print(json.dumps(resolved, indent=2))
        log_path = writes.write(start_step, prepare_log_dir, cfg.log_dir, start_step, resolved)

    def record(step, kind, value, fmt):
        if d.master:
            writes.write(step, append_log, log_path, step, kind, value, fmt)

    def save(step):
        return writes.write(step, save_run_checkpoint, cfg.log_dir, step, keep=cfg.keep_checkpoints, master=d.master,
                            log=log, raw_model=raw_model, optimizer=optimizer, loader=loader,
                            train_config=train_config, device=device)

    epochs = cfg.max_steps * cfg.total_batch_size / len(train_rows)
    log(f"total batch {cfg.total_batch_size} conversations = {cfg.batch_size} x {d.world_size} process(es) x "
        f"{grad_accum_steps} micro-steps; {cfg.max_steps} steps ({epochs:.2f} epochs); "
        f"{raw_model.num_params():,} parameters on {device}")
    step_times = []
    with StopSignal(writes) as stop:  # SIGINT / SIGTERM: finish the step, save, exit
        for step in range(start_step, cfg.max_steps + 1):
            last = step == cfg.max_steps
            # --- evaluations of the model after `step` optimizer steps: the first is the model before fine-tuning
            do_val = bool(val_rows) and due(step, cfg.val_every, last)
            do_sample = d.master and due(step, cfg.sample_every, last)
            if do_val or do_sample:
                raw_model.eval()  # eager: the evals' shapes vary, a compiled model would recompile
                if do_val:
                    val_loss = evaluate_loss(raw_model, val_rows, B=cfg.batch_size, block_size=cfg.block_size,
                                             device=device, autocast_dtype=autocast_dtype, rank=d.rank,
                                             world_size=d.world_size)
                    log(f"step {step:5d} | val loss {val_loss:.4f} (on the assistant tokens)")
                    record(step, "val", val_loss, ".4f")
                if do_sample:
                    reply = sample_reply(raw_model, cfg.sample_prompt, cfg.sample_length, device, autocast_dtype)
                    log(f"step {step:5d} | sample: {cfg.sample_prompt!r} -> {reply!r}")
                raw_model.train()
                # a stop asked for during the evals: saved now, not after another step (schedulers kill 30 s on)
                if code := stop.stop_at(step, save, SCRIPT, stop.agreed(device, d.ddp), d, device):
                    return code
            if step > start_step and (last or due(step, cfg.checkpoint_every, last)):
                save(step)
            if last:
                break
            # --- one optimizer step
            t0 = time.perf_counter()
            batches = [loader.next_batch() for _ in range(grad_accum_steps)]
            lr = get_lr(step, max_lr=cfg.max_lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps,
                        max_steps=cfg.max_steps)
            loss, grad_norm = train_step(train_model, optimizer, batches, lr=lr, grad_clip=cfg.grad_clip,
                                         device_type=device.type, autocast_dtype=autocast_dtype, ddp=d.ddp)
            loss, grad_norm = loss.item(), grad_norm.item()
            dt = time.perf_counter() - t0
            step_times.append(dt)
            if not check_finite(loss, grad_norm, step, cfg.log_dir, d.master, SCRIPT):
                return 1
            progress, eta = step_progress(step, cfg.max_steps, step_times)
            log(f"step {progress} | loss {loss:.6f} | lr {lr:.4e} | norm {grad_norm:.4f} | {dt * 1000:.1f} ms | "
                f"{cfg.total_batch_size / dt:.1f} conversations/s | {eta}")
            record(step, "train", loss, ".6f")
            if code := stop.stop_after(step, save, SCRIPT, device, d):  # SIGINT / SIGTERM on any rank
                return code
    steady = step_times[1:] or step_times  # the first step includes torch.compile's work and warm-up
    if steady:
        log(f"done: {len(steady)} steps averaged {1000 * sum(steady) / len(steady):.1f} ms/step "
            "(the first step of this process excluded)")
    export()
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(help_text(SFTConfig, SCRIPT, __doc__))
        return 0
    d = dist_from_env()
    return script_main(SCRIPT, d, lambda: run(parse(SFTConfig, argv)[0], d))


if __name__ == "__main__":
    sys.exit(main())
