"""tokenizer.py and the export's tokenizer: transformers loads GPT-2's tokenizer from an export.py directory
and it gives tiktoken's ids, decodes back, and serves pipeline("text-generation"). Nothing from the network."""

import json
import os
import shutil

import pytest
import torch

from model import GPT, GPTConfig, GPT2_VOCAB_SIZE
from export import save_hf_tokenizer, save_pretrained
from tokenizer import ENDOFTEXT, get_encoding

TINY = dict(block_size=64, n_layer=2, n_head=2, n_embd=32, vocab_size=50304)

HARD_TEXTS = [
    "Hello, world",
    "Ünïcödé àccents, Straße, naïve café; 日本語のテキスト, 中文, 한국어, "
    "Ελληνικά, русский, עברית, العربية",
    "emoji 👋🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ and symbols ∑ ∞ ≠ ½ ² ٣ €",
    "runs of spaces:     five, and tabs:\t\t\ttwo more\t \t mixed",
    "\n\n\nthree newlines first, then \r\n windows \r\n\r\n line ends \n \n",
    "  leading and trailing spaces  ",
    " ",
    "numbers 0 12 345 6789 1234567890 3.14159 -42 1,000,000 2024-05-09",
    "don't won't I'm you're we've they'll she'd it's DON'T I'M 'quoted' rock'n'roll",
    "first document<|endoftext|>second document <|endoftext|> third<|endoftext|><|endoftext|>",
    "wait . what ? no ! he said : it 's fine , isn 't it ; they 're here",  # decode must not "clean up" spaces
    "code: def f(x):\n    return {'a': [1, 2]}  # comment\n\tif x != y: pass",
    "",
]


def english_text():
    """A few KB of real English prose from a file every Debian + Python image has (the first that exists)."""
    stdlib = os.path.dirname(os.__file__)
    for path in (os.path.join(stdlib, "LICENSE.txt"), "/usr/share/common-licenses/GPL-3",
                 "/usr/share/common-licenses/Apache-2.0"):
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return f.read(16384)
    pytest.skip("no English text file found (Python's LICENSE.txt, /usr/share/common-licenses)")


@pytest.fixture(scope="module")
def tiny_gpt():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY)).eval()
    # widen the small init so greedy picks are clear winners, not near ties between two implementations
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module")
def export_dir(tiny_gpt, tmp_path_factory):
    path = tmp_path_factory.mktemp("export")
    save_pretrained(tiny_gpt, path)
    return str(path)


@pytest.fixture(scope="module")
def hf_tok(export_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(export_dir)


def test_export_writes_tokenizer_files(export_dir):
    names = set(os.listdir(export_dir))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.json",
            "merges.txt"} <= names
    assert not any(n.startswith(".tmp") for n in names)
    with open(os.path.join(export_dir, "tokenizer_config.json")) as f:
        config = json.load(f)
    assert config["eos_token"] == config["bos_token"] == ENDOFTEXT
    assert config["model_max_length"] == TINY["block_size"]
    assert config["clean_up_tokenization_spaces"] is False


def test_vocab_and_merges_are_openais_files(export_dir):
    """vocab.json and merges.txt derived from tiktoken's ranks equal OpenAI's encoder.json and vocab.bpe, which
    tiktoken itself loaded (so they are in its local cache: no download)."""
    from tiktoken.load import read_file_cached

    base = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
    with open(os.path.join(export_dir, "merges.txt"), "rb") as f:
        assert f.read() == read_file_cached(base + "vocab.bpe")
    with open(os.path.join(export_dir, "vocab.json")) as f:
        assert json.load(f) == json.loads(read_file_cached(base + "encoder.json"))


def test_autotokenizer_equals_tiktoken(hf_tok, enc):
    assert hf_tok.vocab_size == len(hf_tok) == GPT2_VOCAB_SIZE == enc.n_vocab
    assert hf_tok.eos_token_id == hf_tok.bos_token_id == enc.eot_token == 50256
    assert hf_tok.model_max_length == TINY["block_size"]
    for text in HARD_TEXTS + [english_text()]:
        ids = enc.encode(text, allowed_special="all")
        assert hf_tok.encode(text, verbose=False) == ids, text
        assert hf_tok(text, verbose=False)["input_ids"] == ids, text
        assert hf_tok.decode(ids) == text
    assert hf_tok.encode("a<|endoftext|>b") == [64, 50256, 65]


def test_gpt2_tokenizer_class_and_the_two_gpt2_files_alone(export_dir, enc, tmp_path):
    """GPT2Tokenizer loads the export, and vocab.json + merges.txt alone (what older tools read) give the same ids."""
    from transformers import GPT2Tokenizer

    for name in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(export_dir, name), tmp_path / name)
    for tok in (GPT2Tokenizer.from_pretrained(export_dir), GPT2Tokenizer.from_pretrained(str(tmp_path))):
        assert tok.eos_token_id == 50256
        for text in HARD_TEXTS + [english_text()]:
            assert tok.encode(text, verbose=False) == enc.encode(text, allowed_special="all"), text


def test_save_hf_tokenizer_alone(tmp_path, enc):
    from transformers import AutoTokenizer

    (tmp_path / "tokenizer.json").write_text("stale")  # replaced, not appended to
    names = save_hf_tokenizer(str(tmp_path), model_max_length=1024)
    assert set(names) == set(os.listdir(tmp_path)) == {"tokenizer.json", "tokenizer_config.json", "vocab.json",
                                                       "merges.txt"}
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert tok.model_max_length == 1024
    assert tok.encode(HARD_TEXTS[1]) == enc.encode(HARD_TEXTS[1])
    assert get_encoding() is get_encoding()


def test_pipeline_generates_our_greedy_tokens(export_dir, tiny_gpt, enc):
    from transformers import pipeline

    prompt = "Hello, I'm a language model,"
    pipe = pipeline("text-generation", export_dir, device="cpu")
    text = pipe(prompt, max_new_tokens=12, do_sample=False)[0]["generated_text"]
    assert text.startswith(prompt) and len(text) > len(prompt)
    got = pipe(prompt, max_new_tokens=12, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    ids = enc.encode(prompt)
    with torch.no_grad():
        ours = tiny_gpt.generate(torch.tensor([ids]), 12, temperature=0)[0].tolist()
    assert list(got) == ours and len(ours) == len(ids) + 12
