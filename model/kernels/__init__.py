"""Triton kernels for the batch decoder's step on CUDA (model/batch_forward.py).

Each kernel is batch-invariant by construction: a row's result is computed by the same program
with the same reduction order whatever the other rows hold and however many there are. Their
arithmetic is tested on the CPU with TRITON_INTERPRET=1 (float32).

Triton ships with CUDA builds of torch; nothing here is imported unless it is available.
"""

from __future__ import annotations

import importlib.util


def triton_available() -> bool:
    """Whether `import triton` can work (it is not imported here)."""
    return importlib.util.find_spec("triton") is not None
