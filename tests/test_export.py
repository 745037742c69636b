"""export.py: a model trained here as a transformers directory, GPT-2's architecture as GPT2LMHeadModel and
--recipe=fast's as NanoChatForCausalLM, its logits and greedy tokens those of transformers; hellaswag.py and chat.py
on an export; what neither architecture can hold is refused before anything is written."""

import contextlib
import dataclasses
import io
import json
import os
import stat

import pytest
import torch
from torch.testing import assert_close

import chat
import chat_sft
import export
import hellaswag
import train_gpt2
from checkpoints import checkpoint_path
from export import save_pretrained
from guards import model_config
from model import GPT, GPTConfig, GPT2_VOCAB_SIZE, ROPE_BASE, rope_tables, rotate_half_rows, to_nanochat
from test_chat import QA, conversation, qa_conversation, run_chat, save_dataset, sft_args
from test_hellaswag import make_record, write_jsonl
from test_model import (FAST, NANOCHAT, SWITCHES, TINY, hf_model, ours, random_tokens, randomized,  # noqa: F401, F811
                        switches_id)
from test_train import FAST_LRS, tiny_args, write_shards
from tokenizer import ASSISTANT_END, CHAT_VOCAB_SIZE, generate_reply


def test_export_roundtrip_and_greedy_generation(tmp_path, tiny_hf_dir, ours):
    save_pretrained(ours, tmp_path / "export")
    exported = hf_model(tmp_path / "export")
    idx = random_tokens((2, 30), seed=2)
    with torch.no_grad():
        assert_close(exported(idx).logits, ours(idx)[0], rtol=1e-5, atol=1e-5)
    prompt = random_tokens((1, 8), seed=3)
    ref = exported.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=GPT2_VOCAB_SIZE - 1)
    assert torch.equal(ours.generate(prompt, 20, temperature=0), ref)
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "export").iterdir())


def test_padded_vocab_exports_real_rows(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50304, **TINY)).eval()
    save_pretrained(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["vocab_size"] == GPT2_VOCAB_SIZE
    idx = random_tokens((2, 16), seed=4)
    with torch.no_grad():
        assert_close(hf_model(tmp_path)(idx).logits, model(idx)[0][..., :GPT2_VOCAB_SIZE], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("switches", [s for s in SWITCHES if s not in (dict(zero_init=True), FAST)], ids=switches_id)
def test_save_pretrained_refuses_variants(tmp_path, switches):
    model = GPT(GPTConfig(**TINY, **switches))
    changed = [k for k in switches if k != "zero_init"]
    with pytest.raises(ValueError, match="cannot export .* as GPT-2: transformers has GPT2LMHeadModel") as e:
        save_pretrained(model, tmp_path)
    assert all(f"{k}={switches[k]!r}" in str(e.value) for k in changed), str(e.value)
    assert not any(tmp_path.iterdir())  # refused before anything is written


def test_export_refuses_rmsnorm(tmp_path):
    with pytest.raises(ValueError, match="cannot export norm='rmsnorm'"):
        save_pretrained(GPT(GPTConfig(norm="rmsnorm", **TINY)), tmp_path / "x")


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_exported_files_have_the_umask_mode(tmp_path, ours, umask):
    """model.safetensors was 0600 (its writer's temporary file) while the other files were 0644: every file now has
    the mode the user's umask gives, as any file the user writes."""
    old = os.umask(umask)
    try:
        save_pretrained(ours, tmp_path / "export")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "export").iterdir()}
    assert "model.safetensors" in modes and "tokenizer.json" in modes
    assert set(modes.values()) == {0o666 & ~umask}, modes


# -----------------------------------------------------------------------------
# --recipe=fast's block as transformers' NanoChatForCausalLM

FAST_TINY = dict(TINY, vocab_size=50304, **NANOCHAT)  # a --recipe=fast model of train_gpt2.py's padded vocabulary


def auto_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def assert_transformers_is_ours(directory, model, vocab=GPT2_VOCAB_SIZE):
    """transformers' AutoModelForCausalLM on directory gives model's logits (fp32, the real rows) and greedy tokens;
    returns it and the largest logit difference."""
    hf = auto_model(directory)
    idx = random_tokens((2, min(40, model.config.block_size)), seed=2)
    with torch.no_grad():
        theirs, mine = hf(idx).logits, model(idx)[0][..., :vocab]
    assert_close(theirs, mine, rtol=1e-5, atol=1e-5)
    prompt = random_tokens((1, 8), seed=3)
    greedy = hf.generate(prompt, max_new_tokens=20, do_sample=False)
    assert torch.equal(greedy, model.generate(prompt, 20, temperature=0))
    return hf, (theirs - mine).abs().max().item()


@pytest.fixture(scope="module")
def fast_model():
    return randomized(GPT(GPTConfig(**FAST_TINY)), embedding_std=0.3)  # zero_init's zeros would hide the blocks


def test_fast_model_exports_as_nanochat(tmp_path, fast_model, enc):
    from transformers import pipeline

    save_pretrained(fast_model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["model_type"], config["architectures"], config["vocab_size"], config["max_position_embeddings"],
            config["rms_norm_eps"], config["final_logit_softcapping"], config["rope_parameters"]["rope_theta"],
            config["tie_word_embeddings"]) == ("nanochat", ["NanoChatForCausalLM"], GPT2_VOCAB_SIZE, 64, 1e-6, 15.0,
                                               ROPE_BASE, False)
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (50256,) * 3
    hf, _ = assert_transformers_is_ours(tmp_path, fast_model)
    assert type(hf).__name__ == "NanoChatForCausalLM" and hf.lm_head.weight is not hf.model.embed_tokens.weight
    # transformers' rotary tables are ours, each angle once per half of the head
    cos, sin = rope_tables(64, 16)
    hf_cos, hf_sin = hf.model.rotary_emb(torch.zeros(()), torch.arange(64)[None])
    assert_close(hf_cos[0], torch.cat([cos, cos], dim=-1))
    assert_close(hf_sin[0], torch.cat([sin, sin], dim=-1))
    # the q and k rows are converted to its rotary convention: as they are, the logits would not be ours
    sd = {k: v[:GPT2_VOCAB_SIZE] if "wte" in k or "lm_head" in k else v for k, v in fast_model.state_dict().items()}
    unconverted = to_nanochat(sd, fast_model.config)
    for name in [k for k in unconverted if k.endswith(("q_proj.weight", "k_proj.weight"))]:
        unconverted[name] = rotate_half_rows(unconverted[name], fast_model.config.n_head)
    hf.load_state_dict(unconverted)
    idx = random_tokens((2, 40), seed=2)
    with torch.no_grad():
        assert not torch.allclose(hf(idx).logits, fast_model(idx)[0][..., :GPT2_VOCAB_SIZE], atol=1e-3)
    # pipeline() generates our greedy tokens
    prompt = "Hello, I'm a language model,"
    got = pipeline("text-generation", str(tmp_path), device="cpu")(prompt, max_new_tokens=12, do_sample=False,
                                                                    return_tensors=True)[0]["generated_token_ids"]
    ids = enc.encode(prompt)
    assert list(got) == fast_model.generate(torch.tensor([ids]), 12, temperature=0)[0].tolist()
    # and it loads back into our GPT (hellaswag.py, chat.py), the same weights: the real rows, a trained model's init
    back = GPT.from_pretrained(str(tmp_path))
    assert back.config == dataclasses.replace(fast_model.config, vocab_size=GPT2_VOCAB_SIZE, zero_init=False)
    assert all(torch.equal(v, sd[k]) for k, v in back.state_dict().items()) and back.state_dict().keys() == sd.keys()


def test_nanochat_export_of_any_norm_eps_and_no_softcap(tmp_path):
    model = randomized(GPT(GPTConfig(**dict(FAST_TINY, norm_eps=1e-5, logit_softcap=0.0))), embedding_std=0.003)
    save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["rms_norm_eps"], config["final_logit_softcapping"]) == (1e-5, None)
    assert_transformers_is_ours(tmp_path, model)


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    """A train_gpt2.py --recipe=fast run of a few steps (GPT-2's padded vocabulary): its log_dir."""
    tmp = tmp_path_factory.mktemp("fast_run")
    data = write_shards(tmp / "shards")
    log_dir = str(tmp / "log")
    args = tiny_args(data, log_dir, recipe="fast", vocab_size=50304, max_steps=8, val_every=0, checkpoint_every=4,
                     **FAST_LRS["fast"])
    assert train_gpt2.main(args) == 0
    return log_dir


def hellaswag_line(model, data, capsys):
    assert hellaswag.main(["--model", model, "--data", data, "--device", "cpu"]) == 0
    return capsys.readouterr().out.splitlines()[-1]


def test_trained_fast_model_exports_and_scores(fast_run, tmp_path, capsys):
    """export.py from the run directory (its newest checkpoint) and from a checkpoint file; transformers gives the
    checkpoint's logits and tokens, hellaswag.py the checkpoint's score."""
    import random

    newest = checkpoint_path(fast_run, 8)
    model = GPT(GPTConfig.from_dict(torch.load(newest, weights_only=True)["config"]))
    model.load_state_dict(torch.load(newest, weights_only=True)["model"])
    model.eval()
    assert torch.count_nonzero(model.lm_head.weight) and model.config.embed_norm  # trained away from zero_init
    capsys.readouterr()
    assert export.main(["--model", fast_run, "--out", str(tmp_path / "run")]) == 0
    assert "(NanoChat, " in capsys.readouterr().out
    assert_transformers_is_ours(tmp_path / "run", model)
    older = checkpoint_path(fast_run, 4)
    assert export.main([f"--model={older}", f"--out={tmp_path / 'file'}"]) == 0
    model.load_state_dict(torch.load(older, weights_only=True)["model"])
    assert_transformers_is_ours(tmp_path / "file", model)
    rng = random.Random(0)
    data = write_jsonl(tmp_path / "hellaswag_val.jsonl", [make_record(rng, i, rng.randint(2, 22)) for i in range(12)])
    capsys.readouterr()
    assert hellaswag_line(str(tmp_path / "run"), data, capsys) == hellaswag_line(fast_run, data, capsys)
    assert hellaswag_line(str(tmp_path / "file"), data, capsys) == hellaswag_line(str(older), data, capsys)


def test_other_switches_are_refused_in_one_line(tmp_path, capsys):
    """--recipe=fast --norm=rmsnorm: RMSNorm's gains are neither architecture's; export.py and chat_sft.py's
    --export_dir (before its training) say so in the same words."""
    cfg = train_gpt2.parse_config(["--recipe=fast", "--norm=rmsnorm", "--n_layer=2", "--n_head=2", "--n_embd=32",
                                   "--block_size=64"])
    path = tmp_path / "model_00001.pt"
    torch.save({"model": GPT(model_config(cfg)).state_dict(), "config": dataclasses.asdict(model_config(cfg))}, path)
    expected = ("cannot export norm='rmsnorm' (gains) as NanoChat: transformers has GPT2LMHeadModel (GPT-2's switches) "
                "and NanoChatForCausalLM (norm='rmsnorm_nogain', embed_norm=True, mlp='relu2', pos_emb='rope', "
                "qk_norm=True, tie_embeddings=False, bias=False; any norm_eps and logit_softcap)")
    assert export.main(["--model", str(path), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"export.py: error: {path}: {expected}\n"
    assert not (tmp_path / "out").exists()
    data = tmp_path / "chats.jsonl"
    data.write_text(json.dumps(qa_conversation(*QA[0])) + "\n")
    assert chat_sft.main(sft_args(str(path), str(data), str(tmp_path / "log"), export_dir=tmp_path / "chat")) == 2
    assert capsys.readouterr().err == f"chat_sft.py: error: --export_dir: {expected}\n"
    # the old fast block (no embedding norm) is nearer NanoChat than GPT-2 too
    with pytest.raises(ValueError, match=r"^cannot export norm='rmsnorm' \(gains\), embed_norm=False as NanoChat: "):
        save_pretrained(GPT(GPTConfig(**dict(FAST_TINY, norm="rmsnorm", embed_norm=False))), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_fast_chat_model_export_answers_as_chat_py(tmp_path):
    """A chat model fine-tuned (chat_sft.py) from a --recipe=fast checkpoint and exported (--export_dir): transformers'
    apply_chat_template + generate answers with chat.py's reply, and chat.py reads the export."""
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    base = GPT(GPTConfig(**FAST_TINY))  # the recipe's init: lm_head and the residual projections at zero
    torch.save({"model": base.state_dict(), "config": dataclasses.asdict(base.config)}, tmp_path / "base.pt")
    rows = [qa_conversation(q, a) for q, a in QA]
    data = save_dataset(tmp_path / "qa", {"train": rows, "validation": rows})
    log_dir, export_dir = str(tmp_path / "log"), str(tmp_path / "export")
    with contextlib.redirect_stdout(io.StringIO()):
        assert chat_sft.main(sft_args(str(tmp_path / "base.pt"), data, log_dir, batch_size=6, total_batch_size=6,
                                      max_steps=60, max_lr=3e-2, val_every=0, checkpoint_every=0,
                                      export_dir=export_dir)) == 0
    config = json.load(open(os.path.join(export_dir, "config.json")))
    assert (config["model_type"], config["vocab_size"]) == ("nanochat", CHAT_VOCAB_SIZE)
    tok = AutoTokenizer.from_pretrained(export_dir)
    hf = auto_model(export_dir)
    ours = chat.load_chat_model(log_dir).eval()
    answered = 0
    for question, answer in QA:
        ids = tok.apply_chat_template(conversation(question), add_generation_prompt=True, return_dict=False)
        out = hf.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)[0, len(ids):].tolist()
        reply = list(generate_reply(ours, torch.tensor([ids]), max_new_tokens=20, temperature=0))
        assert out == reply + [ASSISTANT_END]  # transformers stops at <|assistant_end|> (generation_config)
        answered += tok.decode(out, skip_special_tokens=True) == answer
    assert answered == len(QA)
    result = run_chat("--model", export_dir, "--prompt", QA[3][0], "--temperature", "0")
    assert result.returncode == 0 and result.stdout == QA[3][1] + "\n", result.stderr


def test_a_nanochat_this_model_cannot_represent_is_refused(tmp_path):
    """GPT.from_pretrained of a NanoChat directory that is no export of a model here (another tokenizer's vocabulary,
    grouped keys and values): one line naming what differs."""
    from transformers import NanoChatConfig, NanoChatForCausalLM

    config = NanoChatConfig(vocab_size=65536, hidden_size=32, intermediate_size=128, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    NanoChatForCausalLM(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"NanoChat variant this model cannot represent: vocab_size=65536 .*, "
                                         r"num_key_value_heads=1$"):
        GPT.from_pretrained(str(tmp_path))
