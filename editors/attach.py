"""How edits are attached to a live model: forward hooks that add each edit's contribution to a module's output.

Attaching never touches the base weights, so removing the hooks gives back the base model's outputs bit for
bit, and switching between versions needs no copy or reload of the model. The hooks are thread-scoped (and,
with ``rows``, row-scoped in a batch: ``vlm.hooks``), so one model serves several versions at once.

* ``Delta``: anything with a ``module`` path and a ``contribution(x)`` (MultEdit's low-rank deltas, FT-L's
  dense ones, KeyGate's gates);
* ``adding_hook``: the forward hook that adds the contributions of one module's deltas;
* ``Attachment``: the base of every attachment (``remove()``, a context manager);
* ``AttachedDeltas``: hooks adding a list of deltas; ``attach(vlm, *edits)``: any number of edit sets (of any
  editor) and delta lists at once, removed together.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import torch

from vlm.hooks import Hooks, Rows
from vlm.loading import VLM

if TYPE_CHECKING:
    from .base import EditSetBase


class Delta(Protocol):
    """Anything that adds a contribution to a linear module's output."""

    module: str

    def contribution(self, x: torch.Tensor) -> torch.Tensor: ...


class Attachment:
    """Hooks on a model that ``remove()`` takes off again (restoring the base model exactly); a context
    manager. Subclasses install their hooks into ``self._hooks`` inside ``self._hooks.installing()``."""

    def __init__(self) -> None:
        self._hooks = Hooks()

    def remove(self) -> None:
        self._hooks.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class AttachedDeltas(Attachment):
    """Forward hooks that add the deltas' contributions (to ``rows`` of the batch only, when given);
    ``remove()`` restores the base model exactly."""

    def __init__(self, vlm: VLM, deltas: Sequence[Delta], rows: Rows | None = None):
        super().__init__()
        by_module: dict[str, list[Delta]] = {}
        for d in deltas:
            by_module.setdefault(d.module, []).append(d)
        with self._hooks.installing():
            for path, ds in by_module.items():
                self._hooks.add(vlm.module(path), adding_hook(tuple(ds), rows))


def adding_hook(deltas: tuple[Delta, ...], rows: Rows | None = None):
    """A forward hook adding the deltas' contributions to the module's output: every row's, or those of
    ``rows`` (the other rows of the batch keep the base output; each row's sum is the one it would get
    alone)."""

    def added(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        add = deltas[0].contribution(x)
        for d in deltas[1:]:
            add = add + d.contribution(x)
        return (out.float() + add).to(out.dtype)

    def hook(_mod, args, out):
        if rows is None:
            return added(args[0], out)
        if not len(rows):
            return None
        index = rows.index.to(out.device)
        new = out.clone()
        new[index] = added(args[0][index], out[index])
        return new

    return hook


class Attached(Attachment):
    """Several attachments removed together (the result of ``attach``)."""

    def __init__(self, stack: contextlib.ExitStack):
        super().__init__()
        self._stack = stack

    def remove(self) -> None:
        self._stack.close()


def attach(vlm: VLM, *edits: EditSetBase | Sequence[Delta] | None, rows: Rows | None = None) -> Attached:
    """Attach edit sets (of any editor) and/or lists of deltas to ``vlm`` for the calling thread (and, with
    ``rows``, for those rows of a batch only); ``None`` is skipped. Usable as a context manager; if attaching
    one of them fails, none stays attached."""
    stack = contextlib.ExitStack()
    try:
        for e in edits:
            if e is None:
                continue
            if isinstance(e, (list, tuple)):
                stack.enter_context(AttachedDeltas(vlm, e, rows))
            else:
                stack.enter_context(e.attach(vlm, rows) if rows is not None else e.attach(vlm))
    except BaseException:
        stack.close()
        raise
    return Attached(stack)
