"""An edit set stored as what it adds to its parent: the file of a delta version.

A lineage of versions grows one edit at a time; storing every version whole makes storage quadratic in the
number of edits. A **delta** holds only what an edit set adds to the edit set it was made on (its parent, the
same editor's set in the parent version), for any editor, from the two edit sets' tensors and manifests:

* each tensor is the parent's (not stored, not even named), ``grown`` along one dimension (the parent's
  slices along it kept, some of them possibly replaced — a KeyGate entry re-optimised — and new slices
  appended: only the replaced and the new slices are stored) or ``whole`` (stored as it is: a new tensor, or
  FT-L's dense change);
* each manifest field is ``same``, ``appended`` (a list that grew: only the new items) or ``set`` (stored whole);
  the records are a list like any other, so a delta stores its new edits' records only.

The file is a safetensors file like an edit set's (format ``editlens.edit_set_delta``) whose manifest names the
edit set's format and the digest of the parent it applies to (``content_digest``: its tensors and manifest), so a
delta is never applied to another parent. ``apply_delta`` rebuilds the whole edit set and validates it through
its class (``from_manifest``), as loading a whole file does. ``diff`` returns None where a delta would not be
smaller (another editor or format): the caller stores the edit set whole.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import torch

from .base import EditSetBase
from .files import EditSetError, read_manifest, read_safetensors, write_safetensors

FORMAT = "editlens.edit_set_delta"
FORMAT_VERSION = 1
#: the manifest header fields, which a delta never changes
HEADER = ("format", "format_version", "base_fingerprint", "editor")


def content_digest(
    edit_set: EditSetBase, tensors: dict[str, torch.Tensor] | None = None, manifest: dict[str, Any] | None = None
) -> str:
    """sha256 of an edit set's content (every tensor's name, dtype, shape and bytes, and its manifest): what a
    delta names as its parent, independent of how the parent itself was stored. ``tensors`` and ``manifest``:
    the edit set's, when the caller has them already."""
    h = hashlib.sha256()
    tensors = edit_set.tensors() if tensors is None else tensors
    for name, t in sorted(tensors.items()):
        t = t.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(json.dumps(edit_set.manifest() if manifest is None else manifest, sort_keys=True, default=str).encode())
    return h.hexdigest()


# ------------------------------------------------------------------ tensors
def _grown_dim(parent: torch.Tensor, child: torch.Tensor) -> int | None:
    """The one dimension along which ``child`` is ``parent`` grown (all other sizes equal), or None."""
    if parent.dtype != child.dtype or parent.dim() != child.dim() or parent.dim() == 0:
        return None
    differ = [d for d in range(child.dim()) if parent.shape[d] != child.shape[d]]
    if not differ:
        return 0
    if len(differ) == 1 and parent.shape[differ[0]] < child.shape[differ[0]]:
        return differ[0]
    return None


def _diff_tensors(parent: dict[str, torch.Tensor], child: dict[str, torch.Tensor]):
    stored: dict[str, torch.Tensor] = {}
    plan: dict[str, dict[str, Any]] = {}
    for name, t in child.items():
        p = parent.get(name)
        dim = None if p is None else _grown_dim(p, t)
        if p is not None and p.shape == t.shape and torch.equal(p, t):
            continue  # the parent's, unchanged: not in the plan
        if dim is None:
            plan[name] = {"kind": "whole"}
            stored[name] = t
            continue
        n = p.shape[dim]
        head = t.narrow(dim, 0, n)
        # the slices along ``dim`` that differ from the parent's (replaced), then the new ones
        idx = (head != p).movedim(dim, 0).reshape(n, -1).any(dim=1).nonzero().flatten()
        plan[name] = {"kind": "grown", "dim": dim, "kept": n, "replaced": int(idx.numel())}
        if idx.numel():
            stored[f"{name}#replaced_at"] = idx.to(torch.int64)
            stored[f"{name}#replaced"] = head.index_select(dim, idx).contiguous()
        if t.shape[dim] > n:
            stored[f"{name}#new"] = t.narrow(dim, n, t.shape[dim] - n).contiguous()
    dropped = sorted(set(parent) - set(child))
    if dropped:
        plan["#dropped"] = {"kind": "dropped", "names": dropped}
    return stored, plan


def _apply_tensors(parent: dict[str, torch.Tensor], stored: dict[str, torch.Tensor], plan: dict, source: str):
    dropped = set(plan.get("#dropped", {}).get("names", []))
    out = {name: t for name, t in parent.items() if name not in dropped and name not in plan}  # unchanged
    for name, step in plan.items():
        kind = step.get("kind")
        try:
            if kind == "dropped":
                continue
            if kind == "whole":
                out[name] = stored[name]
            elif kind == "grown":
                dim, kept = int(step["dim"]), int(step["kept"])
                t = parent[name]
                if t.shape[dim] != kept:
                    raise EditSetError(f"{source}: {name} grows a parent of {kept}, not {t.shape[dim]}")
                if step.get("replaced"):
                    t = t.index_copy(dim, stored[f"{name}#replaced_at"], stored[f"{name}#replaced"])
                if f"{name}#new" in stored:
                    t = torch.cat([t, stored[f"{name}#new"]], dim)
                out[name] = t.contiguous()
            else:
                raise EditSetError(f"{source}: tensor {name} has an unknown delta kind {kind!r}")
        except KeyError as exc:
            raise EditSetError(
                f"{source}: tensor {name} needs {exc.args[0]}, which neither it nor its parent holds"
            ) from None
        except RuntimeError as exc:  # shapes that do not fit the parent's
            raise EditSetError(f"{source}: tensor {name} does not fit its parent: {exc}") from None
    return out


# ----------------------------------------------------------------- manifest
def _diff_fields(parent: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    plan: dict[str, Any] = {}
    for key, value in child.items():
        if key in HEADER:
            continue
        old = parent.get(key, None)
        if key in parent and old == value:
            plan[key] = {"same": True}
        elif isinstance(old, list) and isinstance(value, list) and value[: len(old)] == old:
            plan[key] = {"appended": value[len(old) :], "after": len(old)}
        else:
            plan[key] = {"set": value}
    return plan


def _apply_fields(parent: dict[str, Any], plan: dict[str, Any], source: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, step in plan.items():
        if "same" in step:
            out[key] = parent[key]
        elif "appended" in step:
            old = parent.get(key)
            if not isinstance(old, list) or len(old) != step.get("after"):
                raise EditSetError(f"{source}: manifest field {key} appends to a parent list it does not find")
            out[key] = old + list(step["appended"])
        elif "set" in step:
            out[key] = step["set"]
        else:
            raise EditSetError(f"{source}: manifest field {key} has no delta step")
    return out


# -------------------------------------------------------------------- files
def diff(child: EditSetBase, parent: EditSetBase) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The delta of ``child`` over ``parent`` (tensors, manifest), or None where there is none to store (another
    editor, format or base model: store ``child`` whole)."""
    pm, cm = parent.manifest(), child.manifest()
    if type(child) is not type(parent) or any(pm.get(k) != cm.get(k) for k in HEADER):
        return None
    pt = parent.tensors()
    stored, tensor_plan = _diff_tensors(pt, child.tensors())
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "base_fingerprint": child.base_fingerprint,
        "editor": child.editor,
        "of": {
            "format": cm["format"],
            "format_version": cm["format_version"],
            "digest": content_digest(parent, pt, pm),
        },
        "tensors": tensor_plan,
        "fields": _diff_fields(pm, cm),
        "records": len(child.records),  # how many edits the whole edit set holds (the delta's are appended)
    }
    return stored, manifest


def save_delta(child: EditSetBase, parent: EditSetBase, path: str | os.PathLike) -> int | None:
    """Write ``child`` as a delta over ``parent`` (atomically); its size in bytes, or None (nothing written) where
    ``child`` is not ``parent`` grown: the caller saves it whole."""
    found = diff(child, parent)
    if found is None:
        return None
    stored, manifest = found
    bad = [k for k, t in stored.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise EditSetError(f"refusing to save {', '.join(bad[:3])}: NaN or infinite values")
    return write_safetensors(path, stored, manifest)


def load_delta(path: str | os.PathLike, parent: EditSetBase, vlm=None) -> EditSetBase:
    """The whole edit set a delta file makes of ``parent``, validated by the parent's class (and against ``vlm``
    when given); an ``EditSetError`` for a file that is not a delta of this parent."""
    source = str(path)
    meta, stored = read_safetensors(path, "edit-set delta")
    man = read_manifest(meta, source, FORMAT, FORMAT_VERSION, "an edit-set delta", ("of", "tensors", "fields"))
    of = man["of"]
    cls = type(parent)
    if of.get("format") != cls.FORMAT or man.get("editor") != parent.editor:
        raise EditSetError(f"{source} is a delta of a {of.get('format')} edit set, not of this {cls.FORMAT} one")
    pt, pm = parent.tensors(), parent.manifest()
    if of.get("digest") != content_digest(parent, pt, pm):
        raise EditSetError(f"{source} is a delta of another parent edit set (the digest differs): a broken lineage")
    fields = _apply_fields(pm, man["fields"], source)
    whole = {k: man[k] for k in HEADER if k not in ("format", "format_version")}
    whole.update(format=of["format"], format_version=of["format_version"], **fields)
    tensors = _apply_tensors(pt, stored, man["tensors"], source)
    edit_set = cls.from_manifest(whole, tensors, source)
    if vlm is not None:
        edit_set.check_compatible(vlm)
    return edit_set
