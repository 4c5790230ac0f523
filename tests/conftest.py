import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))  # the tests' own helpers (coord.py)

if not torch.cuda.is_available():  # Triton kernels run on the CPU, interpreted (read at triton's import)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from mupkit.integrations.hf import hide_unloadable_torchvision  # noqa: E402

with warnings.catch_warnings():  # the `mup` test extra pulls PyPI's torchvision, which a CPU torch cannot load
    warnings.simplefilter("ignore")
    hide_unloadable_torchvision()
