"""Module hooks that act only in the thread that installed them.

EditLens changes a model's behaviour only through forward hooks (patches,
knockouts, attached edit sets, VisEdit adapters), never through its weights.
A hook registered on a shared module would also act on every other thread's
forward pass; the server runs generation, edit jobs and diagnostics on one
model at the same time, so every hook is wrapped by ``thread_scoped``: in any
other thread it returns ``None``, which PyTorch reads as "leave the input /
output unchanged". One thread's edit set or intervention is therefore
invisible to the others, and the base model is never copied.
"""

from __future__ import annotations

import functools
import threading
from typing import Callable


def thread_scoped(hook: Callable) -> Callable:
    """``hook`` acting only in the calling thread; a no-op (returns None) elsewhere."""
    owner = threading.get_ident()

    @functools.wraps(hook)
    def scoped(*args, **kwargs):
        if threading.get_ident() != owner:
            return None
        return hook(*args, **kwargs)

    return scoped
