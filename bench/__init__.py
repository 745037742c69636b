"""The benchmarks, run from the repository root as modules:

    python -m bench.train_step         # train_gpt2.py's speed on random tokens: ms/step, tokens/s, MFU, memory
    python -m bench.tokenize_speed     # fineweb.py's tokenization against build-nanogpt's
    python -m bench.hellaswag_speed    # hellaswag.evaluate, batched, against one example at a time
    python -m bench.generate_speed     # GPT.generate with the KV cache against without it
"""
