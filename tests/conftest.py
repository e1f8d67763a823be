"""Shared test set-up. Tests run in parallel workers (pytest -n 2): keep torch to one thread each."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # the runtime's tests must pass without torch
    pass
