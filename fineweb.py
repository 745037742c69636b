"""
FineWeb-Edu (or any text dataset) -> pretokenized GPT-2 shards for train_gpt2.py.

    python fineweb.py                                   # HuggingFaceFW/fineweb-edu sample-10BT -> edu_fineweb10B/
    python fineweb.py --name sample-100BT --streaming    # stream the hub data: the raw parquet never fills the disk
    python fineweb.py --input a.jsonl b.parquet c.txt --output_dir my_shards

Each document becomes [<|endoftext|>] + encode_ordinary(text) (GPT-2 BPE, eot id 50256), and the token stream is cut
into uint16 .npy shards (np.save): edufineweb_val_000000.npy holds the first --val_size tokens (default: --shard_size),
then edufineweb_train_000001.npy, ... of --shard_size tokens each (build-nanogpt's layout). Shards are written to a
temporary name and renamed when complete, and a manifest in the output directory records the run and where each
complete shard ended, so a killed run continues where it stopped when the same command is run again, and the result
is identical to an uninterrupted run.
"""

import contextlib
import itertools
import json
import multiprocessing as mp
import os
import re
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import tiktoken
from tqdm import tqdm

from files import SHARD_PREFIX, JSONLinesError, WriteError, atomic_write, hub_offline, jsonl_records, shard_filename
from options import ConfigError, at_least, option, parse, run

SCRIPT = os.path.basename(__file__)
ENCODING = "gpt2"                     # tiktoken's GPT-2 BPE; its <|endoftext|> (50256) starts every document
DATASET = "HuggingFaceFW/fineweb-edu"
NAME = "sample-10BT"                  # the config used when --dataset is left at DATASET and --name is not given
SPLIT = "train"                       # the only split FineWeb-Edu has; we cut our own val shard from its start
OUTPUT_DIR = "edu_fineweb10B"         # next to this script unless --output_dir says otherwise
SHARD_SIZE = 100_000_000              # tokens per shard (200 MB as uint16)
SHARD_RE = re.compile(rf"{SHARD_PREFIX}_(val|train)_\d{{6}}\.npy")
MANIFEST = "fineweb_manifest.json"
# The one temporary file (shards and manifest are written one at a time). Its name holds neither "train" nor "val"
# nor ".npy", so no shard loader picks it up, and a rerun deletes it.
PARTIAL = ".fineweb-partial.tmp"
RERUN = "free space and run the same command again"
MANIFEST_FORMAT = 1                   # bump when the meaning of the manifest or of the shards changes
# train_gpt2.py's defaults, copied rather than imported (it imports torch, and every spawn worker re-imports this file):
# --val_tokens 10,485,760 = 160 micro-batches of --batch_size 64 x --block_size 1024 tokens. The val shard must hold
# val_tokens + 1 tokens (the targets are shifted by one).
TRAIN_VAL_TOKENS = 10_485_760
TRAIN_MICRO_BATCH = 64 * 1024
BATCH_CHARS = 1 << 20                 # characters of text per task sent to a worker (~250k tokens)
IN_FLIGHT = 2                         # tasks in flight per worker: keeps workers busy, bounds memory
ROWS = 1024                           # rows per read from parquet / arrow
INPUT_TYPES = (".jsonl", ".json", ".parquet", ".txt")


class DataError(ValueError):
    """Bad input or output: main() prints it as one line and exits with status 2."""


# -----------------------------------------------------------------------------
# reading documents: local files (our own streaming readers: no cache files) and the hub (through `datasets`)

def check_text(text, where):
    """The `text` of one record, checked to be a string."""
    if not isinstance(text, str):
        raise DataError(f'{where}: "text" is {type(text).__name__}, not a string')
    return text


def record_text(record, where):
    """The `text` of one JSON record (`where` names it: "file:line" or "file: array item N"), checked."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: record is a JSON {type(record).__name__}, not an object")
    if "text" not in record:
        raise DataError(f'{where}: record has no "text" field')
    return check_text(record["text"], where)


def iter_jsonl(path):
    """Texts of a JSON Lines file: one object with a "text" field per non-blank line."""
    try:
        for where, record in jsonl_records(path):
            yield record_text(record, where)
    except JSONLinesError as e:
        raise DataError(str(e)) from None


def iter_json(path):
    """Texts of a .json file: a JSON array of records, or (like `datasets`' json builder) JSON Lines."""
    with open(path, "rb") as f:
        is_array = f.read(1 << 16).lstrip()[:1] == b"["
    if not is_array:
        yield from iter_jsonl(path)
        return
    try:
        with open(path, "rb") as f:
            records = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: invalid JSON ({e})") from None
    for i, record in enumerate(records):
        yield record_text(record, f"{path}: array item {i}")


def iter_parquet(path):
    """Texts of the `text` column of a parquet file, read ROWS rows at a time (only that column is decoded)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    if pf.schema_arrow.get_field_index("text") < 0:
        raise DataError(f'{path}: no "text" column (columns: {", ".join(pf.schema_arrow.names)})')
    row = 0
    batches = pf.iter_batches(batch_size=ROWS, columns=["text"])
    while True:
        try:
            batch = next(batches, None)
        except pa.ArrowException as e:  # a damaged page somewhere in the file
            raise DataError(f"{path}: unreadable after row {row} ({e})") from None
        if batch is None:
            return
        for text in batch.column(0).to_pylist():
            yield check_text(text, f"{path}: row {row}")
            row += 1


def iter_txt(path):
    """A .txt file is one document: its exact content (bytes decoded as UTF-8, line endings untouched)."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        yield data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None


READERS = {".jsonl": iter_jsonl, ".json": iter_json, ".parquet": iter_parquet, ".txt": iter_txt}


def expand_inputs(paths):
    """The input files: a directory given stands for its files of the types we read (INPUT_TYPES), sorted by name
    (its other files and its subdirectories are left out), so that `--input DOCS` reads a folder of text files."""
    files = []
    for path in paths:
        if not os.path.isdir(path):
            files.append(path)
            continue
        found = sorted(os.path.join(path, name) for name in os.listdir(path)
                       if os.path.splitext(name)[1].lower() in READERS and os.path.isfile(os.path.join(path, name)))
        if not found:
            raise DataError(f"{path}: a directory without {', '.join(INPUT_TYPES)} files")
        files += found
    return files


def check_input_files(paths):
    """Cheap checks before anything else: every file exists and has a type we read."""
    for path in paths:
        if not os.path.isfile(path):
            raise DataError(f"{path}: no such file")
        if os.path.splitext(path)[1].lower() not in READERS:
            raise DataError(f"{path}: unsupported file type (expected {', '.join(INPUT_TYPES)})")


def iter_local_texts(paths):
    """All documents of the input files, in order."""
    for path in paths:
        yield from READERS[os.path.splitext(path)[1].lower()](path)


def count_local_documents(paths, progress):
    """Reads every record once, so that bad data is reported before a single shard is written.
    (Its bar shows on a terminal only, and is erased when done: an error stays the one line on stderr.)"""
    with tqdm(iter_local_texts(paths), desc="checking input", unit=" docs", leave=False,
              disable=None if progress else True) as docs:
        n = sum(1 for _ in docs)
    if n == 0:
        raise DataError(f"{' '.join(paths)}: no documents (empty dataset)")
    return n


def hub_label(dataset, name):
    return f"{dataset} ({name})" if name else dataset


def load_hub(dataset, name, streaming):
    """The train split of a hub dataset, checked to have a text column and at least one document.

    Offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE, or a hub that does not answer) only the local datasets cache can
    serve it: datasets is put in offline mode, which fails at once instead of after ~25 s of retries."""
    import datasets
    label = hub_label(dataset, name)
    offline = ""
    if not os.path.exists(dataset):  # a local dataset folder needs no hub
        offline = hub_offline(datasets.config.HF_HUB_OFFLINE)
        if offline:  # datasets reads this flag (set from the environment at import) at every call
            datasets.config.HF_HUB_OFFLINE = True
    try:
        ds = datasets.load_dataset(dataset, name=name, split=SPLIT, streaming=streaming)
    except Exception as e:  # hub/network/config errors come in many types: report any of them in one line
        if offline:
            raise DataError(f"{label}: cannot load: {offline} and not in the local datasets cache; "
                            f"use --input with local files") from None
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise DataError(f"{label}: cannot load ({type(e).__name__}: {first_line})") from None
    if streaming:
        first = next(iter(ds), None)  # a stream's columns and size are only known by reading it
        if first is None:
            raise DataError(f"{label}: no documents (empty dataset)")
        columns = list(first)
    else:
        if len(ds) == 0:
            raise DataError(f"{label}: no documents (empty dataset)")
        columns = ds.column_names
    if "text" not in columns:
        raise DataError(f'{label}: no "text" column (columns: {", ".join(columns)})')
    return ds


def iter_hub_texts(ds, start, label):
    """Documents start, start+1, ... of a hub dataset (skipping never tokenizes: the data is only read past)."""
    import datasets
    if start:  # a stream can only be read past; a downloaded dataset is selected from directly
        ds = ds.skip(start) if isinstance(ds, datasets.IterableDataset) else ds.select(range(start, len(ds)))
    doc = start
    for batch in ds.select_columns("text").iter(batch_size=ROWS):
        for text in batch["text"]:
            yield check_text(text, f"{label}: document {doc}")
            doc += 1


# -----------------------------------------------------------------------------
# tokenizing: batches of documents encoded in worker processes, results in order, a bounded number in flight

def to_uint16(tokens):
    """Token ids as uint16, checked to fit (GPT-2's 50257 ids do; a larger vocabulary would silently wrap)."""
    if tokens.size and int(tokens.max()) >= 1 << 16:
        raise DataError(f"token id {int(tokens.max())} does not fit in uint16 shards")
    return tokens.astype(np.uint16)


def encode_batch(texts, encoding_name=ENCODING):
    """[eot] + encode_ordinary(text) for each text, concatenated -> (tokens (N,) uint16, lengths (len(texts),) int64).

    encode_ordinary: a literal "<|endoftext|>" inside a document is ordinary text, never a document boundary.
    Returning one flat numpy array per batch keeps the pickling between processes cheap."""
    enc = tiktoken.get_encoding(encoding_name)  # tiktoken caches it per process
    eot = enc.eot_token
    flat = []
    lengths = np.empty(len(texts), dtype=np.int64)
    for i, text in enumerate(texts):
        ids = enc.encode_ordinary(text)
        flat.append(eot)
        flat.extend(ids)
        lengths[i] = len(ids) + 1
    return to_uint16(np.array(flat, dtype=np.int64)), lengths


def batch_texts(texts, batch_chars):
    """Groups documents into lists of about batch_chars characters (each document counts at least 1)."""
    batch, chars = [], 0
    for text in texts:
        batch.append(text)
        chars += len(text) + 1
        if chars >= batch_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def default_num_proc():
    """All the cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def init_worker(encoding_name):
    """Ctrl-C is the parent's to handle (one message, not one traceback per worker); load the BPE once."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    tiktoken.get_encoding(encoding_name)


def tokenize_texts(texts, num_proc, batch_chars=BATCH_CHARS, encoding_name=ENCODING):
    """Yields encode_batch(batch) for consecutive batches of texts, in order, using num_proc worker processes.

    Pool.imap would read the (lazy, possibly endless) input as fast as it can and queue it all in memory, so tasks
    are submitted by hand with at most IN_FLIGHT per worker outstanding: memory stays bounded, workers stay busy.
    'spawn' rather than fork: the parent may hold pyarrow/datasets threads, and forking a threaded process can hang."""
    batches = batch_texts(texts, batch_chars)
    if num_proc <= 1:
        for batch in batches:
            yield encode_batch(batch, encoding_name)
        return
    with mp.get_context("spawn").Pool(num_proc, initializer=init_worker, initargs=(encoding_name,)) as pool:
        pending = deque()
        for batch in batches:
            pending.append(pool.apply_async(encode_batch, (batch, encoding_name)))
            if len(pending) >= IN_FLIGHT * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# -----------------------------------------------------------------------------
# cutting the token stream into shards

def shard_sizes(val_size, shard_size, start=0):
    """Sizes of shards start, start+1, ...: val_size for the val shard (index 0), shard_size for every train shard."""
    return itertools.islice(itertools.chain([val_size], itertools.repeat(shard_size)), start, None)


def fill_shards(batches, sizes, doc=0, offset=0):
    """Cuts a stream of (tokens, lengths) batches, starting at document `doc`, into shards of next(sizes) tokens.

    Yields (shard tokens, end) for every full shard and then for the last, shorter one, where end = (d, o) is the
    position just past the shard: the next token is token o of document d (counting its eot). A document spans shards
    freely. The first `offset` tokens of document `doc` are dropped: they are already in the shards before
    (continuing a killed run)."""
    shard_size = next(sizes)
    buf = np.empty(shard_size, dtype=np.uint16)
    fill = 0
    for tokens, lengths in batches:
        ends = np.cumsum(lengths)  # (docs in batch,) token index just past each document
        pos = offset
        if offset and offset >= ends[0]:
            raise DataError(f"document {doc} has {ends[0]} tokens, but the run being continued stopped at token "
                            f"{offset} of it: the input changed")
        offset = 0
        while pos < len(tokens):
            n = min(shard_size - fill, len(tokens) - pos)
            buf[fill:fill + n] = tokens[pos:pos + n]
            fill += n
            pos += n
            if fill == shard_size:
                i = int(np.searchsorted(ends, pos, side="right"))  # first document of the batch not wholly written
                yield buf, (doc + i, pos - (int(ends[i - 1]) if i else 0))
                shard_size = next(sizes)
                buf = np.empty(shard_size, dtype=np.uint16)
                fill = 0
        doc += len(lengths)
    if offset:
        raise DataError(f"the input ended before document {doc}, where the run being continued stopped: it changed")
    if fill:
        yield buf[:fill], (doc, 0)


def save_atomic(path, write):
    """files.atomic_write under our one temporary name (a kill -9 leaves it to the next run to delete). A write error
    may name no file ("No space left on device"): the DataError names the one meant, and the way on (the rerun
    continues after the complete shards the manifest lists)."""
    try:
        atomic_write(path, write, tmp=PARTIAL)
    except WriteError as e:
        raise DataError(f"{path}: cannot write ({e.reason}); {RERUN}") from None
    except OSError as e:
        raise DataError(f"{path}: cannot write ({e.strerror or e}); {RERUN}") from None


def write_manifest(out_dir, manifest):
    save_atomic(os.path.join(out_dir, MANIFEST), lambda f: f.write(json.dumps(manifest, indent=1).encode()))


def shard_is_complete(path, tokens):
    """A shard file is complete when it loads as a (tokens,) uint16 array (a short file fails to map)."""
    try:
        a = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return False
    return a.dtype == np.uint16 and a.shape == (tokens,)


# -----------------------------------------------------------------------------
# the run: what it is (identity), what is already done (manifest), and the work

def run_identity(dataset, name, streaming, paths, shard_size, val_size):
    """Everything that decides the shards' content. A rerun continues only if this is unchanged; --num_proc and
    the batching do not change a byte of the output, so they are not part of it. Local files are identified by path,
    size and modification time (hashing tens of GB would cost more than it protects)."""
    if paths:
        source = {"files": [{"path": os.path.abspath(p), "bytes": os.stat(p).st_size,
                             "mtime_ns": os.stat(p).st_mtime_ns} for p in paths]}
    else:  # streaming is included: it should read the same rows in the same order, but nothing checks that here
        source = {"dataset": dataset, "name": name, "split": SPLIT, "streaming": streaming}
    return {"format": MANIFEST_FORMAT, "encoding": ENCODING, "shard_size": shard_size, "val_size": val_size,
            "source": source}


def is_count(x, least=0):
    """A JSON integer >= least (JSON true/false load as bool, which Python counts as int: not a count)."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= least


def read_manifest(path):
    """(identity, listed shards, complete) from a manifest file, every key and type used later checked: a damaged or
    hand-edited manifest is one error line, not a KeyError somewhere further on."""
    try:
        with open(path, "rb") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: invalid JSON or not UTF-8
        problem = f"unreadable ({type(e).__name__}: {e})"
    else:
        problem = manifest_problem(manifest)
    if problem:
        raise DataError(f"{path}: bad manifest: {problem}; delete {os.path.dirname(path)} "
                        f"or choose another --output_dir")
    identity = dict(manifest["identity"])
    identity.setdefault("val_size", identity.get("shard_size"))  # written before --val_size: val = one shard_size
    return identity, manifest["shards"], manifest["complete"]


def manifest_problem(manifest):
    """What is wrong with a loaded manifest ("" if nothing): the keys and types completed_shards and prepare use."""
    if not isinstance(manifest, dict):
        return f"a JSON {type(manifest).__name__}, not an object"
    missing = [k for k in ("identity", "shards", "complete") if k not in manifest]
    if missing:
        return f"no {', '.join(repr(k) for k in missing)}"
    if not isinstance(manifest["identity"], dict):
        return '"identity" is not an object'
    if not isinstance(manifest["shards"], list):
        return '"shards" is not a list'
    if not isinstance(manifest["complete"], bool):
        return '"complete" is not true or false'
    if manifest["complete"] and not manifest["shards"]:
        return '"complete" with no shards'
    for i, entry in enumerate(manifest["shards"]):
        if not isinstance(entry, dict):
            return f"shard entry {i} is not an object"
        missing = [k for k in ("file", "tokens", "end") if k not in entry]
        if missing:
            return f"shard entry {i} has no {', '.join(repr(k) for k in missing)}"
        if not isinstance(entry["file"], str):
            return f'shard entry {i}: "file" is not a string'
        if not is_count(entry["tokens"], least=1):
            return f'shard entry {i}: "tokens" is not a positive integer'
        end = entry["end"]
        if not (isinstance(end, list) and len(end) == 2 and all(map(is_count, end))):
            return f'shard entry {i}: "end" is not [document, token] (two integers >= 0)'
    return ""


def completed_shards(out_dir, identity):
    """(the leading shards of this run already complete in out_dir, whether the run had finished).

    Raises DataError if out_dir holds shards of a different run. A shard listed in the manifest that is missing or
    damaged is redone, with every shard after it."""
    if not os.path.exists(out_dir):
        return [], False
    if not os.path.isdir(out_dir):
        raise DataError(f"{out_dir}: not a directory")
    manifest_path = os.path.join(out_dir, MANIFEST)
    if not os.path.exists(manifest_path):
        shards = sorted(f for f in os.listdir(out_dir) if SHARD_RE.fullmatch(f))
        if shards:
            raise DataError(f"{out_dir}: holds shards ({shards[0]}, ...) of a different run (no {MANIFEST}); "
                            f"delete them or choose another --output_dir")
        return [], False
    old_identity, listed, complete = read_manifest(manifest_path)
    if old_identity != identity:
        differ = ", ".join(k for k in identity if old_identity.get(k) != identity[k]) or "format"
        raise DataError(f"{out_dir}: holds shards of a different run ({differ} differ from this command's); "
                        f"delete them or choose another --output_dir")
    done = []
    for index, entry in enumerate(listed):
        if entry["file"] != shard_filename(index) or not shard_is_complete(os.path.join(out_dir, entry["file"]),
                                                                           entry["tokens"]):
            print(f"{os.path.join(out_dir, entry['file'])}: missing or damaged, redoing it and what follows")
            break
        done.append(entry)
    return done, complete and len(done) == len(listed)


def write_shards(texts, out_dir, identity, done, num_proc, num_docs=None, progress=True):
    """Tokenizes texts (the documents from the end of the `done` shards on) into the shards that follow `done`.

    The manifest is written before the first shard and again after each shard is renamed into place, so at every
    moment every shard it lists is complete. num_docs, if known, is checked against the documents read.
    Returns the finished manifest."""
    sizes = shard_sizes(identity["val_size"], identity["shard_size"], start=len(done))
    doc, offset = done[-1]["end"] if done else (0, 0)
    manifest = {"identity": identity, "shards": list(done), "complete": False}
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(os.path.join(out_dir, PARTIAL)):  # left by a killed run
        os.remove(os.path.join(out_dir, PARTIAL))
    write_manifest(out_dir, manifest)

    bar = tqdm(desc="tokenizing", unit="tok", unit_scale=True, disable=not progress)

    def counted(batches):
        for tokens, lengths in batches:
            bar.update(len(tokens))
            yield tokens, lengths

    # closing the tokenizer stops the workers, and closing the bar ends its line, even on error: the error's own line
    with contextlib.closing(tokenize_texts(texts, num_proc)) as batches, contextlib.closing(bar):
        shards = fill_shards(counted(batches), sizes, doc, offset)
        for index, (tokens, end) in enumerate(shards, start=len(done)):
            name = shard_filename(index)
            save_atomic(os.path.join(out_dir, name), lambda f: np.save(f, tokens))
            manifest["shards"].append({"file": name, "tokens": int(len(tokens)), "end": [int(end[0]), int(end[1])]})
            write_manifest(out_dir, manifest)
            bar.set_postfix(shards=index + 1)
    documents = manifest["shards"][-1]["end"][0] if manifest["shards"] else 0
    if num_docs is not None and documents != num_docs:
        raise DataError(f"read {documents:,} documents but counted {num_docs:,} before: the input changed")
    manifest["complete"] = True
    manifest["documents"] = documents
    manifest["tokens"] = sum(s["tokens"] for s in manifest["shards"])
    write_manifest(out_dir, manifest)
    return manifest


@dataclass
class FinewebConfig:
    dataset: str = option(DATASET, "hub dataset with a 'text' column, or a local dataset folder")
    input: list = option(None, f"local files instead of the hub, read in the order given ({', '.join(INPUT_TYPES)}): "
                               "a record with a 'text' field per line / array element / row, a whole .txt file per "
                               "document; a directory: its files of these kinds, sorted by name (not its "
                               "subdirectories)", nargs="+", metavar="FILE|DIR", type=str)
    name: str = option(None, f"hub config (default: {NAME} for {DATASET}, none otherwise)")
    streaming: bool = option(False, "stream the hub dataset instead of downloading it first")
    output_dir: str = option(os.path.join(os.path.dirname(os.path.abspath(__file__)), OUTPUT_DIR),
                             f"where the shards go (default: {OUTPUT_DIR}/ next to this script)")
    shard_size: int = option(SHARD_SIZE, "tokens per shard", type=at_least(1))
    val_size: int = option(None, "tokens of the val shard, the first of the stream (default: --shard_size)",
                           type=at_least(1))
    num_proc: int = option(default_num_proc(), "tokenizer processes (default: all cores)", type=at_least(1))


def parse_args(argv):
    """The FinewebConfig of argv, its defaults that depend on other options filled in. Raises ConfigError."""
    args, given = parse(FinewebConfig, argv)
    if {"dataset", "input"} <= given:
        raise ConfigError("--dataset and --input exclude each other: a hub dataset or local files")
    if args.input and (args.name is not None or args.streaming):
        raise ConfigError("--name and --streaming apply to a hub --dataset, not to --input files")
    if args.name is None and args.dataset == DATASET and not args.input:
        args.name = NAME
    if args.val_size is None:
        args.val_size = args.shard_size
    return args


def round_down(n):
    """n rounded down to 2 significant digits (a suggestion easy to type)."""
    unit = 10 ** max(len(str(n)) - 2, 0)
    return n // unit * unit


def layout_warnings(out_dir, shards, val_size, shard_size):
    """What the shards leave train_gpt2.py short of, and what to do, one line each (none for a usual run)."""
    tokens, val = sum(s["tokens"] for s in shards), shards[0]["tokens"]
    warnings = []
    if len(shards) == 1:  # the val shard swallowed everything: shrink it (with the shards, if it is one shard_size)
        option, n = ("--shard_size" if val_size == shard_size else "--val_size"), max(round_down(tokens // 10), 1)
        train = -(-(tokens - n) // (n if val_size == shard_size else shard_size))
        what = f"e.g. {option} {n} (a val shard and {train} train shard{'s' * (train > 1)})" if train else "more data"
        other = f", or a --val_size below {tokens:,}" if train and val_size == shard_size else ""
        warnings.append(f"{out_dir}: no train shard: the val shard (up to {val_size:,} tokens) took all {tokens:,} "
                        f"tokens, and train_gpt2.py trains on train shards; run again into an empty --output_dir "
                        f"with {what}{other}")
    if val < TRAIN_VAL_TOKENS + 1:  # + 1: the last target
        fit = (val - 1) // TRAIN_MICRO_BATCH * TRAIN_MICRO_BATCH
        example = f" (e.g. --val_tokens={fit} with the default batch_size*block_size, {TRAIN_MICRO_BATCH:,})"
        warnings.append(f"{out_dir}: the val shard holds {val:,} tokens, too few for train_gpt2.py's default "
                        f"--val_tokens={TRAIN_VAL_TOKENS}; pass train_gpt2.py --val_tokens=N, N a multiple of "
                        f"batch_size*block_size below {val:,}{example if fit else ''}")
    return warnings


def prepare(args):
    """The whole job for parsed arguments: check, continue or start, write."""
    if args.input:
        args.input = expand_inputs(args.input)
        check_input_files(args.input)
    identity = run_identity(args.dataset, args.name, args.streaming, args.input, args.shard_size, args.val_size)
    done, complete = completed_shards(args.output_dir, identity)
    if complete:
        print(f"{args.output_dir}: all {len(done)} shards of this run are already complete, nothing to do")
        warn(layout_warnings(args.output_dir, done, args.val_size, args.shard_size))
        return
    doc, offset = done[-1]["end"] if done else (0, 0)
    # everything that can be checked is checked before the first write
    if args.input:
        num_docs = count_local_documents(args.input, progress=True)
        texts = itertools.islice(iter_local_texts(args.input), doc, None)
    else:
        ds = load_hub(args.dataset, args.name, args.streaming)
        num_docs = None if args.streaming else len(ds)
        texts = iter_hub_texts(ds, doc, hub_label(args.dataset, args.name))
    if done:
        print(f"{args.output_dir}: continuing after {len(done)} complete shards (document {doc:,}, token {offset:,})")
    val = "" if args.val_size == args.shard_size else f" ({args.val_size:,} in the val shard)"
    print(f"tokenizing into {args.output_dir}: {args.shard_size:,} tokens per shard{val}, num_proc={args.num_proc}")
    t0 = time.time()
    manifest = write_shards(texts, args.output_dir, identity, done, args.num_proc, num_docs)
    dt = max(time.time() - t0, 1e-9)
    new_tokens = manifest["tokens"] - sum(s["tokens"] for s in done)
    print(f"{args.output_dir}: {len(manifest['shards'])} shards, {manifest['tokens']:,} tokens from "
          f"{manifest['documents']:,} documents ({new_tokens:,} tokens in {dt:.1f} s, {new_tokens / dt:,.0f} tokens/s)")
    warn(layout_warnings(args.output_dir, manifest["shards"], args.val_size, args.shard_size))


def warn(lines):
    for line in lines:
        print(f"{SCRIPT}: warning: {line}", file=sys.stderr)


def tokenize(cfg):
    try:
        prepare(cfg)
    except KeyboardInterrupt:
        print(f"\n{SCRIPT}: interrupted; run the same command again to continue", file=sys.stderr)
        return 130


def main(argv=None):
    return run(SCRIPT, __doc__, FinewebConfig, argv, tokenize, errors=(DataError, OSError), read=parse_args)


if __name__ == "__main__":
    sys.exit(main())
