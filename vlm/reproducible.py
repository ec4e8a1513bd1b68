"""Bit-for-bit reproducible training on the CPU.

PyTorch's CPU kernels are deterministic except where several threads add
into the same memory: ``index_put_(accumulate=True)`` on float tensors (the
backward of an advanced-indexing gather such as constraint routing's
``key[partner]``, where two rows may read the same partner) uses atomic adds
across threads when more than one thread runs, so the order of the additions,
and the last bits of the gradient, change from run to run. Over a thousand
training steps those bits grow into a different model. Deterministic mode
makes such kernels take their sorted, single-order path; on this model it
costs little (see docs/world.md, "Reproducibility").
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def deterministic() -> Iterator[None]:
    """Run the body with ``torch.use_deterministic_algorithms(True)``; the previous mode comes back after.

    ``warn_only``: an operation without a deterministic implementation (some CUDA kernels) warns
    instead of failing, so training on a GPU still runs.
    """
    before, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn)
