"""The one way EditLens puts hooks on a model: thread-scoped, and always removed.

EditLens changes a model's behaviour only through forward hooks (patches,
knockouts, attached edit sets, VisEdit adapters), never through its weights.

* **Thread-scoped.** A hook registered on a shared module would also act on
  every other thread's forward pass; the server runs generation, edit jobs and
  diagnostics on one model at the same time, so every hook is wrapped by
  ``thread_scoped``: in any other thread it returns ``None``, which PyTorch
  reads as "leave the input / output unchanged". One thread's edit set or
  intervention is therefore invisible to the others, and the base model is
  never copied.
* **Never leaked.** The server reuses its threads, so a hook left behind by a
  request that failed half-way through installing its hooks would act on
  every later request of that thread. ``Hooks`` pushes each registration onto
  an ``ExitStack`` the moment it exists (ROME's ``nethook.TraceDict``,
  TransformerLens' ``hooks()``): leaving a ``with Hooks()`` block, or a
  ``with hooks.installing()`` block that raises, removes every hook registered
  so far, whatever failed.
* **Row-scoped, when asked.** Batched serving runs one forward pass over rows
  of different versions; an attachment given ``Rows`` changes only those rows
  of the batch (the others pass through untouched), so each version's edits
  act on its own requests. ``Rows`` is mutable: a batch that drops finished
  rows re-indexes it, and the hooks read the current index on every call.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator

import torch
import torch.nn as nn


class Rows:
    """The rows of a batch an attachment acts on (``index``: their positions, ascending).

    Hooks read ``index`` when they run, so the owner of the batch may change it between forward passes
    (rows that finished leave the batch). An attachment given ``rows=None`` acts on every row."""

    def __init__(self, index) -> None:
        self.index = torch.as_tensor(index, dtype=torch.long).reshape(-1)

    def __len__(self) -> int:
        return int(self.index.numel())

    def mask(self, batch: int, device=None) -> torch.Tensor:
        """A (batch,) boolean mask of these rows."""
        out = torch.zeros(batch, dtype=torch.bool, device=device)
        out[self.index.to(out.device)] = True
        return out

    def __repr__(self) -> str:
        return f"Rows({self.index.tolist()})"


def thread_scoped(hook: Callable) -> Callable:
    """``hook`` acting only in the calling thread; a no-op (returns None) elsewhere."""
    owner = threading.get_ident()

    @functools.wraps(hook)
    def scoped(*args, **kwargs):
        if threading.get_ident() != owner:
            return None
        return hook(*args, **kwargs)

    scoped.editlens_hook = True  # what ``hook_count`` counts
    return scoped


class Hooks:
    """Thread-scoped forward hooks that are removed together.

    ``with Hooks() as hooks: hooks.add(...); ...`` removes them when the block
    ends. An object that keeps hooks beyond one block (an attached edit set)
    registers them inside ``with hooks.installing():``, which removes what was
    registered if the registration fails, and calls ``remove()`` later.
    """

    def __init__(self) -> None:
        self._stack = contextlib.ExitStack()
        self.count = 0

    def add(self, module: nn.Module, hook: Callable, *, pre: bool = False, with_kwargs: bool = False) -> None:
        """Register ``hook`` on ``module`` (a forward hook, or a pre-hook with ``pre``) for this thread only."""
        fn = thread_scoped(hook)
        if pre:
            handle = module.register_forward_pre_hook(fn, with_kwargs=with_kwargs)
        else:
            handle = module.register_forward_hook(fn, with_kwargs=with_kwargs)
        self._stack.callback(handle.remove)
        self.count += 1

    @contextlib.contextmanager
    def installing(self) -> Iterator[Hooks]:
        """Register hooks in the block; if it raises, every hook of this set is removed first."""
        try:
            yield self
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        """Remove every hook of this set (idempotent)."""
        self._stack.close()
        self.count = 0

    def __enter__(self) -> Hooks:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def hook_count(model: nn.Module) -> int:
    """How many EditLens hooks (forward hooks and pre-hooks made by ``thread_scoped``) the modules of ``model``
    carry: 0 when nothing is attached. Hooks the model library installs itself are not counted."""
    return sum(
        getattr(h, "editlens_hook", False)
        for m in model.modules()
        for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())
    )
