"""chat_sft.py and chat.py on CPU with tiny models and conversations generated here: the chat format and its mask,
oasst1's trees, the data sources and their errors, a model that learns a few conversations and answers them through
chat.py, bitwise resume after kill -9 and SIGTERM, 2 gloo processes == 1, the transformers export with its chat
template, growing OpenAI's 50257 rows. Nothing from the network.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_chat.py
"""

import contextlib
import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torch.testing import assert_close

import chat
import chat_sft
import checkpoints
from conftest import ROOT
from model import GPT, GPTConfig, GPT2_VOCAB_SIZE
from test_hub_offline import hf_env
from test_train import assert_same_run, load, losses, read_log
from export import save_hf_tokenizer
from tokenizer import (ASSISTANT_END, ASSISTANT_START, CHAT_SPECIAL_TOKENS, CHAT_TEMPLATE, CHAT_VOCAB_SIZE,
                       ENDOFTEXT_ID, check_messages, decode_stream, generate_reply, get_chat_encoding, get_encoding,
                       render_conversation, render_prompt, render_turns)

SFT = os.path.join(ROOT, "chat_sft.py")
CHAT = os.path.join(ROOT, "chat.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY = dict(block_size=64, vocab_size=50304, n_layer=2, n_head=2, n_embd=32)
QA = [("What is the capital of France?", "Paris."), ("What is two plus two?", "Four."), ("Name a color.", "Blue."),
      ("Who wrote Hamlet?", "Shakespeare."), ("What do bees make?", "Honey."), ("Say hello.", "Hello!")]


def qa_conversation(question, answer):
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def arithmetic_conversations(n, seed=0):
    """n short conversations, some with a system message, some with two exchanges."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a, b, c = (int(v) for v in rng.integers(0, 50, 3))
        messages = [{"role": "system", "content": "You add numbers."}] if i % 3 == 0 else []
        messages += [{"role": "user", "content": f"What is {a} plus {b}?"},
                     {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]
        if i % 4 == 1:
            messages += [{"role": "user", "content": f"And plus {c}?"},
                         {"role": "assistant", "content": f"That makes {a + b + c}."}]
        out.append({"messages": messages})
    return out


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)
    return str(path)


def sft_args(init_from, data, log_dir, **overrides):
    args = dict(init_from=init_from, data=data, log_dir=log_dir, block_size=64, batch_size=2, total_batch_size=4,
                max_steps=30, max_lr=3e-3, warmup_steps=3, val_every=10, sample_every=0, checkpoint_every=10,
                compile=False, val_frac=0.2)
    args.update(overrides)
    return [f"--{k}={v}" for k, v in args.items()]


def one_error_line(capsys, prefix="chat_sft.py: error: "):
    err = capsys.readouterr().err
    assert err.startswith(prefix) and err.count("\n") == 1, err
    return err


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory):
    """A random tiny GPT of train_gpt2.py's padded vocabulary, as a checkpoint file (what load_model reads)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY))
    path = tmp_path_factory.mktemp("base") / "base.pt"
    torch.save({"model": model.state_dict(), "config": dataclasses.asdict(model.config)}, path)
    return str(path)


@pytest.fixture(scope="module")
def sums_jsonl(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "sums.jsonl", arithmetic_conversations(24))


# -----------------------------------------------------------------------------
# the chat format

def test_chat_tokens_follow_gpt2s(enc):
    chat_enc = get_chat_encoding()
    assert CHAT_SPECIAL_TOKENS == {"<|system_start|>": 50257, "<|system_end|>": 50258, "<|user_start|>": 50259,
                                   "<|user_end|>": 50260, "<|assistant_start|>": 50261, "<|assistant_end|>": 50262}
    assert CHAT_VOCAB_SIZE == chat_enc.n_vocab == 50263 <= GPTConfig(**TINY).vocab_size  # no resize for 50304
    text = "Hello world, ünïcödé 👋 <|endoftext|>"
    assert chat_enc.encode_ordinary(text) == enc.encode_ordinary(text)  # GPT-2's ids for every text
    assert chat_enc.encode("<|user_start|>hi", allowed_special="all") == [50259, 5303]
    assert chat_enc.encode_ordinary("<|user_start|>") == enc.encode_ordinary("<|user_start|>")  # text, not a token


def test_render_round_trip_and_mask():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 👋"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Who <|user_end|> are you?"},
                {"role": "assistant", "content": " A model.\n"}]
    ids, mask = render_conversation(messages)
    chat_enc = get_chat_encoding()
    assert chat_enc.decode(ids) == ("<|endoftext|><|system_start|>Be brief.<|system_end|><|user_start|>Hi 👋"
                                    "<|user_end|><|assistant_start|>Hello!<|assistant_end|><|user_start|>Who "
                                    "<|user_end|> are you?<|user_end|><|assistant_start|> A model.\n<|assistant_end|>")
    assert ids[0] == ENDOFTEXT_ID and len(ids) == len(mask)
    # the trained targets are exactly the assistants' content tokens and their <|assistant_end|>
    trained = [t for t, m in zip(ids, mask) if m]
    assert trained == chat_enc.encode_ordinary("Hello!") + [ASSISTANT_END] + chat_enc.encode_ordinary(" A model.\n") \
        + [ASSISTANT_END]
    starts = [i for i, t in enumerate(ids) if t == ASSISTANT_START]
    assert all(mask[i] == 0 for i in starts) and all(mask[i + 1] == 1 for i in starts)
    # the targets a row trains on: -1 wherever the mask is 0, padding included
    x, y = chat_sft.collate([(np.array(ids, dtype=np.uint16), np.array(mask, dtype=bool))], 64, torch.device("cpu"))
    assert x.shape == (1, 64) and torch.equal(x[0, :len(ids) - 1], torch.tensor(ids[:-1]))
    assert y[0][y[0] != -1].tolist() == trained and (y[0, len(ids) - 1:] == -1).all()
    # a prompt is the conversation up to the reply's <|assistant_start|>
    assert render_prompt(messages[:4]) == ids[:starts[1] + 1]
    assert render_prompt(messages[:4]) == render_turns([(m["role"], chat_enc.encode_ordinary(m["content"]))
                                                         for m in messages[:4]], prompt=True)[0]


@pytest.mark.parametrize("messages, message", [
    ([], "'messages' must be a non-empty list"),
    ("hi", "'messages' must be a non-empty list"),
    ([{"role": "user"}], "messages[0]: expected an object with 'role' and 'content'"),
    ([{"role": "bot", "content": "x"}], "messages[0]: unknown role 'bot'"),
    ([{"role": "user", "content": 3}], "messages[0] (user): content must be a string, got int"),
    ([{"role": "user", "content": " \n"}], "messages[0] (user): empty content"),
    ([{"role": "assistant", "content": "x"}], "messages[0]: roles out of order: expected user, got assistant"),
    ([{"role": "user", "content": "x"}, {"role": "user", "content": "y"}], "messages[1]: roles out of order"),
    ([{"role": "user", "content": "x"}, {"role": "system", "content": "y"}], "expected assistant, got system"),
])
def test_check_messages(messages, message):
    with pytest.raises(ValueError) as e:
        check_messages(messages)
    assert message in str(e.value) and "\n" not in str(e.value)


def is_utf8(data):
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_decode_stream_holds_back_split_characters():
    chat_enc = get_chat_encoding()
    text = "naïve 日本語 👋🏽👨‍👩‍👧 ok"
    ids = chat_enc.encode_ordinary(text)
    split = [t for t in ids if not is_utf8(chat_enc.decode_single_token_bytes(t))]
    assert len(split) > 5  # tokens holding part of a character
    pieces = list(decode_stream(ids, chat_enc))
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces) and len(pieces) > 3
    broken = ids[:-3] + [chat_enc.encode_ordinary("👋")[0]]  # an emoji's first byte alone, at the end
    assert "".join(decode_stream(broken, chat_enc)) == chat_enc.decode(broken)


def test_fit_context_drops_the_oldest_exchanges():
    system = ("system", [1] * 5)
    turns = [system] + [(role, [2] * 10) for role in ("user", "assistant")] * 3 + [("user", [3] * 4)]
    prompt, kept, budget = chat.fit_context(turns, block_size=64, max_new_tokens=20)
    assert kept == [system, ("user", [2] * 10), ("assistant", [2] * 10), ("user", [3] * 4)]  # 2 exchanges dropped
    assert prompt == render_turns(kept, prompt=True)[0] and len(prompt) + 20 <= 64 and budget == 20
    # only the new message left: the reply gets what room there is; a message that fills the context is refused
    prompt, kept, budget = chat.fit_context([system, ("user", [3] * 40)], block_size=64, max_new_tokens=30)
    assert len(kept) == 2 and budget == 64 - len(prompt) == 64 - 51
    with pytest.raises(ValueError, match="the message is too long: 64 tokens in the chat format with the system"):
        chat.fit_context([system, ("user", [3] * 53)], block_size=64, max_new_tokens=1)


def test_stream_samples_the_chat_tokens_and_generate_is_unchanged():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY, tie_embeddings=False)).eval()
    idx = torch.tensor([[ENDOFTEXT_ID, 50259, 40]])
    hidden = []
    model.transformer.ln_f.register_forward_hook(lambda module, args, out: hidden.append(out[0, -1]))
    with torch.no_grad():  # logits: 0 everywhere but |h|^2 for <|assistant_end|> and 2 |h|^2 for a padding id
        model(idx)
        model.lm_head.weight.zero_()
        model.lm_head.weight[ASSISTANT_END] = hidden[-1]
        model.lm_head.weight[50300] = 2 * hidden[-1]
    first = next(model.stream(idx, 3, temperature=0, num_tokens=CHAT_VOCAB_SIZE))
    assert first.item() == ASSISTANT_END  # chat tokens may be sampled, padding ids never
    assert model.generate(idx, 1, temperature=0)[0, 3].item() < GPT2_VOCAB_SIZE  # generate: GPT-2's ids only
    torch.manual_seed(0)  # generate is stream's tokens appended: the same seeded top-k samples
    model = GPT(GPTConfig(**TINY)).eval()
    gen = torch.Generator().manual_seed(5)
    streamed = torch.cat(list(model.stream(idx, 6, top_k=20, generator=gen)), dim=1)
    assert torch.equal(torch.cat([idx, streamed], dim=1),
                       model.generate(idx, 6, top_k=20, generator=torch.Generator().manual_seed(5)))


# -----------------------------------------------------------------------------
# data: oasst1's trees, datasets, held-out splits, the loader

def oasst_rows():
    """Message rows in oasst1's shape: en tree 1 (branches ranked 1/0/None, a second level), de tree 2, en tree 3 (a
    prompt without replies), en tree 4 (the best reply deleted, ending with a prompt), tree 5 failed review."""
    def msg(mid, parent, role, text, rank=None, lang="en", tree="t1", deleted=False, review=True):
        return dict(message_id=mid, parent_id=parent, role=role, text=text, rank=rank, lang=lang,
                    message_tree_id=tree, deleted=deleted, review_result=review)
    return [
        msg("p1", None, "prompter", "Tell me a joke."),
        msg("a1", "p1", "assistant", "Second best joke.", rank=1),
        msg("a5", "p1", "assistant", "Unranked joke."),
        msg("a2", "p1", "assistant", "Best joke.", rank=0),
        msg("p2", "a2", "prompter", "Another one?"),
        msg("p3", "a2", "prompter", "Explain it."),
        msg("a3", "p2", "assistant", "Unranked another."),
        msg("a4", "p2", "assistant", "Ranked another.", rank=0),
        msg("q1", None, "prompter", "Erzähl einen Witz.", lang="de", tree="t2"),
        msg("r1", "q1", "assistant", "Ein Witz.", rank=0, lang="de", tree="t2"),
        msg("s1", None, "prompter", "Nobody answers this.", tree="t3"),
        msg("u1", None, "prompter", "What is 2+2?", tree="t4"),
        msg("v1", "u1", "assistant", "Deleted answer.", rank=0, tree="t4", deleted=True),
        msg("v2", "u1", "assistant", "4.", rank=1, tree="t4"),
        msg("w1", "v2", "prompter", "Thanks!", tree="t4"),
        msg("x1", None, "prompter", "Rejected.", tree="t5", review=False),
        msg("y1", "x1", "assistant", "Rejected reply.", rank=0, tree="t5"),
    ]


def conversation(*texts):
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(texts)]


def test_oasst_trees_follow_the_best_ranked_replies():
    got = chat_sft.oasst_conversations(oasst_rows(), lang="en")
    assert got == [(0, conversation("Tell me a joke.", "Best joke.", "Another one?", "Ranked another.")),
                   (11, conversation("What is 2+2?", "4."))]
    every = [messages for _, messages in chat_sft.oasst_conversations(oasst_rows(), lang="")]
    assert conversation("Erzähl einen Witz.", "Ein Witz.") in every and len(every) == 3


def save_dataset(path, splits):
    from datasets import Dataset, DatasetDict

    DatasetDict({name: Dataset.from_list(rows) for name, rows in splits.items()}).save_to_disk(str(path))
    return str(path)


def as_tuples(rows):
    return [(tuple(ids.tolist()), tuple(trained.tolist())) for ids, trained in rows]


def test_datasets_splits_and_held_out_fraction(tmp_path, capsys):
    # oasst1-shaped rows with a validation split: that split is the val data
    path = save_dataset(tmp_path / "oasst", {"train": oasst_rows(), "validation": oasst_rows()[-7:]})
    cfg = chat_sft.SFTConfig(data=path, block_size=64)
    train, val, source = chat_sft.load_rows(cfg, print)
    assert len(train) == 2 and source == "the 'validation' split"
    assert as_tuples(val) == as_tuples(chat_sft.tokenize([conversation("What is 2+2?", "4.")], 64)[0])
    # a messages column without a held-out split: a fixed seeded fraction; a broken row is skipped and reported
    rows = arithmetic_conversations(40) + [{"messages": [{"role": "user", "content": "no reply"},
                                                         {"role": "user", "content": "twice"}]}]
    path = save_dataset(tmp_path / "msgs", {"train": rows})
    capsys.readouterr()
    cfg = chat_sft.SFTConfig(data=path, val_frac=0.1, seed=3, block_size=64)
    train, val, source = chat_sft.load_rows(cfg, print)
    assert (len(train), len(val)) == (36, 4) and source == "0.1 of the conversations held out (drawn with seed 3)"
    out = capsys.readouterr().out
    assert "skipped 1 conversations that break the chat format, the first: row 40: messages[1]: roles out of " \
           "order" in out and f"data: {path} train: 40 conversations, 0 cut after block_size + 1 = 65 tokens" in out
    every = chat_sft.tokenize([r["messages"] for r in rows[:40]], 64)[0]
    assert sorted(as_tuples(train + val)) == sorted(as_tuples(every))
    assert as_tuples(chat_sft.load_rows(cfg, print)[1]) == as_tuples(val)  # the same choice every time
    assert as_tuples(chat_sft.load_rows(dataclasses.replace(cfg, seed=4), print)[1]) != as_tuples(val)


def test_truncation_and_loader_order(sums_jsonl):
    conversations = [c["messages"] for c in arithmetic_conversations(24)]
    assert chat_sft.read_jsonl(sums_jsonl) == conversations
    rows, cut, dropped = chat_sft.tokenize(conversations, block_size=24)
    assert cut > 0 and all(len(ids) <= 25 for ids, _ in rows)
    long = [{"role": "user", "content": "word " * 40}, {"role": "assistant", "content": "ok"}]
    assert chat_sft.tokenize([long], block_size=24)[1:] == (1, 1)  # cut before any assistant token: dropped
    rows = chat_sft.tokenize(conversations, block_size=64)[0]
    cpu = torch.device("cpu")
    B, W, A = 2, 2, 3
    single = chat_sft.ConversationLoader(rows, B, 64, 0, 1, 7, cpu)
    ranks = [chat_sft.ConversationLoader(rows, B, 64, r, W, 7, cpu) for r in range(W)]
    seen = []
    for _ in range(5):  # 5 steps of 12 rows: two epochs of 24 rows and a half
        expected = [single.next_batch() for _ in range(W * A)]
        for m in range(A):
            for r in range(W):
                x, y = ranks[r].next_batch()
                assert torch.equal(x, expected[m * W + r][0]) and torch.equal(y, expected[m * W + r][1])
        seen += [tuple(row.tolist()) for x, _ in expected for row in x]
    first_epoch, second_epoch = seen[:24], seen[24:48]
    assert sorted(first_epoch) == sorted(second_epoch) and first_epoch != second_epoch  # each row once, reshuffled
    fresh = chat_sft.ConversationLoader(rows, B, 64, 1, W, 7, cpu)
    fresh.load_state_dict(ranks[1].state_dict())
    assert torch.equal(fresh.next_batch()[0], ranks[1].next_batch()[0])
    with pytest.raises(chat_sft.ConfigError, match="the train conversations differ from the checkpoint's"):
        chat_sft.ConversationLoader(rows[1:], B, 64, 0, 1, 7, cpu).load_state_dict(single.state_dict())


# -----------------------------------------------------------------------------
# the model's chat rows

def test_growing_openais_50257_rows(tiny_hf_dir):
    original = GPT.from_pretrained(tiny_hf_dir).eval()
    grown = chat_sft.initial_model(tiny_hf_dir, print).eval()
    assert grown.config.vocab_size == 50304 and original.config.vocab_size == 50257
    wte = original.transformer.wte.weight
    new = grown.transformer.wte.weight
    assert torch.equal(new[:50257], wte) and grown.lm_head.weight is new  # still tied
    assert_close(new[50257:], wte.mean(0).expand(47, -1))
    idx = torch.tensor([[ENDOFTEXT_ID] + get_encoding().encode_ordinary("Hello there, who are you?")])
    with torch.no_grad():
        before, after = original(idx)[0], grown(idx)[0]
    assert_close(after[..., :50257], before, rtol=1e-5, atol=1e-5)  # GPT-2's logits unchanged
    # each new token: the mean of GPT-2's logits (at most the average token's probability, by Jensen)
    assert_close(after[..., 50257:], before.mean(-1, keepdim=True).expand(-1, -1, 47), rtol=1e-4, atol=1e-4)
    probs = after.softmax(-1)
    assert (probs[..., 50257:] <= 1 / 50257 + 1e-9).all()
    # a 50304-row model keeps its shape; the chat rows start at the mean, the padding rows stay
    torch.manual_seed(0)
    padded = GPT(GPTConfig(**TINY))
    reset = chat_sft.with_chat_rows(padded, reset=True)
    w, r = padded.transformer.wte.weight, reset.transformer.wte.weight
    assert torch.equal(r[:50257], w[:50257]) and torch.equal(r[50263:], w[50263:])
    assert_close(r[50257:50263], w[:50257].mean(0).expand(6, -1))
    assert torch.equal(chat_sft.with_chat_rows(padded, reset=False).transformer.wte.weight, w)


# -----------------------------------------------------------------------------
# a model that learns a handful of conversations, answers them through chat.py, and exports to transformers

@pytest.fixture(scope="module")
def trained(tmp_path_factory, base_ckpt):
    """(log_dir, export_dir, stdout) of a tiny model fine-tuned on QA (a save_to_disk dataset whose validation split
    holds the same conversations), exported at the end."""
    tmp = tmp_path_factory.mktemp("trained")
    rows = [qa_conversation(q, a) for q, a in QA]
    data = save_dataset(tmp / "qa", {"train": rows, "validation": rows})
    log_dir, export_dir = str(tmp / "log"), str(tmp / "export")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = chat_sft.main(sft_args(base_ckpt, data, log_dir, batch_size=6, total_batch_size=6, max_steps=60,
                                      max_lr=1e-2, val_every=30, sample_every=60, checkpoint_every=0,
                                      export_dir=export_dir))
    assert code == 0
    return log_dir, export_dir, out.getvalue()


def test_sft_learns_and_logs(trained):
    log_dir, _, out = trained
    text = read_log(log_dir)
    val = losses(text, "val")
    assert sorted(val) == [0, 30, 60] and val[0] > 9 and val[60] < 0.5  # plot.py's format, before and after
    assert sorted(losses(text)) == list(range(60))
    assert "sample: 'What is the capital of France?' -> 'Paris.'" in out
    assert "val 6 conversations, the 'validation' split" in out
    ckpt = load(os.path.join(log_dir, "model_00060.pt"))
    assert ckpt["train_config"]["chat_format"] == "gpt2-chat-v1" and ckpt["config"]["vocab_size"] == 50304
    saved = json.load(open(os.path.join(log_dir, "config.json")))
    assert saved["train_conversations"] == 6 and saved["train_config"]["max_steps"] == 60


def run_chat(*args, stdin=None):
    return subprocess.run([sys.executable, CHAT, *args], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env=ENV, input=stdin)


def test_chat_prompt_answers_greedily(trained, capsys):
    log_dir, _, _ = trained
    for question, answer in QA[:2]:  # the command itself, as a user runs it
        result = run_chat("--model", log_dir, "--prompt", question, "--temperature", "0", "--max_new_tokens", "20")
        assert result.returncode == 0 and result.stdout == answer + "\n", result.stderr
    for question, answer in QA:  # all of them, in this process
        assert chat.main(["--model", log_dir, "--prompt", question, "--temperature=0", "--max_new_tokens=20"]) == 0
        assert capsys.readouterr().out == answer + "\n"


def test_chat_interactive(trained):
    log_dir, _, _ = trained
    result = run_chat("--model", os.path.join(log_dir, "model_00060.pt"), "--temperature", "0",
                      stdin="What do bees make?\n\n/clear\nSay hello.\n/quit\nnever read\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ("\nUser: Assistant: Honey.\n\nUser: \nUser: (a new conversation)\n\nUser: Assistant: "
                             "Hello!\n\nUser: ")
    assert "/clear starts over" in result.stderr


def test_export_chat_template_and_greedy_generate_equal_ours(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log_dir, export_dir, _ = trained
    config = json.load(open(os.path.join(export_dir, "tokenizer_config.json")))
    assert config["chat_template"] == CHAT_TEMPLATE
    assert json.load(open(os.path.join(export_dir, "config.json")))["vocab_size"] == CHAT_VOCAB_SIZE
    tok = AutoTokenizer.from_pretrained(export_dir)
    hf = AutoModelForCausalLM.from_pretrained(export_dir).eval()
    assert len(tok) == CHAT_VOCAB_SIZE
    assert all(tok.convert_tokens_to_ids(t) == i for t, i in CHAT_SPECIAL_TOKENS.items())
    long_conversation = [{"role": "system", "content": "Ünïcödé 👋 system\n"}] + conversation(
        "  Hi there,\tfriend ", "Hello!\n\nHow can I help?", "don't stop  ")
    for messages in [conversation(q) for q, _ in QA] + [long_conversation]:
        assert tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False) == \
            render_prompt(messages)
    assert tok.apply_chat_template(long_conversation[:-1], return_dict=False) == \
        render_conversation(long_conversation[:-1])[0]
    ours = chat.load_chat_model(log_dir).eval()
    for question, answer in QA:
        ids = tok.apply_chat_template(conversation(question), add_generation_prompt=True, return_dict=False)
        out = hf.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)[0, len(ids):].tolist()
        reply = list(generate_reply(ours, torch.tensor([ids]), max_new_tokens=20, temperature=0))
        assert out == reply + [ASSISTANT_END]  # transformers stops at <|assistant_end|> (generation_config)
        assert tok.decode(out, skip_special_tokens=True) == answer
    # chat.py reads the export too
    result = run_chat("--model", export_dir, "--prompt", QA[3][0], "--temperature", "0")
    assert result.returncode == 0 and result.stdout == QA[3][1] + "\n", result.stderr


# -----------------------------------------------------------------------------
# exact resume after kill -9 and SIGTERM, torchrun

RESUME = dict(max_steps=40, checkpoint_every=5, val_every=10, keep_checkpoints=2)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, base_ckpt, sums_jsonl):
    log_dir = str(tmp_path_factory.mktemp("straight") / "log")
    assert chat_sft.main(sft_args(base_ckpt, sums_jsonl, log_dir, **RESUME)) == 0
    return log_dir


def start(args):
    return subprocess.Popen([sys.executable, SFT, *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=ENV)


def trained_steps(log_dir):
    path = os.path.join(log_dir, "log.txt")
    complete = open(path).read().split("\n")[:-1] if os.path.exists(path) else []
    return [int(line.split()[0]) for line in complete if " train " in line]


def test_resume_after_kill_9_is_bitwise_identical(straight, base_ckpt, sums_jsonl, tmp_path):
    broken = str(tmp_path / "broken")
    args = sft_args(base_ckpt, sums_jsonl, broken, **RESUME)
    proc = start(args)
    try:
        deadline = time.time() + 100
        while time.time() < deadline:
            assert proc.poll() is None, f"the run ended before it was killed: {proc.stderr.read()}"
            saved, steps = checkpoints.list_checkpoints(broken), trained_steps(broken)
            if saved and steps and max(steps) >= saved[-1][0] + 2:  # a checkpoint, then more steps
                break
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and not os.path.exists(checkpoints.checkpoint_path(broken, 40))
    assert chat_sft.main(args) == 0
    assert_same_run(straight, broken, 40)


def test_sigterm_saves_and_the_rerun_continues_exactly(straight, base_ckpt, sums_jsonl, tmp_path):
    stopped = str(tmp_path / "stopped")
    args = sft_args(base_ckpt, sums_jsonl, stopped, **dict(RESUME, checkpoint_every=1000))
    proc = start(args)
    deadline = time.time() + 100
    while not trained_steps(stopped) or max(trained_steps(stopped)) < 12:
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    (step, path), = checkpoints.list_checkpoints(stopped)
    assert err == f"chat_sft.py: stopped at step {step} (SIGTERM); saved {path}; run the same command to continue\n"
    assert chat_sft.main(args) == 0
    assert_same_run(straight, stopped, 40)


def test_ddp_two_processes_equal_one_accumulating(base_ckpt, sums_jsonl, tmp_path):
    common = dict(max_steps=8, val_every=4, checkpoint_every=0)
    ddp_dir, single_dir = str(tmp_path / "ddp"), str(tmp_path / "single")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             SFT, *sft_args(base_ckpt, sums_jsonl, ddp_dir, **common)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "= 2 x 2 process(es) x 1 micro-steps" in result.stdout and result.stdout.count("step     7/8 | loss") == 1
    assert chat_sft.main(sft_args(base_ckpt, sums_jsonl, single_dir, **common)) == 0
    for kind, atol in (("train", 2e-6), ("val", 2e-4)):
        a, b = losses(read_log(ddp_dir), kind), losses(read_log(single_dir), kind)
        assert sorted(a) == sorted(b) and a
        assert_close(torch.tensor([a[s] for s in sorted(a)]), torch.tensor([b[s] for s in sorted(b)]), rtol=0,
                     atol=atol)
    a, b = load(checkpoints.checkpoint_path(ddp_dir, 8)), load(checkpoints.checkpoint_path(single_dir, 8))
    for k in a["model"]:
        assert_close(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-5)
    assert a["loader"] == b["loader"]


# -----------------------------------------------------------------------------
# the hub path (oasst1, from the local datasets cache), and the errors

def cache_oasst1(cache_dir, tmp_path):
    """OpenAssistant/oasst1's train and validation splits in the datasets cache, as load_dataset lays them out."""
    from datasets.packaged_modules.json.json import Json

    files = {"train": write_jsonl(tmp_path / "train.jsonl", oasst_rows()),
             "validation": write_jsonl(tmp_path / "validation.jsonl", oasst_rows()[:8])}
    builder = Json(cache_dir=str(tmp_path / "build"), dataset_name="oasst1", config_name="default", data_files=files)
    builder.download_and_prepare()
    os.renames(builder.cache_dir, os.path.join(cache_dir, "OpenAssistant___oasst1", "default", "0.0.0", "0" * 40))


def test_default_dataset_from_the_hub_cache_and_offline(base_ckpt, tmp_path):
    env = hf_env(tmp_path, "unreachable")
    args = sft_args(base_ckpt, "OpenAssistant/oasst1", str(tmp_path / "log"), max_steps=2, batch_size=1,
                    total_batch_size=2)
    args.remove("--data=OpenAssistant/oasst1")  # the default
    t0 = time.time()
    r = subprocess.run([sys.executable, SFT, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and time.time() - t0 < 15, r.stderr
    assert r.stderr.startswith("chat_sft.py: error: OpenAssistant/oasst1: cannot load: no network (http://127.0.0.1:9 "
                               "unreachable: ") and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.endswith("and not in the local datasets cache; pass a .jsonl file or a save_to_disk directory\n")
    cache_oasst1(env["HF_DATASETS_CACHE"], tmp_path)
    r = subprocess.run([sys.executable, SFT, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "data: train 2 conversations" in r.stdout and "val 1 conversation, the 'validation' split" in r.stdout


BAD_JSONL = {
    "invalid JSON": ('{"messages": [', ":2: invalid JSON (Expecting value, column 15)"),
    "not an object": ('[1, 2]', ':2: expected an object with a "messages" list'),
    "no assistant": ('{"messages": [{"role": "user", "content": "hi"}]}', ":2: no assistant message"),
    "out of order": ('{"messages": [{"role": "assistant", "content": "hi"}]}',
                     ":2: messages[0]: roles out of order: expected user, got assistant"),
    "unknown role": ('{"messages": [{"role": "human", "content": "hi"}]}', ":2: messages[0]: unknown role 'human'"),
    "empty content": ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}',
                      ":2: messages[1] (assistant): empty content"),
}


@pytest.mark.parametrize("problem", list(BAD_JSONL))
def test_bad_jsonl_is_one_line_with_file_and_line(problem, base_ckpt, tmp_path, capsys):
    line, message = BAD_JSONL[problem]
    data = write_jsonl(tmp_path / "bad.jsonl", [qa_conversation("q", "a"), line])
    assert chat_sft.main(sft_args(base_ckpt, data, str(tmp_path / "log"))) == 2
    assert f"{data}{message}" in one_error_line(capsys)


@pytest.mark.parametrize("args, message", [
    ({"data": "/nonexistent/chats.jsonl"}, "/nonexistent/chats.jsonl: no such file"),
    ({"data": "./missing_dir"}, "--data ./missing_dir: expected a .jsonl file, a save_to_disk directory or a hub"),
    ({"init_from": "/nonexistent/model.pt"}, "/nonexistent/model.pt: not a directory holding a transformers GPT-2"),
    ({"batch_size": 3}, "total_batch_size 4 is not a multiple of batch_size * processes = 3 * 1"),
    ({"block_size": 128}, "block_size 128 > the model's 64 positions"),
    ({"val_frac": 1.5}, "--val_frac must be in [0, 1), got 1.5"),
    ({"max_steps": "ten"}, "--max_steps=ten: expected int"),
    ({"lang": "xx", "data": "OASST"}, "no conversations with an assistant turn in lang 'xx'"),
])
def test_errors_are_one_line(args, message, base_ckpt, sums_jsonl, tmp_path, capsys):
    if args.get("data") == "OASST":
        args = {**args, "data": save_dataset(tmp_path / "oasst", {"train": oasst_rows()})}
        capsys.readouterr()  # save_to_disk's progress bar
    assert chat_sft.main(sft_args(args.pop("init_from", base_ckpt), args.pop("data", sums_jsonl),
                                  str(tmp_path / "log"), **args)) == 2
    assert message in one_error_line(capsys)


def test_unknown_hub_dataset_offline_and_a_busy_log_dir(base_ckpt, sums_jsonl, tmp_path, capsys, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    assert chat_sft.main(sft_args(base_ckpt, "nobody/no-such-dataset", str(tmp_path / "log"))) == 2
    assert "nobody/no-such-dataset: cannot load: offline mode (HF_HUB_OFFLINE) and not in the local datasets " \
           "cache" in one_error_line(capsys)
    log_dir = str(tmp_path / "busy")
    with checkpoints.locked_run_dir(log_dir):  # another run holds it
        assert chat_sft.main(sft_args(base_ckpt, sums_jsonl, log_dir)) == 2
    assert f"log_dir {log_dir} is in use by another run (pid {os.getpid()}" in one_error_line(capsys)


def test_chat_errors(base_ckpt, tmp_path, capsys):
    def error(*args):
        assert chat.main(list(args)) == 2
        return one_error_line(capsys, "chat.py: error: ")

    assert "--model nowhere: no such file or directory" in error("--model", "nowhere")
    assert f"{base_ckpt}: not a chat model" in error("--model", base_ckpt, "--prompt", "hi")
    assert f"python chat_sft.py --init_from={base_ckpt}" in error("--model", base_ckpt)
    assert "--prompt: empty message" in error("--model", base_ckpt, "--prompt", " ")
    assert "--temperature=-1: must be >= 0" in error("--temperature", "-1")
    assert "--top_k=0: must be >= 1" in error("--top_k=0")
    assert "--seed=x: expected int" in error("--seed", "x")
    assert "unknown option --temp (see --help" in error("--temp", "0")
    assert f"{tmp_path}: holds no checkpoint (model_NNNNN.pt) and no transformers model" in error("--model",
                                                                                                   str(tmp_path))


def test_chat_prompt_too_long(trained, capsys):
    assert chat.main(["--model", trained[0], "--prompt", "word " * 80]) == 2
    assert "--prompt: the message is too long: 85 tokens in the chat format, and the model reads 64" in \
        one_error_line(capsys, "chat.py: error: ")


def test_help(capsys):
    assert chat_sft.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "torchrun --standalone" in out and all(f"--{f.name}=" in out for f in dataclasses.fields(chat_sft.SFTConfig))
    assert chat.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "python chat.py --model" in out and all(f"--{f.name}=" in out for f in dataclasses.fields(chat.ChatConfig))


def test_export_tokenizer_alone(tmp_path):
    from transformers import AutoTokenizer

    save_hf_tokenizer(str(tmp_path), model_max_length=64, chat=True)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    messages = conversation("Hi", "Hello!", "Bye")
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        get_chat_encoding().decode(render_prompt(messages))
    assert tok.encode("plain text") == get_encoding().encode("plain text")
    with pytest.raises(Exception, match="unknown role"):
        tok.apply_chat_template([{"role": "bot", "content": "x"}], tokenize=False)


def test_block_size_is_the_models_and_a_larger_one_is_refused_before_the_data(base_ckpt, sums_jsonl, tmp_path,
                                                                              capsys):
    """--init_from a model of 64 positions (README's laptop model) without --block_size: `block_size 1024 > the
    model's 64 positions` after the data was read and reported; now its own 64, and a larger one given is refused
    before the data is read, naming the value to pass, leaving no log_dir."""
    log_dir = tmp_path / "log"
    args = [a for a in sft_args(base_ckpt, sums_jsonl, str(log_dir), max_steps=1, val_every=0, checkpoint_every=0)
            if not a.startswith("--block_size=")]
    assert chat_sft.main(args) == 0
    assert "cut after block_size + 1 = 65 tokens" in capsys.readouterr().out
    assert json.loads((log_dir / "config.json").read_text())["train_config"]["block_size"] == 64
    assert chat_sft.main(sft_args(base_ckpt, sums_jsonl, str(tmp_path / "log128"), block_size=128)) == 2
    captured = capsys.readouterr()
    assert "data:" not in captured.out and captured.err == (
        "chat_sft.py: error: block_size 128 > the model's 64 positions: pass --block_size=64 or less (or leave it "
        "out: the model's own)\n")
    assert not (tmp_path / "log128").exists()


def test_init_from_a_non_model_is_refused_before_the_data(sums_jsonl, tmp_path, capsys):
    """--init_from=README.md: two data lines were printed before the refusal; now the model comes first."""
    readme = os.path.join(ROOT, "README.md")
    assert chat_sft.main(sft_args(readme, sums_jsonl, str(tmp_path / "log"))) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == (
        f"chat_sft.py: error: {readme}: cannot load the checkpoint: it is not a train_gpt2.py checkpoint (or "
        "chat_sft.py's) (not a file torch.save wrote)\n")
    assert not (tmp_path / "log").exists()


def test_one_val_conversation_is_singular(base_ckpt, tmp_path, capsys):
    data = write_jsonl(tmp_path / "six.jsonl", arithmetic_conversations(6))
    assert chat_sft.main(sft_args(base_ckpt, data, str(tmp_path / "log"), val_frac=0.1, max_steps=1,
                                  val_every=0)) == 0
    out = capsys.readouterr().out
    assert "data: train 5 conversations (" in out and ", val 1 conversation, 0.1 of the conversations held out" in out
