"""Shared fixtures: a tiny random transformers GPT-2 on disk and the real GPT-2 tokenizer. Nothing from the network."""

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the scripts live at the top level, not in a package


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread (subprocesses get OMP_NUM_THREADS=1): the tests' tiny matmuls gain nothing from more, and
    on 2 shared cores thread contention makes them several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    """A random GPT2LMHeadModel with GPT-2's vocabulary (so real tiktoken ids work), saved with save_pretrained."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    # transformers' init is close to 0: widen the weights so the logits differ clearly from token to token
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path_factory.mktemp("tiny_gpt2")
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def enc():
    import tiktoken

    return tiktoken.get_encoding("gpt2")
