"""train_gpt2.py with slow evals, for the test of a signal that arrives during one: every eval chunk (the reads
made with gradients off) sleeps SLOW_EVAL_SECONDS, and the first one touches the file SLOW_EVAL_MARK."""

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt2  # noqa: E402

make_batch = train_gpt2.make_batch


def slow_make_batch(*args, **kwargs):
    if not torch.is_grad_enabled():  # an eval's batch; the train loader reads with gradients on
        open(os.environ["SLOW_EVAL_MARK"], "a").close()
        time.sleep(float(os.environ["SLOW_EVAL_SECONDS"]))
    return make_batch(*args, **kwargs)


train_gpt2.make_batch = slow_make_batch
if __name__ == "__main__":
    sys.exit(train_gpt2.main())
