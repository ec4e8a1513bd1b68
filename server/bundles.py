"""A registry version ("bundle"): written by ``publish``, read by ``load_bundle``.

A version's folder holds, for each editor whose edits it carries, that
editor's edit set as ``<editor>.safetensors`` (``editors.EditorSpec.file_name``:
``multedit.safetensors``, ``visedit.safetensors``, ``ft.safetensors``, ...),
``manifest.json`` and optional PNG figures. These two functions are the only
places that know the layout:

* ``publish`` saves the edit sets, builds the manifest (format, base model,
  editors, parent, every edit's record, extra sections such as a training
  summary) and registers the version (all or nothing, ``registry``);
* ``load_bundle`` checks the base-model fingerprint, validates every edit set
  through its editor's class (shapes, dtypes, finite values, fingerprint;
  safetensors only, no pickle) and returns a ``Bundle`` whose
  ``attached(vlm)`` applies all of its edits for the calling thread only
  (``vlm.hooks``), so one loaded model serves every version at once and
  switching versions never copies or reloads it.

``BundleCache`` keeps the most recently used bundles (versions are immutable,
so a cached bundle never goes stale; a deleted version is dropped).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from editors import editor_names, get_editor
from editors.attach import attach
from editors.base import EditSetBase
from editors.files import EditSetError, FingerprintMismatchError
from vlm.hooks import Rows
from vlm.loading import VLM

from .convert import json_safe

BUNDLE_FORMAT = "editlens.bundle"
BUNDLE_FORMAT_VERSION = 1


class BundleError(Exception):
    """A version exists but cannot be used (files missing, corrupt or failing validation)."""


@dataclass
class Bundle:
    adapter: str
    version: int
    manifest: dict[str, Any]
    edit_sets: dict[str, EditSetBase] = field(default_factory=dict)  # editor name -> its edit set

    @property
    def num_edits(self) -> int:
        return sum(e.num_edits for e in self.edit_sets.values())

    @contextlib.contextmanager
    def attached(self, vlm: VLM, rows: Rows | None = None) -> Iterator[Bundle]:
        """All of this version's edits applied to ``vlm`` in the calling thread only (and, with ``rows``, to
        those rows of a batch only: batched serving)."""
        with attach(vlm, *self.edit_sets.values(), rows=rows):
            yield self

    def without(self, editor: str) -> Bundle:
        """The same version without one editor's edit set (a new edit of that editor is computed on the model
        as the others leave it)."""
        sets = {k: v for k, v in self.edit_sets.items() if k != editor}
        return Bundle(self.adapter, self.version, self.manifest, sets)


def attached(vlm: VLM, bundle: Bundle | None):
    """``bundle.attached(vlm)``, or nothing for the base model."""
    return bundle.attached(vlm) if bundle is not None else contextlib.nullcontext()


def check_fingerprint(vlm: VLM, label: str, fingerprint: str | None) -> None:
    if fingerprint and fingerprint != vlm.fingerprint:
        raise FingerprintMismatchError(
            f"{label} was made for the base model with fingerprint {fingerprint}, but this server runs "
            f"{vlm.fingerprint} ({vlm.path}); it cannot be applied"
        )


def load_bundle(
    vlm: VLM,
    adapter: str,
    version: int,
    folder: Path,
    manifest: dict | None = None,
    base_fingerprint: str | None = None,
) -> Bundle:
    """Validate and load the edit sets in ``folder`` (a downloaded version) for ``vlm``."""
    label = f"adapter '{adapter}' version {version}"
    check_fingerprint(vlm, label, base_fingerprint or (manifest or {}).get("base_fingerprint"))
    edit_sets: dict[str, EditSetBase] = {}
    for name in editor_names():
        spec = get_editor(name)
        path = folder / spec.file_name
        if not path.is_file():
            continue
        try:
            edit_sets[name] = spec.load(path, vlm)
        except FingerprintMismatchError as exc:
            raise FingerprintMismatchError(f"{label}: {exc}") from None
        except EditSetError as exc:
            raise BundleError(f"{label}: {spec.file_name} failed validation: {exc}") from None
    if not edit_sets:
        files = " or ".join(get_editor(n).file_name for n in editor_names())
        raise BundleError(f"{label} holds no edit set ({files})")
    return Bundle(adapter, version, dict(manifest or {}), edit_sets)


def publish(
    registry,
    vlm: VLM,
    adapter: str,
    edit_sets: Mapping[str, EditSetBase],
    *,
    edits: list[dict[str, Any]],
    parent: int | None = None,
    description: str = "",
    figures: Mapping[str, Path] | None = None,
    extra: Mapping[str, Any] | None = None,
    promote: bool = True,
    before_register: Callable[[], None] | None = None,
    parent_must_be_live: bool = False,
):
    """Register a new version of ``adapter`` holding ``edit_sets`` (editor name -> edit set); returns its
    ``VersionInfo``.

    ``edits``: every edit of the version, oldest first, as the manifest records them; ``parent``: the
    version it was made on top of; ``figures``: PNG files by name; ``extra``: further manifest sections
    (e.g. ``training``). ``before_register`` runs once everything is written, right before the registry
    is touched (the last point at which a cancelled job leaves no trace). ``parent_must_be_live``: promote
    only if ``parent`` is still live (``Registry.create_version``; else ``StaleParentError``). All or nothing.
    """
    if not edit_sets:
        raise ValueError("a version holds at least one edit set")
    names = [n for n in editor_names() if n in edit_sets]
    unknown = sorted(set(edit_sets) - set(names))
    if unknown:
        raise ValueError(f"no registered editor is called {unknown}")
    with tempfile.TemporaryDirectory(prefix="editlens-publish-") as tmp:
        files: dict[str, Path] = {}
        for name in names:
            spec = get_editor(name)
            files[spec.file_name] = Path(tmp) / spec.file_name
            edit_sets[name].save(files[spec.file_name])
        for fig, path in (figures or {}).items():
            files[fig] = Path(path)
        manifest = bundle_manifest(vlm, adapter, names, parent, description, files, edits, extra)
        if before_register is not None:
            before_register()
        return registry.create_version(
            adapter,
            files,
            manifest,
            base_fingerprint=vlm.fingerprint,
            editor="+".join(names),
            num_edits=len(edits),
            parent=parent,
            description=description,
            set_live=promote,
            parent_must_be_live=parent_must_be_live,
        )


def bundle_manifest(vlm, adapter, editors, parent, description, files, edits, extra) -> dict[str, Any]:
    """A version's ``manifest.json``: format, base model, editors, parent, files, every edit's record and
    ``extra`` sections; JSON-safe (non-finite numbers as null)."""
    manifest = {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_FORMAT_VERSION,
        "adapter": adapter,
        "base_fingerprint": vlm.fingerprint,
        "base_model": str(vlm.path),
        "editors": list(editors),
        "parent": parent,
        "description": description,
        "files": sorted(set(files) | {"manifest.json"}),
        "num_edits": len(edits),
        "edits": edits,
        **dict(extra or {}),
    }
    return json.loads(json.dumps(json_safe(manifest)))


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

    def put(self, bundle: Bundle) -> None:
        with self._lock:
            self._items[(bundle.adapter, bundle.version)] = bundle
            self._items.move_to_end((bundle.adapter, bundle.version))
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def keys(self) -> list[tuple[str, int]]:
        """The (adapter, version) pairs held."""
        with self._lock:
            return list(self._items)

    def drop(self, adapter: str, version: int | None = None) -> None:
        with self._lock:
            for key in [k for k in self._items if k[0] == adapter and (version is None or k[1] == version)]:
                del self._items[key]
