"""A registry version ("bundle") turned into something attachable to the loaded model.

A version's folder holds zero or one MultEdit edit set (``multedit.safetensors``),
zero or one VisEdit edit set (``visedit.safetensors``), ``manifest.json`` and
optional PNG figures. ``load_bundle`` is the one place that reads those files:
it checks the base-model fingerprint, validates every edit set (shapes,
dtypes, finite values, fingerprint; safetensors only, no pickle) and returns
a ``Bundle`` whose ``attached(vlm)`` applies all of its edits for the calling
thread only (``vlm.hooks``), so one loaded model serves every version at once
and switching versions never copies or reloads it. A new editor is one more
entry in ``EDIT_SET_FILES`` and one more branch in ``load_bundle``.

``BundleCache`` keeps the most recently used bundles (versions are immutable,
so a cached bundle never goes stale; a deleted version is dropped).
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from editors.edit_set import EditSet, EditSetError, FingerprintMismatchError, attach
from editors.visedit import VisEditSet
from vlm.loading import VLM

EDIT_SET_FILES = {"multedit": "multedit.safetensors", "visedit": "visedit.safetensors"}


class BundleError(Exception):
    """A version exists but cannot be used (files missing, corrupt or failing validation)."""


@dataclass
class Bundle:
    adapter: str
    version: int
    manifest: dict[str, Any]
    edit_sets: dict[str, Any] = field(default_factory=dict)    # editor name -> its edit set
    folder: Path | None = None

    @property
    def multedit(self) -> EditSet | None:
        return self.edit_sets.get("multedit")

    @property
    def visedit(self):
        return self.edit_sets.get("visedit")

    @property
    def num_edits(self) -> int:
        return sum(getattr(e, "num_edits", 0) for e in self.edit_sets.values())

    @contextlib.contextmanager
    def attached(self, vlm: VLM) -> Iterator["Bundle"]:
        """All of this version's edits applied to ``vlm`` in the calling thread only."""
        with attach(vlm, *self.edit_sets.values()):
            yield self

    def only(self, *editors: str) -> "Bundle":
        """The same version restricted to some of its edit sets (e.g. to compute a new edit of one
        editor on the model as the others leave it)."""
        return Bundle(self.adapter, self.version, self.manifest,
                      {k: v for k, v in self.edit_sets.items() if k in editors}, self.folder)


def attached(vlm: VLM, bundle: Bundle | None):
    """``bundle.attached(vlm)``, or nothing for the base model."""
    return bundle.attached(vlm) if bundle is not None else contextlib.nullcontext()


def load_bundle(vlm: VLM, adapter: str, version: int, folder: Path, manifest: dict | None = None,
                base_fingerprint: str | None = None) -> Bundle:
    """Validate and load the edit sets in ``folder`` (a downloaded version) for ``vlm``."""
    label = f"adapter '{adapter}' version {version}"
    fp = base_fingerprint or (manifest or {}).get("base_fingerprint")
    if fp and fp != vlm.fingerprint:
        raise FingerprintMismatchError(
            f"{label} was made for the base model with fingerprint {fp}, but this server runs "
            f"{vlm.fingerprint} ({vlm.path}); it cannot be applied")
    edit_sets: dict[str, Any] = {}
    for editor, name in EDIT_SET_FILES.items():
        path = folder / name
        if not path.is_file():
            continue
        try:
            if editor == "multedit":
                edit_sets[editor] = EditSet.load(path, vlm)
            else:
                edit_sets[editor] = VisEditSet.load(path, vlm)
        except FingerprintMismatchError as exc:
            raise FingerprintMismatchError(f"{label}: {exc}") from None
        except EditSetError as exc:
            raise BundleError(f"{label}: {name} failed validation: {exc}") from None
    if not edit_sets:
        raise BundleError(f"{label} holds no edit set ({' or '.join(EDIT_SET_FILES.values())})")
    return Bundle(adapter, version, dict(manifest or {}), edit_sets, folder)


class BundleCache:
    """LRU of loaded bundles by (adapter, version); a key loads once even under concurrent requests."""

    def __init__(self, size: int = 8):
        self.size = size
        self._items: OrderedDict[tuple[str, int], Bundle] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[tuple[str, int], threading.Lock] = {}
        self.loads = 0

    def get(self, adapter: str, version: int, load: Callable[[], Bundle]) -> Bundle:
        key = (adapter, version)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            key_lock = self._loading.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                if key in self._items:
                    self._items.move_to_end(key)
                    return self._items[key]
            bundle = load()
            self.put(bundle)
            self.loads += 1
            return bundle

    def peek(self, adapter: str, version: int) -> Bundle | None:
        with self._lock:
            return self._items.get((adapter, version))

    def put(self, bundle: Bundle) -> None:
        with self._lock:
            self._items[(bundle.adapter, bundle.version)] = bundle
            self._items.move_to_end((bundle.adapter, bundle.version))
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def drop(self, adapter: str, version: int | None = None) -> None:
        with self._lock:
            for key in [k for k in self._items if k[0] == adapter and (version is None or k[1] == version)]:
                del self._items[key]
