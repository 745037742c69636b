"""hellaswag.py against an independent per-example scoring with transformers' GPT-2, on generated HellaSwag records.

    python -m pytest -q tests/test_hellaswag.py
"""

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import checkpoints
import hellaswag
from conftest import ROOT
from model import GPT, GPTConfig

WORDS = ("the a man woman dog is sitting on roof He She They then walks to car and starts pulling up shingles with "
         "hammer while talking camera, slowly. quickly! kitchen knife cuts onions into small pieces bowl water "
         "ball throws catches jumps over fence laughing").split()
RESULT_LINE = re.compile(r"^hellaswag: n=(\d+) acc=(\d\.\d{4}) acc_norm=(\d\.\d{4})$")


def make_record(rng, ind, n_ctx_words):
    ctx = " ".join(rng.choice(WORDS) for _ in range(n_ctx_words))
    endings = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 14))) + "." for _ in range(4)]
    return {"ind": ind, "activity_label": "Testing", "ctx_a": ctx, "ctx_b": "", "ctx": ctx, "split": "val",
            "split_type": "indomain", "label": rng.randrange(4), "endings": endings, "source_id": f"test~{ind}"}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def reference_scores(hf_model, enc, examples, block_size):
    """One ending at a time, no padding: (argmin of summed loss, argmin of mean loss) per example, from transformers'
    logits and log_softmax. A row longer than block_size keeps its last block_size tokens (hellaswag.py's rule)."""
    preds = []
    with torch.no_grad():
        for ex in examples:
            ctx = enc.encode(ex["ctx"])
            sums, means = [], []
            for ending in ex["endings"]:
                row = ctx + enc.encode(" " + ending)
                cut = max(0, len(row) - block_size)
                row = row[cut:]
                first = max(len(ctx) - cut, 1)
                logp = torch.log_softmax(hf_model(torch.tensor([row])).logits[0].double(), dim=-1)  # (T, V)
                token_losses = [-logp[t - 1, row[t]].item() for t in range(first, len(row))]
                sums.append(sum(token_losses))
                means.append(sum(token_losses) / len(token_losses))
            preds.append((min(range(4), key=sums.__getitem__), min(range(4), key=means.__getitem__)))
    return preds


@pytest.fixture(scope="module")
def scored(tiny_hf_dir, enc, tmp_path_factory):
    """Generated records (2 of them longer than the tiny model's 64 positions) relabeled with transformers' answers:
    `label` = the lowest-mean-loss ending. A correct scorer then gets acc_norm 1 and acc = the share of examples where
    the lowest-total and lowest-mean endings agree."""
    from transformers import GPT2LMHeadModel

    rng = random.Random(0)
    records = [make_record(rng, i, rng.randint(2, 22)) for i in range(18)]
    records += [make_record(rng, 18 + i, 60) for i in range(2)]  # > 64 tokens: left truncation
    hf_model = GPT2LMHeadModel.from_pretrained(tiny_hf_dir).eval()
    assert len(enc.encode(records[-1]["ctx"])) > hf_model.config.n_positions
    preds = reference_scores(hf_model, enc, records, hf_model.config.n_positions)
    # the test can only fail if the answers vary and the two scores disagree somewhere
    assert len({p for p, _ in preds}) > 1 and len({p for _, p in preds}) > 1
    assert 0 < sum(p != q for p, q in preds) < len(preds)
    for record, (_, pred_norm) in zip(records, preds):
        record["label"] = pred_norm
    path = write_jsonl(tmp_path_factory.mktemp("hellaswag") / "hellaswag_val.jsonl", records)
    expected = hellaswag.HellaSwagResult(len(records), sum(p == q for p, q in preds), len(records))
    return path, expected, preds


@pytest.fixture(scope="module")
def model(tiny_hf_dir):
    return GPT.from_pretrained(tiny_hf_dir).eval()


def test_matches_transformers_per_example(scored, model):
    path, expected, _ = scored
    result = hellaswag.evaluate(model, hellaswag.load_examples(path), device="cpu", batch_size=8)
    assert result == expected
    assert result.acc_norm == 1.0 and 0 < result.acc < 1


def test_relabeled_by_total_loss(scored, model):
    # the same examples, each labeled with its lowest-total-loss ending: now acc is 1
    path, expected, preds = scored
    examples = hellaswag.load_examples(path)
    for ex, (pred, _) in zip(examples, preds):
        ex["label"] = pred
    result = hellaswag.evaluate(model, examples, device="cpu", batch_size=8)
    assert (result.n, result.correct, result.correct_norm) == (expected.n, expected.n, expected.correct)


@pytest.mark.parametrize("batch_size, pad_multiple", [(1, 1), (7, 16), (64, 64)])
def test_batched_equals_one_at_a_time(scored, model, batch_size, pad_multiple):
    path, expected, _ = scored
    examples = hellaswag.load_examples(path)
    assert hellaswag.evaluate(model, examples, device="cpu", batch_size=batch_size,
                              pad_multiple=pad_multiple) == expected


def test_examples_rendered_once_per_list(scored, model, monkeypatch):
    """A run scores the same examples list at every eval: they are rendered and tokenized at the first only, and the
    result is the same; another list (or other shapes) is rendered anew."""
    path, expected, _ = scored
    calls, render_example = [], hellaswag.render_example
    monkeypatch.setattr(hellaswag, "render_example", lambda *a: calls.append(1) or render_example(*a))
    examples = hellaswag.load_examples(path)
    assert hellaswag.evaluate(model, examples, device="cpu", batch_size=8) == expected
    assert len(calls) == len(examples)
    assert hellaswag.evaluate(model, examples, device="cpu", batch_size=8) == expected
    assert len(calls) == len(examples)  # not again
    assert hellaswag.evaluate(model, examples, device="cpu", batch_size=4) == expected
    assert len(calls) == 2 * len(examples)  # another batch size: other rows of dummies
    assert hellaswag.evaluate(model, hellaswag.load_examples(path), device="cpu", batch_size=4) == expected
    assert len(calls) == 3 * len(examples)


class ShapeRecorder(torch.nn.Module):
    """Wraps a model as DistributedDataParallel does (the model under .module) and records every input shape."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        self.shapes = []

    def forward(self, idx, positions):
        self.shapes.append(tuple(idx.shape))
        return self.module(idx, positions=positions)


def test_few_fixed_shapes(scored, model):
    # a compiled model must not meet a new shape per batch: the batch dimension never changes (the last batch is
    # filled with dummy rows) and T is a multiple of pad_multiple or block_size
    path, expected, _ = scored
    recorder = ShapeRecorder(model)
    result = hellaswag.evaluate(recorder, hellaswag.load_examples(path), device="cpu", batch_size=4, pad_multiple=16)
    assert result == expected
    assert len(recorder.shapes) == 5  # 20 examples in batches of 4
    assert {b for b, _ in recorder.shapes} == {16}
    assert {t for _, t in recorder.shapes} <= {16, 32, 48, 64}


def test_limit_and_blank_lines(tmp_path):
    rng = random.Random(1)
    lines = [json.dumps(make_record(rng, i, 5)) for i in range(5)]
    path = tmp_path / "val.jsonl"
    path.write_text(lines[0] + "\n\n" + "\n".join(lines[1:]) + "\n")
    assert len(hellaswag.load_examples(str(path))) == 5
    assert [ex["ind"] for ex in hellaswag.load_examples(str(path), limit=2)] == [0, 1]


@pytest.mark.parametrize("line, problem", [
    ('{"ctx": "a man", "endings": ["a", "b", "c", "d"], "label": 1', "invalid JSON"),
    ('["a man", ["a", "b", "c", "d"], 1]', "expected a JSON object, got list"),
    ('{"endings": ["a", "b", "c", "d"], "label": 1}', "record without 'ctx'"),
    ('{"ctx": "a man", "label": 1}', "record without 'endings'"),
    ('{"ctx": "a man", "endings": ["a", "b", "c", "d"]}', "record without 'label'"),
    ('{"ctx": "", "endings": ["a", "b", "c", "d"], "label": 1}', "'ctx' must be non-empty text"),
    ('{"ctx": "a man", "endings": ["a", "b", "c"], "label": 1}', "expected 4 endings, got 3"),
    ('{"ctx": "a man", "endings": "abcd", "label": 1}', "expected 4 endings, got str"),
    ('{"ctx": "a man", "endings": ["a", "b", "c", 4], "label": 1}', "every ending must be text"),
    ('{"ctx": "a man", "endings": ["a", "b", "c", "d"], "label": 4}', "label must be an integer 0-3, got 4"),
    ('{"ctx": "a man", "endings": ["a", "b", "c", "d"], "label": "1"}', "label must be an integer 0-3, got '1'"),
    ('{"ctx": "a man", "endings": ["a", "b", "c", "d"], "label": true}', "label must be an integer 0-3, got True"),
])
def test_bad_records(tmp_path, line, problem):
    good = json.dumps(make_record(random.Random(2), 0, 5))
    path = tmp_path / "hellaswag_val.jsonl"
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(hellaswag.HellaSwagError) as info:
        hellaswag.load_examples(str(path))
    message = str(info.value)
    assert message.startswith(f"{path}:2: {problem}") and "\n" not in message


def test_unreadable_files(tmp_path):
    with pytest.raises(hellaswag.HellaSwagError, match="cannot read"):
        hellaswag.load_examples(str(tmp_path / "missing.jsonl"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(hellaswag.HellaSwagError, match="no examples"):
        hellaswag.load_examples(str(empty))
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(json.dumps(make_record(random.Random(3), 0, 5)).encode() + b"\n\xff\xfe\n")
    with pytest.raises(hellaswag.HellaSwagError, match=r"binary.jsonl:2: not UTF-8"):
        hellaswag.load_examples(str(binary))


def test_download_once_atomically(scored, tmp_path):
    path, _, _ = scored
    source = tmp_path / "remote" / "hellaswag_val.jsonl"
    source.parent.mkdir()
    source.write_bytes(Path(path).read_bytes())
    cache = tmp_path / "cache"
    examples = hellaswag.load_examples(cache_dir=str(cache), url=source.as_uri())
    assert examples == hellaswag.load_examples(path)
    assert os.listdir(cache) == ["hellaswag_val.jsonl"]  # no temporary file left behind
    source.unlink()  # cached: no second download
    assert hellaswag.load_examples(cache_dir=str(cache), url=source.as_uri(), limit=3) == examples[:3]


def test_failed_download(tmp_path):
    url = (tmp_path / "nowhere" / "hellaswag_val.jsonl").as_uri()
    with pytest.raises(hellaswag.HellaSwagError) as info:
        hellaswag.load_examples(cache_dir=str(tmp_path / "cache"), url=url)
    message = str(info.value)
    assert message.startswith(f"could not download {url}: ") and "--data FILE" in message and "\n" not in message
    with pytest.raises(hellaswag.HellaSwagError) as info:  # the option of the command that asks (train_gpt2.py's)
        hellaswag.load_examples(cache_dir=str(tmp_path / "cache"), url=url, data_option="--hellaswag_data=FILE")
    assert "; pass --hellaswag_data=FILE with a local copy of hellaswag_val.jsonl" in str(info.value)
    assert "--data FILE" not in str(info.value)
    assert os.listdir(tmp_path / "cache") == []


def _distributed_worker(rank, world_size, init_file, checkpoint, url, cache_dir, out_dir):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        examples = hellaswag.load_examples(cache_dir=cache_dir, url=url)  # rank 0 downloads, rank 1 waits
        model = ShapeRecorder(checkpoints.load_model(checkpoint)[0].eval())
        results = []
        for n in (len(examples), 1):  # 1 example: rank 1 has none, and runs a forward pass of dummy rows only
            model.shapes.clear()
            r = hellaswag.evaluate(model, examples[:n], device="cpu", batch_size=3, rank=rank, world_size=world_size)
            results.append([r.n, r.correct, r.correct_norm, list(model.shapes)])
        Path(out_dir, f"{rank}.json").write_text(json.dumps(results))
    finally:
        torch.distributed.destroy_process_group()


def test_two_processes_equal_one(scored, model, tmp_path):
    # 20 examples over 2 ranks in batches of 3: each rank's share of 10 ends in a batch with dummy rows
    path, expected, _ = scored
    source = tmp_path / "hellaswag_val.jsonl"
    source.write_bytes(Path(path).read_bytes())
    checkpoint = tmp_path / "model.pt"  # the model as train_gpt2.py saves it: no transformers import per process
    torch.save({"model": model.state_dict(), "config": vars(model.config)}, checkpoint)
    args = (2, str(tmp_path / "init"), str(checkpoint), source.as_uri(), str(tmp_path / "cache"), str(tmp_path))
    mp.spawn(_distributed_worker, args=args, nprocs=2, join=True)
    first = hellaswag.evaluate(model, hellaswag.load_examples(path, limit=1), device="cpu")
    ranks = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(2)]
    for (full, one) in ranks:  # every rank returns the totals over all ranks
        assert full[:3] == [expected.n, expected.correct, expected.correct_norm]
        assert one[:3] == [first.n, first.correct, first.correct_norm]
    # the ranks run the same forward passes (as DDP needs) of one batch size
    for i in range(2):
        assert len(ranks[0][i][3]) == len(ranks[1][i][3])
        assert {b for b, _ in ranks[0][i][3] + ranks[1][i][3]} == {12 if i == 0 else 4}


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "hellaswag.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_cli_hf_dir_and_checkpoint(scored, tiny_hf_dir, model, tmp_path):
    path, expected, _ = scored
    limit = 12
    expected_acc = hellaswag.evaluate(model, hellaswag.load_examples(path, limit=limit), device="cpu").acc
    expected_line = f"hellaswag: n={limit} acc={expected_acc:.4f} acc_norm=1.0000"

    proc = run_cli("--model", tiny_hf_dir, "--data", path, "--limit", str(limit), "--batch_size", "5",
                   "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert RESULT_LINE.match(proc.stdout.splitlines()[-1])
    assert proc.stdout.splitlines()[-1] == expected_line

    # a train_gpt2.py checkpoint, with the vocabulary padded to 50304 as training does: the 47 extra logits get big
    # weights, and must not take part in the softmax
    config = dict(vars(model.config), vocab_size=50304)
    padded = GPT(GPTConfig(**config))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for key in ("transformer.wte.weight", "lm_head.weight"):
        state[key] = torch.cat([state[key], torch.randn(50304 - 50257, model.config.n_embd) * 10])
    padded.load_state_dict(state)
    checkpoint = tmp_path / "model_00005.pt"
    torch.save({"model": padded.state_dict(), "config": config, "step": 5}, checkpoint)
    proc = run_cli("--model", str(checkpoint), "--data", path, "--limit", str(limit), "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == expected_line

    # the train_gpt2.py run directory holding it (hellaswag.py --model cpu_log): its newest checkpoint, though its
    # config.json is the run's (no model_type: it was read as a transformers directory's and refused)
    (tmp_path / "config.json").write_text(json.dumps({"train_config": {"n_layer": 2}, "model_config": config}))
    older = GPT(GPTConfig(**config))
    torch.save({"model": older.state_dict(), "config": config, "step": 2}, tmp_path / "model_00002.pt")
    proc = run_cli("--model", str(tmp_path), "--data", path, "--limit", str(limit), "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].startswith(f"{tmp_path}: ") and proc.stdout.splitlines()[-1] == expected_line


def cli_error(capsys, *args):
    assert hellaswag.main(list(args)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hellaswag.py: error: ") and "\n" not in err
    return err


def test_cli_errors(scored, tiny_hf_dir, tmp_path, capsys):
    path, _, _ = scored
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"ctx": "a man", "endings": ["a", "b", "c"], "label": 1}\n')
    assert cli_error(capsys, "--model", tiny_hf_dir, "--data", str(bad)).endswith(
        f"{bad}:1: expected 4 endings, got 3")
    assert str(tmp_path / "nope") in cli_error(capsys, "--model", str(tmp_path / "nope"), "--data", path)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    assert "not a train_gpt2.py checkpoint" in cli_error(capsys, "--model", str(garbage), "--data", path)
    no_config = tmp_path / "no_config.pt"
    torch.save({"model": {}}, no_config)
    assert "expected 'model' and 'config'" in cli_error(capsys, "--model", str(no_config), "--data", path)
    config = {"n_layer": 1, "n_head": 2, "n_embd": 8, "block_size": 16, "vocab_size": 64}
    state = GPT(GPTConfig(**config)).state_dict()
    bad_config = tmp_path / "bad_config.pt"
    torch.save({"model": state, "config": dict(config, n_head=3)}, bad_config)
    assert "bad 'config': n_embd (8) must be divisible by n_head (3)" in cli_error(capsys, "--model", str(bad_config),
                                                                                    "--data", path)
    wrong = tmp_path / "wrong.pt"
    torch.save({"model": state, "config": dict(config, n_embd=16)}, wrong)
    assert "'model' does not match its 'config': " in cli_error(capsys, "--model", str(wrong), "--data", path)
    del state["lm_head.weight"]
    torch.save({"model": state, "config": config}, wrong)
    assert "1 missing tensors (e.g. lm_head.weight)" in cli_error(capsys, "--model", str(wrong), "--data", path)
    small, small_config = tmp_path / "small_vocab.pt", dict(n_layer=1, n_head=2, n_embd=8, block_size=16,
                                                            vocab_size=256)
    # train_gpt2.py --vocab_size=256: GPT-2's token ids would index past its embedding
    torch.save({"model": GPT(GPTConfig(**small_config)).state_dict(), "config": small_config}, small)
    assert cli_error(capsys, "--model", str(small), "--data", path) == (
        f"hellaswag.py: error: {small}: vocab_size 256 < 50257: HellaSwag is scored with GPT-2's tokenizer, which "
        "needs every GPT-2 token id")
    assert "--device gpu: " in cli_error(capsys, "--model", tiny_hf_dir, "--data", path, "--device", "gpu")
    if not torch.cuda.is_available():
        assert cli_error(capsys, "--model", tiny_hf_dir, "--data", path, "--device", "cuda").endswith(
            "--device cuda: not available on this machine")


def test_model_given_as_a_file_of_a_transformers_dir(scored, tiny_hf_dir, capsys):
    """`--model dir/config.json` names the directory to pass; no advice from torch.load about weights_only."""
    path, _, _ = scored
    config = os.path.join(tiny_hf_dir, "config.json")
    err = cli_error(capsys, "--model", config, "--data", path)
    assert err == f"hellaswag.py: error: {config}: a file of a transformers model: pass its directory, {tiny_hf_dir}"


def test_cli_options(scored, tiny_hf_dir, capsys):
    """--name=value and --name value score the same; a bad or unknown option is one error line naming it, before any
    model is loaded; --help lists every option and exits 0."""
    path, _, _ = scored
    results = []
    for argv in (["--model", tiny_hf_dir, "--data", path, "--limit", "3", "--batch_size", "2", "--device", "cpu"],
                 [f"--model={tiny_hf_dir}", f"--data={path}", "--limit=3", "--batch_size=2", "--device=cpu",
                  "--dtype=float32"]):
        assert hellaswag.main(argv) == 0
        results.append(capsys.readouterr().out.splitlines()[-1])
    assert results[0] == results[1] and RESULT_LINE.match(results[0])
    assert "hellaswag.py: error: --batch_size=0: must be >= 1" == cli_error(capsys, "--model", tiny_hf_dir,
                                                                          "--batch_size", "0")
    assert "--limit=ten: expected int" in cli_error(capsys, "--model", tiny_hf_dir, "--limit=ten")
    assert "--dtype=fp16: expected auto, bfloat16 or float32" in cli_error(capsys, "--dtype", "fp16")
    assert "unknown option --nope (see --help" in cli_error(capsys, "--model", tiny_hf_dir, "--nope", "1")
    assert "--model is required" in cli_error(capsys, "--data", path)
    assert hellaswag.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "python hellaswag.py --model gpt2" in out
    assert all(f"--{name}=" in out for name in ("model", "data", "limit", "batch_size", "device", "dtype"))


def test_bench_hellaswag_speed_command_line(capsys):
    """python -m bench.hellaswag_speed: both option spellings and a bare bool flag parse; a tiny run agrees with itself
    (the batched and one-at-a-time counts are the same); bad options are one line."""
    import options
    from bench import hellaswag_speed

    config, given = options.parse(hellaswag_speed.HellaSwagBenchConfig, ["--compile", "--n", "8", "--batch_size=4"])
    assert (config.compile, config.n, config.batch_size) == (True, 8, 4) and given == {"compile", "n", "batch_size"}
    assert hellaswag_speed.main(["--n", "4", "--batch_size=2"]) == 0
    out = capsys.readouterr().out
    assert "speedup: " in out and "counts differ" not in out
    for argv, message in [(["--n=0"], "--n=0: must be >= 1"), (["--device", "gpu"], "--device gpu: "),
                          (["--warmup", "1"], "unknown option --warmup")]:
        assert hellaswag_speed.main(argv) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith("bench.hellaswag_speed: error: ") and message in err[0], err
