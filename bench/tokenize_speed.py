"""
Tokenization throughput: fineweb.py's way (batches of documents encoded in one worker process per core) against
build-nanogpt's way (multiprocessing.Pool(os.cpu_count() // 2).imap over single documents, chunksize=16), on the same
generated English-like text, in one run. Both include starting their pool, as a real run does; both outputs are
checked to be identical. Wall-clock tokens/s is what counts; CPU seconds (this process and its workers) per million
tokens is printed too, as it is less disturbed by other work on the machine.

    python -m bench.tokenize_speed                     # 100 MB of text (~21M tokens), 3 alternating rounds
    python -m bench.tokenize_speed --mb 20 --rounds 1 --num_proc 4
"""

import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass

import numpy as np
import tiktoken

import fineweb
from options import at_least, option, run

SCRIPT = "bench.tokenize_speed"


def english_words(enc):
    """GPT-2 tokens that are a space and a lowercase ASCII word of 2+ letters, in id order (roughly frequency order:
    BPE merges frequent pieces first): a fixed vocabulary of real English words and word pieces."""
    words = []
    for i in range(enc.n_vocab - 1):
        b = enc.decode_single_token_bytes(i)
        if len(b) >= 3 and b[:1] == b" " and b[1:].isalpha() and b[1:].islower() and b[1:].isascii():
            words.append(b[1:].decode())
    return words


def generate_documents(n_bytes, seed, enc, words_per_doc=650):
    """English-like documents of a few KB (seeded, every one different, as in a real corpus): Zipf-distributed words,
    some numbers, some words glued into longer rarer ones, sentences that start capitalized, commas, paragraphs."""
    vocab = english_words(enc) + [str(n) for n in range(2000)]
    rng = np.random.default_rng(seed)
    p = 1.0 / (np.arange(len(vocab)) + 20.0)
    p[-2000:] = p[:-2000].sum() * 0.01 / 2000  # 1% numbers
    p /= p.sum()
    plain = np.array(vocab, dtype=object)
    capital = np.array([w.capitalize() for w in vocab], dtype=object)
    # what follows each word: a space, nothing (glued to the next word), a comma, a sentence end, a paragraph end
    seps = np.array([" ", "", ", ", ". ", ".\n\n"], dtype=object)
    sep_p = [0.79, 0.07, 0.06, 0.065, 0.015]
    docs, total = [], 0
    while total < n_bytes:
        lengths = np.maximum(20, rng.normal(words_per_doc, words_per_doc / 4, size=1000).astype(int))
        n = int(lengths.sum())
        sep = rng.choice(len(seps), size=n, p=sep_p)
        starts = np.roll(sep >= 3, 1)  # a word after a sentence end is capitalized
        idx = rng.choice(len(vocab), size=n, p=p)
        out = np.empty(2 * n, dtype=object)
        out[0::2] = np.where(starts, capital[idx], plain[idx])
        out[1::2] = seps[sep]
        bounds = np.concatenate([[0], np.cumsum(lengths)]) * 2
        for a, b in zip(bounds[:-1], bounds[1:]):
            doc = "".join(out[a:b].tolist()).rstrip() + "."
            docs.append(doc)
            total += len(doc)  # ASCII: characters are bytes
            if total >= n_bytes:
                break
    return docs


def nanogpt_tokenize(text):
    """build-nanogpt's per-document tokenize(): [eot] + encode_ordinary(text) as a uint16 array."""
    enc = tiktoken.get_encoding("gpt2")
    tokens = [enc.eot_token]
    tokens.extend(enc.encode_ordinary(text))
    return np.array(tokens, dtype=np.uint16)


def run_nanogpt(docs):
    with mp.Pool(max(1, os.cpu_count() // 2)) as pool:
        return np.concatenate(list(pool.imap(nanogpt_tokenize, docs, chunksize=16)))


def run_fineweb(docs, num_proc):
    return np.concatenate([tokens for tokens, _ in fineweb.tokenize_texts(docs, num_proc)])


def cpu_seconds():
    """User + system CPU time of this process and its reaped children (pool workers are reaped when a pool closes)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@dataclass
class TokenizeBenchConfig:
    mb: float = option(100.0, "megabytes of generated text", type=at_least(0.001, float))
    rounds: int = option(3, "alternating timed rounds of each way", type=at_least(1))
    num_proc: int = option(fineweb.default_num_proc(), "fineweb.py's --num_proc", type=at_least(1))
    seed: int = option(0, "the generated text's seed")


def bench_tokenize(args):
    enc = tiktoken.get_encoding(fineweb.ENCODING)
    t0 = time.time()
    docs = generate_documents(int(args.mb * 1e6), args.seed, enc)
    n_bytes = sum(len(d.encode()) for d in docs)
    print(f"generated {len(docs):,} documents, {n_bytes / 1e6:.1f} MB in {time.time() - t0:.1f} s "
          f"(cores: {fineweb.default_num_proc()}, fineweb --num_proc {args.num_proc}, "
          f"build-nanogpt Pool({max(1, os.cpu_count() // 2)}))")
    ways = {"fineweb.py": lambda: run_fineweb(docs, args.num_proc), "build-nanogpt": lambda: run_nanogpt(docs)}
    rates = {name: [] for name in ways}
    cpu = {name: [] for name in ways}
    outputs = {}
    for r in range(args.rounds):
        for name, way in ways.items():
            t0, c0 = time.perf_counter(), cpu_seconds()
            outputs[name] = way()
            dt, dc = time.perf_counter() - t0, cpu_seconds() - c0
            rates[name].append(len(outputs[name]) / dt)
            cpu[name].append(dc / len(outputs[name]) * 1e6)
            print(f"round {r}: {name:14s} {len(outputs[name]):,} tokens in {dt:.2f} s = {rates[name][-1]:,.0f} tokens/s"
                  f" ({cpu[name][-1]:.2f} CPU s per M tokens)")
    assert np.array_equal(outputs["fineweb.py"], outputs["build-nanogpt"]), "the two ways disagree"
    n_tokens = len(outputs["fineweb.py"])
    med = {name: statistics.median(r) for name, r in rates.items()}
    print(f"{n_tokens:,} tokens ({n_bytes / n_tokens:.2f} bytes/token), identical from both ways")
    for name, m in med.items():
        print(f"median {name:14s} {m:,.0f} tokens/s ({statistics.median(cpu[name]):.2f} CPU s per M tokens)")
    print(f"ratio fineweb.py / build-nanogpt: {med['fineweb.py'] / med['build-nanogpt']:.2f}x")
    return 0


def main(argv=None):
    return run(SCRIPT, __doc__, TokenizeBenchConfig, argv, bench_tokenize)


if __name__ == "__main__":
    sys.exit(main())
