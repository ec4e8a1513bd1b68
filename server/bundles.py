"""A registry version ("bundle"): written by ``publish``, read by ``load_bundle``.

A version's folder holds, for each editor whose edits it carries, that
editor's edit set as ``<editor>.safetensors`` (``editors.EditorSpec.file_name``:
``multedit.safetensors``, ``visedit.safetensors``, ``ft.safetensors``, ...),
``manifest.json`` and optional PNG figures. These two functions are the only
places that know the layout.

**Delta versions.** A version made on a parent (every Edit on a live version)
stores only what it adds: an editor's edit set that grew as
``<editor>.delta.safetensors`` (``editors.delta``: its new slices and records,
applied to the parent's edit set), one it did not change not at all (the
manifest's ``inherited``), and in its manifest only its own edits' records
(``edits``, after the parent's ``edits_before``); the registry records the
parent as the version's ``delta_of``. Storage per version is then proportional
to its own edits, and an Edit's cost does not grow with the lineage. Loading
composes the lineage from the nearest loaded or whole ancestor (``Versions``);
``squash`` writes a version whole again, so a long lineage loads fast. Versions
written whole (all before delta versions) read as they always did.

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
from editors.delta import load_delta, save_delta
from editors.files import EditSetError, FingerprintMismatchError
from registry import NotFoundError, UnavailableError
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

    @property
    def num_edits_recorded(self) -> int:
        """The edits the version's manifest records, its ancestors' included (a delta version counts them all)."""
        return int(self.manifest.get("num_edits", len(self.manifest.get("edits", []))))

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


def delta_file_name(editor: str) -> str:
    """The file a delta version stores an editor's grown edit set as (``editors.delta``)."""
    return f"{editor}.delta.safetensors"


def load_bundle(
    vlm: VLM | None,
    adapter: str,
    version: int,
    folder: Path,
    manifest: dict | None = None,
    base_fingerprint: str | None = None,
    parent: Bundle | None = None,
) -> Bundle:
    """Validate and load the edit sets in ``folder`` (a downloaded version) for ``vlm`` (None: checked as files
    only, for the registry's own work); a delta version's on its ``parent`` (the version it names as
    ``delta_of``)."""
    label = f"adapter '{adapter}' version {version}"
    manifest = dict(manifest or {})
    if vlm is not None:
        check_fingerprint(vlm, label, base_fingerprint or manifest.get("base_fingerprint"))
    if manifest.get("delta_of") is not None and (parent is None or parent.version != manifest["delta_of"]):
        raise BundleError(f"{label} is a delta of version {manifest['delta_of']}, which was not given to load it on")
    edit_sets: dict[str, EditSetBase] = {}
    for name in editor_names():
        spec = get_editor(name)
        path, delta = folder / spec.file_name, folder / delta_file_name(name)
        try:
            if path.is_file():
                edit_sets[name] = spec.load(path, vlm)
            elif delta.is_file():
                if parent is None or name not in parent.edit_sets:
                    raise EditSetError(f"it is a delta of a {name} edit set its parent version does not hold")
                edit_sets[name] = load_delta(delta, parent.edit_sets[name], vlm)
            elif parent is not None and name in manifest.get("inherited", []):
                edit_sets[name] = parent.edit_sets[name]
        except FingerprintMismatchError as exc:
            raise FingerprintMismatchError(f"{label}: {exc}") from None
        except (EditSetError, KeyError) as exc:
            what = spec.file_name if path.is_file() else delta_file_name(name)
            raise BundleError(f"{label}: {what} failed validation: {exc}") from None
    if not edit_sets:
        files = " or ".join(get_editor(n).file_name for n in editor_names())
        raise BundleError(f"{label} holds no edit set ({files})")
    return Bundle(adapter, version, dict(manifest or {}), edit_sets)


def _chain(registry, info, stop: Callable[[int], Any]) -> tuple[list, Any]:
    """``info`` and its ancestors up to the first that is stored whole or for which ``stop(version)`` gives
    something (returned beside the chain, newest first); a delta version's ancestors are its ``delta_of``s."""
    chain, found = [info], None
    while chain[-1].delta_of is not None:
        found = stop(chain[-1].delta_of)
        if found is not None:
            break
        chain.append(registry.version(info.adapter, chain[-1].delta_of))
    return chain, found


def load_lineage(registry, vlm: VLM | None, info, loaded: Callable[[int], Bundle | None] = lambda v: None) -> Bundle:
    """Version ``info`` loaded: a delta version on its lineage, from the nearest ancestor ``loaded`` gives (or
    one stored whole) down, one version at a time (the ancestors loaded on the way are not kept)."""
    chain, parent = _chain(registry, info, loaded)
    for v in reversed(chain):
        try:
            folder = registry.download(v.adapter, v.version)
            manifest = v.manifest
        except (NotFoundError, UnavailableError):
            raise
        except Exception as exc:
            raise BundleError(f"adapter '{v.adapter}' version {v.version} cannot be loaded: {exc}") from None
        parent = load_bundle(vlm, v.adapter, v.version, folder, manifest, v.base_fingerprint, parent)
    return parent


def lineage_edits(
    registry,
    info,
    known: Callable[[int], list[dict] | None] = lambda v: None,
    keep: Callable[[int, list[dict]], None] = lambda v, e: None,
) -> list[dict]:
    """Every edit of version ``info``'s lineage, oldest first, each naming the version that added it: a delta
    version's manifest records only its own. ``known(version)``: a version's list already composed; ``keep``
    is given each list composed on the way."""
    chain, edits = _chain(registry, info, known)
    edits = list(edits or [])
    for v in reversed(chain):
        own = v.manifest.get("edits", [])
        base = edits if v.delta_of is not None else []
        edits = base + [{**rec, "version": rec.get("version") or v.version} for rec in own]
        keep(v.version, edits)
    return edits


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
    delta_of: Bundle | None = None,
):
    """Register a new version of ``adapter`` holding ``edit_sets`` (editor name -> edit set); returns its
    ``VersionInfo``.

    ``edits``: the version's edits as the manifest records them, oldest first: every edit, or with ``delta_of``
    (the loaded parent version) only those this version adds; ``parent``: the version it was made on top of;
    ``figures``: PNG files by name; ``extra``: further manifest sections (e.g. ``training``).
    ``before_register`` runs once everything is written, right before the registry is touched (the last point
    at which a cancelled job leaves no trace). ``parent_must_be_live``: promote only if ``parent`` is still live
    (``Registry.create_version``; else ``StaleParentError``). ``delta_of``: store the version as a delta of that
    loaded version (module docstring). All or nothing.
    """
    if not edit_sets:
        raise ValueError("a version holds at least one edit set")
    names = [n for n in editor_names() if n in edit_sets]
    unknown = sorted(set(edit_sets) - set(names))
    if unknown:
        raise ValueError(f"no registered editor is called {unknown}")
    with tempfile.TemporaryDirectory(prefix="editlens-publish-") as tmp:
        files, stored = _save_edit_sets(Path(tmp), names, edit_sets, delta_of)
        for fig, path in (figures or {}).items():
            files[fig] = Path(path)
        manifest = bundle_manifest(vlm, adapter, names, parent, description, files, edits, extra)
        num_edits = len(edits)
        if delta_of is not None:
            before = delta_of.num_edits_recorded
            num_edits += before
            manifest.update(delta_of=delta_of.version, edits_before=before, num_edits=num_edits, **stored)
        if before_register is not None:
            before_register()
        return registry.create_version(
            adapter,
            files,
            manifest,
            base_fingerprint=vlm.fingerprint,
            editor="+".join(names),
            num_edits=num_edits,
            parent=parent,
            description=description,
            set_live=promote,
            parent_must_be_live=parent_must_be_live,
            delta_of=delta_of.version if delta_of is not None else None,
        )


def _save_edit_sets(
    folder: Path, names: list[str], edit_sets: Mapping[str, EditSetBase], delta_of: Bundle | None
) -> tuple[dict[str, Path], dict[str, list[str]]]:
    """Write each edit set into ``folder``: whole, or as a delta of ``delta_of``'s (not at all when it is that
    version's own); the files by artifact name and which editors were inherited and which stored as deltas."""
    files: dict[str, Path] = {}
    stored: dict[str, list[str]] = {"inherited": [], "deltas": []}
    for name in names:
        spec, edit_set = get_editor(name), edit_sets[name]
        parent = delta_of.edit_sets.get(name) if delta_of is not None else None
        if parent is not None and parent is edit_set:
            stored["inherited"].append(name)
            continue
        if parent is not None and save_delta(edit_set, parent, folder / delta_file_name(name)) is not None:
            files[delta_file_name(name)] = folder / delta_file_name(name)
            stored["deltas"].append(name)
            continue
        files[spec.file_name] = folder / spec.file_name
        edit_set.save(files[spec.file_name])
    return files, stored


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

    def peek(self, adapter: str, version: int) -> Bundle | None:
        """The bundle if it is held (no load, no reordering)."""
        with self._lock:
            return self._items.get((adapter, version))

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


def squash(registry, adapter: str, version: int):
    """Register version ``version`` of ``adapter`` again, stored whole (every edit set in full, every edit of its
    lineage in its manifest), as a new version whose parent it is; live when ``version`` is (so later edits build
    on it and a long lineage of deltas loads from it at once). Returns the new ``VersionInfo``; a version stored
    whole already is refused (``ValueError``)."""
    info = registry.version(adapter, version)
    if info.delta_of is None:
        raise ValueError(f"adapter '{adapter}' version {version} is stored whole already: nothing to squash")
    bundle = load_lineage(registry, None, info)
    manifest = dict(info.manifest)
    for key in ("delta_of", "edits_before", "inherited", "deltas"):
        manifest.pop(key, None)
    edits = lineage_edits(registry, info)
    manifest.update(edits=edits, num_edits=len(edits), squashed_from=version)
    names = [n for n in editor_names() if n in bundle.edit_sets]
    with tempfile.TemporaryDirectory(prefix="editlens-squash-") as tmp:
        files, _ = _save_edit_sets(Path(tmp), names, bundle.edit_sets, None)
        folder = registry.download(adapter, version)
        for name in info.files:  # the figures travel with the version
            if name.lower().endswith(".png") and (folder / name).is_file():
                files[name] = folder / name
        manifest["files"] = sorted(set(files) | {"manifest.json"})
        return registry.create_version(
            adapter,
            files,
            json.loads(json.dumps(json_safe(manifest))),
            base_fingerprint=info.base_fingerprint,
            editor=info.editor,
            num_edits=len(edits),
            parent=version,
            description=f"version {version} stored whole" + (f": {info.description}" if info.description else ""),
            set_live=info.is_live,
            parent_must_be_live=info.is_live,
        )
