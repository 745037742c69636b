"""fineweb.py on data generated here (CPU, offline): exact shard contents, layout, resume after a kill, bad input.

    python -m pytest -q tests/test_fineweb.py
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken

import fineweb
from conftest import ROOT

EOT = 50256
WORDS = ("the of and to in is that for it as with was on be by at this are from or an have not which but "
         "energy cell water history students learning theory equation").split()
UNICODE = ["café naïve façade", "中文字符测试", "🙂👍🏽 emoji", "Ελληνικά", "עברית", "e\u0301 combining",
           "zero\u200bwidth", "tab\there", "crlf\r\nline", "<|endoftext|> literal", "  leading and trailing  "]


def expected_tokens(docs):
    """What the shards must hold, concatenated: [50256] + encode_ordinary(doc) for every document in order."""
    enc = tiktoken.get_encoding("gpt2")
    out = []
    for doc in docs:
        out.append(EOT)
        out.extend(enc.encode_ordinary(doc))
    return np.array(out, dtype=np.uint16)


def make_docs(n, seed, long_every=0):
    """n documents: words, unicode, empty and whitespace-only ones, and (every long_every-th) long ones."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        kind = i % 7
        if kind == 0:
            docs.append("")
        elif kind == 1:
            docs.append(" \n ")
        elif long_every and i % long_every == long_every - 1:
            docs.append(" ".join(rng.choice(WORDS + UNICODE, size=1500)))
        else:
            words = rng.choice(WORDS + UNICODE, size=int(rng.integers(1, 60)))
            docs.append(" ".join(words) + rng.choice([".", "!\n", "?\n\n", ""]))
    return docs


def write_jsonl(path, docs):
    with open(path, "w", encoding="utf-8") as f:
        for i, doc in enumerate(docs):
            f.write(json.dumps({"id": i, "text": doc}) + "\n")
    return str(path)


def write_parquet(path, docs, row_group_size=7):
    pq.write_table(pa.table({"text": docs, "n": list(range(len(docs)))}), path, row_group_size=row_group_size)
    return str(path)


def run(argv):
    """fineweb.main in this process; returns its exit status."""
    return fineweb.main([str(a) for a in argv])


def shard_files(out_dir):
    return sorted(f for f in os.listdir(out_dir) if fineweb.SHARD_RE.fullmatch(f))


def read_shards(out_dir, shard_size, val_size=None):
    """Checks the layout (names, contiguous indices, val then train, dtype, sizes: val_size, default shard_size, for
    the val shard) and returns the token stream."""
    files = sorted(shard_files(out_dir), key=lambda f: int(re.search(r"(\d{6})\.npy$", f).group(1)))
    assert files, "no shards"
    assert files == [f"edufineweb_{'val' if i == 0 else 'train'}_{i:06d}.npy" for i in range(len(files))]
    arrays = [np.load(os.path.join(out_dir, f)) for f in files]
    for i, a in enumerate(arrays):
        size = (val_size or shard_size) if i == 0 else shard_size
        assert a.dtype == np.uint16 and a.ndim == 1
        assert len(a) == size if i < len(arrays) - 1 else 0 < len(a) <= size
    return np.concatenate(arrays)


def dir_bytes(out_dir):
    out = {}
    for f in sorted(os.listdir(out_dir)):
        with open(os.path.join(out_dir, f), "rb") as fh:
            out[f] = fh.read()
    return out


def test_local_files_become_exact_shards(tmp_path):
    docs = make_docs(140, seed=1, long_every=40)  # long documents span several 500-token shards
    jsonl_docs, parquet_docs, json_docs = docs[:50], docs[50:100], docs[100:130]
    txt_docs = ["", "a whole file\r\nis one document 🙂\n"]
    surrogate_doc = "broken \ud800 surrogate"  # occurs in scraped JSON; tiktoken replaces it
    inputs = [write_jsonl(tmp_path / "a.jsonl", jsonl_docs), write_parquet(tmp_path / "b.parquet", parquet_docs)]
    (tmp_path / "c.json").write_text(json.dumps([{"text": d} for d in json_docs]))
    inputs.append(str(tmp_path / "c.json"))
    for i, doc in enumerate(txt_docs):
        (tmp_path / f"d{i}.txt").write_bytes(doc.encode())
        inputs.append(str(tmp_path / f"d{i}.txt"))
    (tmp_path / "e.jsonl").write_text("\n" + json.dumps({"text": surrogate_doc}) + "\n\n")
    inputs.append(str(tmp_path / "e.jsonl"))
    all_docs = jsonl_docs + parquet_docs + json_docs + txt_docs + [surrogate_doc]
    expected = expected_tokens(all_docs)

    out1, out2 = tmp_path / "out1", tmp_path / "out2"
    assert run(["--input", *inputs, "--output_dir", out1, "--shard_size", 500, "--num_proc", 1]) == 0
    assert np.array_equal(read_shards(out1, 500), expected)
    assert len(expected) > 5 * 500
    assert sorted(os.listdir(out1)) == sorted(shard_files(out1) + [fineweb.MANIFEST])  # no temp or cache files
    manifest = json.loads((out1 / fineweb.MANIFEST).read_text())
    assert manifest["complete"] and manifest["documents"] == len(all_docs) and manifest["tokens"] == len(expected)
    # worker processes change nothing, not even a byte of the manifest
    assert run(["--input", *inputs, "--output_dir", out2, "--shard_size", 500, "--num_proc", 2]) == 0
    assert dir_bytes(out1) == dir_bytes(out2)


def test_tokenize_texts_in_order_and_bounded():
    """Many small batches through 2 workers come back in order, and a huge input is not read ahead unboundedly
    (Pool.imap would queue it all)."""
    pulled = 0

    def endless():  # as good as endless here, yet finite: an unbounded reader fails the test instead of hanging it
        nonlocal pulled
        while pulled < 100_000:
            yield f"document {pulled}: " + "some words here " * (pulled % 5)
            pulled += 1

    batch_chars = 200
    gen = fineweb.tokenize_texts(endless(), num_proc=2, batch_chars=batch_chars)
    results = [next(gen) for _ in range(20)]
    gen.close()  # stops the pool
    lengths = np.concatenate([lengths for _, lengths in results])
    docs = [f"document {i}: " + "some words here " * (i % 5) for i in range(len(lengths))]
    assert np.array_equal(np.concatenate([t for t, _ in results]), expected_tokens(docs))
    assert np.array_equal(lengths, [len(expected_tokens([d])) for d in docs])
    max_docs_per_batch = batch_chars // len("document 0: ") + 1
    assert pulled <= (20 + fineweb.IN_FLIGHT * 2 + 1) * max_docs_per_batch


@pytest.mark.parametrize("val_docs", [None, 4, 25])
def test_continue_from_any_shard_boundary(tmp_path, val_docs):
    """A run stopped after any number of complete shards (manifest written, later shards missing, stale files
    around) continues to exactly the uninterrupted result; a damaged shard is redone; a finished run is left alone.
    With the default val shard (one shard_size) and with a --val_size smaller and larger than the shard size."""
    docs = make_docs(80, seed=2, long_every=30)
    lengths = [len(expected_tokens([d])) for d in docs]
    shard_size = sum(lengths[:9])  # the first boundary falls exactly between two documents
    val_size = sum(lengths[:val_docs]) if val_docs else None  # ... whatever the val shard's size
    inputs = [write_jsonl(tmp_path / "a.jsonl", docs[:40]), write_parquet(tmp_path / "b.parquet", docs[40:])]
    out = tmp_path / "out"
    argv = ["--input", *inputs, "--output_dir", out, "--shard_size", shard_size, "--num_proc", 1]
    argv += ["--val_size", val_size] if val_size else []
    assert run(argv) == 0
    reference = dir_bytes(out)
    assert np.array_equal(read_shards(out, shard_size, val_size), expected_tokens(docs))
    manifest = json.loads(reference[fineweb.MANIFEST])
    assert manifest["identity"]["val_size"] == (val_size or shard_size)
    n = len(manifest["shards"])
    ends = [tuple(s["end"]) for s in manifest["shards"]]
    assert ends[0] == (val_docs or 9, 0) and any(offset > 0 for _, offset in ends), "both kinds of boundary"

    mtimes = {f: os.stat(out / f).st_mtime_ns for f in reference}
    assert run(argv) == 0  # complete: nothing is rewritten
    assert {f: os.stat(out / f).st_mtime_ns for f in reference} == mtimes

    for k in range(n):
        partial = dict(manifest, shards=manifest["shards"][:k], complete=False)
        del partial["documents"], partial["tokens"]
        (out / fineweb.MANIFEST).write_text(json.dumps(partial))
        for s in manifest["shards"][k + 1:]:
            os.remove(out / s["file"])  # shard k stays: renamed, but killed before the manifest listed it
        (out / fineweb.PARTIAL).write_bytes(b"half a shard")
        assert run(argv) == 0
        assert dir_bytes(out) == reference, f"continuing after {k} shards"

    damaged = manifest["shards"][n // 2]["file"]
    with open(out / damaged, "r+b") as f:
        f.truncate(100)
    assert run(argv) == 0
    assert dir_bytes(out) == reference


def live_children(pid):
    """Processes whose parent is pid (Linux /proc)."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def is_alive(pid):
    """Running, not exited (an orphan that exited may stay a zombie until its new parent reaps it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_killed_run_continues_to_identical_shards(tmp_path):
    """The real CLI with 2 workers (and a val shard of its own size), SIGKILLed as soon as its first shard appears,
    then rerun: same shards as an uninterrupted run, no file under a shard name is ever short, and the orphaned
    workers exit."""
    rng = np.random.default_rng(3)
    words = np.array(WORDS + UNICODE)
    docs = [" ".join(rng.choice(words, size=int(rng.integers(20, 200)))) for _ in range(500)]  # ~60 shards
    data = write_jsonl(tmp_path / "data.jsonl", docs)
    shard_size, val_size = 2000, 3001
    argv = ["--input", data, "--shard_size", shard_size, "--val_size", val_size]
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    assert run([*argv, "--output_dir", reference, "--num_proc", 1]) == 0

    with open(tmp_path / "stderr", "wb") as err:
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "fineweb.py"), *map(str, argv),
                                 "--output_dir", str(killed), "--num_proc", "2"], stdout=subprocess.DEVNULL, stderr=err)
        checked = set()
        deadline = time.time() + 120
        while not (killed / fineweb.shard_filename(0)).exists():
            assert proc.poll() is None, (tmp_path / "stderr").read_text()
            assert time.time() < deadline
            time.sleep(0.002)
        workers = live_children(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert len(workers) >= 2
    while any(map(is_alive, workers)):
        assert time.time() < deadline, "workers of the killed run are still running"
        time.sleep(0.05)
    for f in shard_files(killed):  # every file under a real name is a whole shard
        a = np.load(killed / f)
        assert a.dtype == np.uint16 and a.shape == (val_size if f == fineweb.shard_filename(0) else shard_size,)
        checked.add(f)
    manifest = json.loads((killed / fineweb.MANIFEST).read_text())
    assert not manifest["complete"], "the run finished before it was killed: the test needs more data"
    assert len(checked) < len(shard_files(reference)) - 1

    assert run([*argv, "--output_dir", killed, "--num_proc", 1]) == 0  # continuing may use another --num_proc
    assert dir_bytes(killed) == dir_bytes(reference)
    assert np.array_equal(read_shards(killed, shard_size, val_size), expected_tokens(docs))


def bad_input_cases(tmp_path):
    """(files to pass as --input, text the one error line must contain) for each kind of bad input."""
    good = write_jsonl(tmp_path / "good.jsonl", make_docs(30, seed=4))
    no_text = tmp_path / "no_text.jsonl"
    no_text.write_text('{"text": "a"}\n{"text": "b"}\n{"content": "c"}\n')
    null_text = tmp_path / "null_text.jsonl"
    null_text.write_text('{"text": "a"}\n{"text": null}\n')
    bad_json = tmp_path / "bad_json.jsonl"
    bad_json.write_text('{"text": "a"}\n{"text": "b"\n')
    not_object = tmp_path / "not_object.jsonl"
    not_object.write_text('["text", "a"]\n')
    no_column = tmp_path / "no_column.parquet"
    pq.write_table(pa.table({"content": ["a", "b"]}), no_column)
    null_row = tmp_path / "null_row.parquet"
    pq.write_table(pa.table({"text": ["a", None]}), null_row)
    array_no_text = tmp_path / "array.json"
    array_no_text.write_text(json.dumps([{"text": "a"}, {"body": "b"}]))
    not_utf8 = tmp_path / "latin1.txt"
    not_utf8.write_bytes("café".encode("latin-1"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n  \n\n")
    empty_parquet = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), empty_parquet)
    csv = tmp_path / "data.csv"
    csv.write_text("text\na\n")
    (tmp_path / "no_text_dir").mkdir()
    (tmp_path / "no_text_dir" / "tags").write_text("a tag file\n")
    return {
        "missing file": ([tmp_path / "nope.jsonl"], "nope.jsonl: no such file"),
        "missing text": ([good, no_text], 'no_text.jsonl:3: record has no "text" field'),
        "null text": ([null_text], 'null_text.jsonl:2: "text" is NoneType, not a string'),
        "invalid json": ([bad_json], "bad_json.jsonl:2: invalid JSON"),
        "not an object": ([not_object], "not_object.jsonl:1: record is a JSON list, not an object"),
        "no text column": ([no_column], 'no_column.parquet: no "text" column (columns: content)'),
        "null row": ([null_row], 'null_row.parquet: row 1: "text" is NoneType'),
        "json array": ([array_no_text], 'array.json: array item 1: record has no "text" field'),
        "not utf-8": ([not_utf8], "latin1.txt: not UTF-8"),
        "empty jsonl": ([empty], "empty.jsonl: no documents (empty dataset)"),
        "blank jsonl": ([blank], "no documents (empty dataset)"),
        "empty parquet": ([empty_parquet, empty], "no documents (empty dataset)"),
        "unsupported": ([csv], "data.csv: unsupported file type"),
        "directory without text": ([tmp_path / "no_text_dir"], "no_text_dir: a directory without .jsonl, .json, "
                                                                ".parquet, .txt files"),
    }


@pytest.mark.parametrize("case", ["missing file", "missing text", "null text", "invalid json", "not an object",
                                  "no text column", "null row", "json array", "not utf-8", "empty jsonl",
                                  "blank jsonl", "empty parquet", "unsupported", "directory without text"])
def test_bad_input_one_line_and_nothing_written(tmp_path, capsys, case):
    inputs, message = bad_input_cases(tmp_path)[case]
    out = tmp_path / "out"
    # a tiny shard size: the good documents before the bad record would already fill shards
    assert run(["--input", *inputs, "--output_dir", out, "--shard_size", 10, "--num_proc", 1]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fineweb.py: error: ") and message in err[0], err
    assert not out.exists()


def test_output_dir_of_another_run_is_refused(tmp_path, capsys):
    a = write_jsonl(tmp_path / "a.jsonl", make_docs(20, seed=5))
    b = write_jsonl(tmp_path / "b.jsonl", make_docs(20, seed=6))
    out = tmp_path / "out"
    assert run(["--input", a, "--output_dir", out, "--shard_size", 100, "--num_proc", 1]) == 0
    before = dir_bytes(out)
    capsys.readouterr()
    for argv, differ in [(["--input", b, "--shard_size", 100], "source"),
                         (["--input", a, "--shard_size", 50], "shard_size, val_size"),  # the val shard follows
                         (["--input", a, "--shard_size", 50, "--val_size", 100], "shard_size"),
                         (["--input", a, "--shard_size", 100, "--val_size", 30], "val_size")]:
        assert run([*argv, "--output_dir", out, "--num_proc", 1]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{out}: holds shards of a different run ({differ} differ" in err[0], err
        assert dir_bytes(out) == before

    foreign = tmp_path / "foreign"  # e.g. build-nanogpt's output: shards without our manifest
    foreign.mkdir()
    np.save(foreign / "edufineweb_val_000000.npy", np.zeros(10, np.uint16))
    assert run(["--input", a, "--output_dir", foreign, "--num_proc", 1]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "foreign: holds shards (edufineweb_val_000000.npy, ...) of a different run" in err[0]
    assert os.listdir(foreign) == ["edufineweb_val_000000.npy"]

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert run(["--input", a, "--output_dir", a_file, "--num_proc", 1]) == 2
    assert "a_file: not a directory" in capsys.readouterr().err


def without(d, key):
    return {k: v for k, v in d.items() if k != key}


BAD_MANIFESTS = {  # name: (how to damage the loaded manifest m, text of the one error line)
    "not json": (lambda m: b"{truncated", "unreadable (JSONDecodeError"),
    "a list": (lambda m: [m], "a JSON list, not an object"),
    "no shards": (lambda m: without(m, "shards"), "no 'shards'"),
    "no identity, no complete": (lambda m: without(without(m, "identity"), "complete"), "no 'identity', 'complete'"),
    "identity a list": (lambda m: dict(m, identity=[["format", 1]]), '"identity" is not an object'),
    "shards an object": (lambda m: dict(m, shards={}), '"shards" is not a list'),
    "complete a string": (lambda m: dict(m, complete="yes"), '"complete" is not true or false'),
    "complete, no shards": (lambda m: dict(m, shards=[]), '"complete" with no shards'),
    "entry a string": (lambda m: dict(m, shards=["edufineweb_val_000000.npy"]), "shard entry 0 is not an object"),
    "entry without end": (lambda m: dict(m, shards=[m["shards"][0], without(m["shards"][1], "end")]),
                          "shard entry 1 has no 'end'"),
    "entry without tokens, file": (lambda m: dict(m, shards=[without(without(m["shards"][0], "tokens"), "file")]),
                                   "shard entry 0 has no 'file', 'tokens'"),
    "file a number": (lambda m: dict(m, shards=[dict(m["shards"][0], file=0)]), 'shard entry 0: "file" is not a'),
    "tokens a string": (lambda m: dict(m, shards=[dict(m["shards"][0], tokens="100")]),
                        'shard entry 0: "tokens" is not a positive integer'),
    "tokens true": (lambda m: dict(m, shards=[dict(m["shards"][0], tokens=True)]), '"tokens" is not a positive'),
    "tokens zero": (lambda m: dict(m, shards=[dict(m["shards"][0], tokens=0)]), '"tokens" is not a positive'),
    "end one number": (lambda m: dict(m, shards=[dict(m["shards"][0], end=[3])]), '"end" is not [document, token]'),
    "end negative": (lambda m: dict(m, shards=[dict(m["shards"][0], end=[3, -1])]), '"end" is not [document'),
    "end floats": (lambda m: dict(m, shards=[dict(m["shards"][0], end=[3.0, 0.5])]), '"end" is not [document'),
}


@pytest.mark.parametrize("case", list(BAD_MANIFESTS))
def test_bad_manifest_one_line_and_nothing_touched(tmp_path, capsys, case):
    """A damaged or hand-edited manifest (every key and type that is used later) is one error line naming the
    manifest, what is wrong and what to do; the output directory is left exactly as it was."""
    damage, message = BAD_MANIFESTS[case]
    a = write_jsonl(tmp_path / "a.jsonl", make_docs(30, seed=5))
    out = tmp_path / "out"
    argv = ["--input", a, "--output_dir", out, "--shard_size", 100, "--num_proc", 1]
    assert run(argv) == 0
    manifest = json.loads((out / fineweb.MANIFEST).read_text())
    assert len(manifest["shards"]) >= 2
    damaged = damage(manifest)
    (out / fineweb.MANIFEST).write_bytes(damaged if isinstance(damaged, bytes) else json.dumps(damaged).encode())
    before = dir_bytes(out)
    capsys.readouterr()
    assert run(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"fineweb.py: error: {out / fineweb.MANIFEST}: bad manifest: "), err
    assert message in err[0] and err[0].endswith(f"; delete {out} or choose another --output_dir"), err
    assert dir_bytes(out) == before


def test_manifest_without_val_size_continues(tmp_path, capsys):
    """A manifest written before --val_size existed (no "val_size": the val shard was one shard_size) is continued
    by the same command, to the same bytes; a command with another --val_size is refused."""
    docs = make_docs(60, seed=8)
    a = write_jsonl(tmp_path / "a.jsonl", docs)
    out = tmp_path / "out"
    argv = ["--input", a, "--output_dir", out, "--shard_size", 100, "--num_proc", 1]
    assert run(argv) == 0
    reference = dir_bytes(out)
    manifest = json.loads(reference[fineweb.MANIFEST])
    old = dict(manifest, identity=without(manifest["identity"], "val_size"), shards=manifest["shards"][:2],
               complete=False)
    for s in manifest["shards"][2:]:
        os.remove(out / s["file"])
    (out / fineweb.MANIFEST).write_text(json.dumps(without(without(old, "documents"), "tokens")))
    before = dir_bytes(out)
    capsys.readouterr()
    assert run([*argv, "--val_size", 99]) == 2
    assert "holds shards of a different run (val_size differ" in capsys.readouterr().err
    assert dir_bytes(out) == before
    assert run([*argv, "--val_size", 100]) == 0  # the same as leaving it out
    assert dir_bytes(out) == reference


def messages(capsys):
    """fineweb.py's own lines on stderr (tqdm's progress bar writes there too)."""
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("fineweb.py: ")]


def test_small_input_says_what_to_do(tmp_path, capsys):
    """Tokens that all fit in the val shard: the run says there is no train shard and suggests a --shard_size that
    gives a val shard and several train shards (following it works, and is quiet about it), or a --val_size; a val
    shard smaller than train_gpt2.py's default val_tokens is pointed out too."""
    docs = make_docs(100, seed=9)
    total = len(expected_tokens(docs))
    a = write_jsonl(tmp_path / "a.jsonl", docs)
    assert run(["--input", a, "--output_dir", tmp_path / "one", "--num_proc", 1]) == 0  # default shard size
    assert shard_files(tmp_path / "one") == [fineweb.shard_filename(0)]
    err = messages(capsys)
    assert len(err) == 2 and all(line.startswith("fineweb.py: warning: ") for line in err), err
    assert f"no train shard: the val shard (up to 100,000,000 tokens) took all {total:,} tokens" in err[0]
    suggested = re.search(r"e\.g\. --shard_size (\d+) \(a val shard and (\d+) train shards\)", err[0])
    assert suggested and f"or a --val_size below {total:,}" in err[0], err[0]
    assert f"the val shard holds {total:,} tokens, too few for train_gpt2.py's default --val_tokens=10485760" in err[1]
    assert run(["--input", a, "--output_dir", tmp_path / "one", "--num_proc", 1]) == 0  # rerun: said again
    assert len(messages(capsys)) == 2

    shard_size, train_shards = map(int, suggested.groups())
    assert train_shards >= 5
    assert run(["--input", a, "--output_dir", tmp_path / "many", "--shard_size", shard_size, "--num_proc", 1]) == 0
    assert len(shard_files(tmp_path / "many")) == 1 + train_shards
    assert "no train shard" not in capsys.readouterr().err

    # a --val_size of its own that swallows everything: the suggestion is a smaller --val_size
    assert run(["--input", a, "--output_dir", tmp_path / "val", "--shard_size", 50, "--val_size", total,
                "--num_proc", 1]) == 0
    err = capsys.readouterr().err
    val_size, train_shards = map(int, re.search(r"e\.g\. --val_size (\d+) \(a val shard and (\d+) train", err).groups())
    assert run(["--input", a, "--output_dir", tmp_path / "val2", "--shard_size", 50, "--val_size", val_size,
                "--num_proc", 1]) == 0
    assert len(shard_files(tmp_path / "val2")) == 1 + train_shards


def test_layout_warnings_numbers():
    shards = [{"tokens": 100_000_000}, {"tokens": 100_000_000}, {"tokens": 5}]
    assert fineweb.layout_warnings("d", shards, 100_000_000, 100_000_000) == []  # FineWeb's layout: nothing to say
    assert fineweb.layout_warnings("d", [{"tokens": fineweb.TRAIN_VAL_TOKENS + 1}, {"tokens": 1}], 1, 1) == []
    (line,) = fineweb.layout_warnings("d", [{"tokens": 500_000}, {"tokens": 500_000}], 500_000, 500_000)
    fit = int(re.search(r"e\.g\. --val_tokens=(\d+) with the default batch_size\*block_size, 65,536\)", line).group(1))
    assert fit == 458_752 and fit % (64 * 1024) == 0 and fit < 500_000  # the largest multiple that fits
    assert "a multiple of batch_size*block_size below 500,000" in line
    (line,) = fineweb.layout_warnings("d", [{"tokens": 60_000}, {"tokens": 1}], 60_000, 60_000)
    assert line.endswith("below 60,000")  # no multiple of the default 65,536 fits: no example
    no_train, _ = fineweb.layout_warnings("d", [{"tokens": 3_366_148}], 100_000_000, 100_000_000)
    assert "e.g. --shard_size 330000 (a val shard and 10 train shards)" in no_train  # 330000 + 10 shards >= 3,366,148


def test_write_error_names_the_file(tmp_path):
    # e.g. a full disk: np.save's OSError names no file; the error must, and nothing is left under the temporary name
    def full_disk(f):
        raise OSError(28, "No space left on device")

    with pytest.raises(fineweb.DataError, match=r"edufineweb_val_000000\.npy: cannot write \(No space left on device\)"):
        fineweb.save_atomic(str(tmp_path / fineweb.shard_filename(0)), full_disk)
    assert os.listdir(tmp_path) == []


def test_token_ids_checked_to_fit_uint16():
    assert fineweb.to_uint16(np.array([0, 50256, 65535])).dtype == np.uint16
    with pytest.raises(fineweb.DataError, match="token id 65536 does not fit in uint16"):
        fineweb.to_uint16(np.array([1, 65536]))


def test_hub_path_through_datasets(tmp_path):
    """The --dataset path (datasets.load_dataset, downloaded and streamed) on a local dataset folder, offline, with
    datasets' cache in tmp_path: same shards either way, nothing but shards and the manifest in the output."""
    docs = make_docs(60, seed=7, long_every=20)
    (tmp_path / "ds").mkdir()
    write_jsonl(tmp_path / "ds" / "data.jsonl", docs)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "data.jsonl").write_text('{"content": "a"}\n')
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               HF_DATASETS_CACHE=str(tmp_path / "hf" / "datasets"))

    def cli(*argv):
        return subprocess.run([sys.executable, os.path.join(ROOT, "fineweb.py"), *map(str, argv)], env=env,
                              capture_output=True, text=True, timeout=300)

    expected = expected_tokens(docs)
    for streaming in ([], ["--streaming"]):
        out = tmp_path / f"out{len(streaming)}"
        r = cli("--dataset", tmp_path / "ds", *streaming, "--output_dir", out, "--shard_size", 300, "--num_proc", 1)
        assert r.returncode == 0, r.stderr
        assert np.array_equal(read_shards(out, 300), expected)
        assert sorted(os.listdir(out)) == sorted(shard_files(out) + [fineweb.MANIFEST])
    r = cli("--dataset", tmp_path / "bad", "--streaming", "--output_dir", tmp_path / "out_bad")
    assert r.returncode == 2
    assert r.stderr.strip() == f'fineweb.py: error: {tmp_path / "bad"}: no "text" column (columns: content)'
    assert not (tmp_path / "out_bad").exists()


def test_options_both_spellings_bare_flag_and_one_line_errors(tmp_path, capsys):
    """--name=value and --name value give the same run, a bare --streaming is true; a bad option, the two sources
    together, or hub options with --input files: one error line, exit 2, nothing written. --help exits 0."""
    a = write_jsonl(tmp_path / "a.jsonl", make_docs(30, seed=11))
    assert run(["--input", a, "--output_dir", tmp_path / "spaced", "--shard_size", 100, "--num_proc", 1]) == 0
    assert run([f"--input={a}", f"--output_dir={tmp_path / 'equals'}", "--shard_size=100", "--num_proc=1"]) == 0
    assert dir_bytes(tmp_path / "spaced") == dir_bytes(tmp_path / "equals")
    args = fineweb.parse_args(["--streaming", "--name", "sample-100BT"])
    assert args.streaming is True and args.name == "sample-100BT" and args.val_size == fineweb.SHARD_SIZE
    assert fineweb.parse_args(["--streaming=false"]).streaming is False
    capsys.readouterr()
    out = tmp_path / "out"
    for argv, message in [
        (["--bogus=1"], "unknown option --bogus"),
        (["--bogus", "1"], "unknown option --bogus"),
        (["--shard_size", "0"], "--shard_size=0: must be >= 1"),
        (["--num_proc=two"], "--num_proc=two: expected int"),
        (["--streaming=maybe"], "--streaming=maybe: expected true/false"),
        (["--input", a, "--dataset", "x"], "--dataset and --input exclude each other"),
        (["--input", a, "--streaming"], "--name and --streaming apply to a hub --dataset, not to --input files"),
        (["--input", a, "--name", "x"], "--name and --streaming apply to a hub --dataset, not to --input files"),
        (["--input"], "argument --input: expected at least one argument"),
    ]:
        assert run([*argv, "--output_dir", out]) == 2, argv
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith("fineweb.py: error: ") and message in err[0], (argv, err)
    assert not out.exists()
    assert run(["--help"]) == 0
    help_out = capsys.readouterr().out
    assert "python fineweb.py --input" in help_out
    assert all(f"--{name}=" in help_out for name in ("dataset", "input", "name", "streaming", "output_dir",
                                                     "shard_size", "val_size", "num_proc"))


def test_bench_tokenize_speed_runs_from_the_root():
    """python -m bench.tokenize_speed, as its docstring launches it (fineweb's spawn workers included): both ways
    give identical tokens; a bad option is one line."""
    def bench(*argv):
        return subprocess.run([sys.executable, "-m", "bench.tokenize_speed", *argv], cwd=ROOT, capture_output=True,
                              text=True, timeout=300)

    r = bench("--mb", "0.05", "--rounds=1", "--num_proc", "2")
    assert r.returncode == 0, r.stderr
    assert "identical from both ways" in r.stdout and "ratio fineweb.py / build-nanogpt: " in r.stdout
    r = bench("--rounds", "0")
    assert r.returncode == 2 and r.stderr.splitlines() == ["bench.tokenize_speed: error: --rounds=0: must be >= 1"]


def test_a_directory_input_reads_its_text_files_sorted(tmp_path, capsys):
    """--input DOCS (Vim's help directory was tried): 'DOCS: no such file' before; now its .txt/.jsonl/.json/.parquet
    files in name order, its other files and subdirectories left out: the shards of those files given one by one."""
    docs = tmp_path / "DOCS"
    (docs / "sub").mkdir(parents=True)
    (docs / "b.txt").write_text("the second file, a whole document\n")
    write_jsonl(docs / "a.jsonl", make_docs(10, seed=7))
    (docs / "tags").write_text("not a kind fineweb.py reads\n")
    (docs / "sub" / "c.txt").write_text("in a subdirectory: left out\n")
    assert run(["--input", docs, "--output_dir", tmp_path / "from_dir", "--shard_size", 50, "--num_proc", 1]) == 0
    files = [docs / "a.jsonl", docs / "b.txt"]
    assert run(["--input", *files, "--output_dir", tmp_path / "from_files", "--shard_size", 50, "--num_proc", 1]) == 0
    assert dir_bytes(tmp_path / "from_dir") == dir_bytes(tmp_path / "from_files")
    assert "11 documents" in capsys.readouterr().out


def test_help_says_a_directory_is_read(capsys):
    assert run(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "a directory: its files of these kinds, sorted by name" in text
