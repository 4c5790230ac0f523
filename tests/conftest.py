import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))  # the tests' own helpers (coord.py)

if not torch.cuda.is_available():  # Triton kernels run on the CPU, interpreted (read at triton's import)
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _hide_unloadable_torchvision() -> None:
    """Make a torchvision that cannot load look absent to transformers.

    The `mup` test dependency declares torchvision, so pip installs PyPI's wheel, whose C++ ops do
    not match a CPU-only torch build ("operator torchvision::nms does not exist"). transformers
    imports torchvision whenever it finds it, so every HF test would fail on an import that mupkit
    never needs. An entry of None in `sys.modules` makes `importlib.util.find_spec` report the
    package as absent; a torchvision that imports cleanly is left alone.
    """
    try:
        import torchvision  # noqa: F401
    except Exception:
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        sys.modules["torchvision"] = None


_hide_unloadable_torchvision()
