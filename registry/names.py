"""Names and arguments: what the registry writes into MLflow and what it accepts from callers.

The experiment's name, the ``live`` alias, the manifest's file name, the tags every version and adapter
carry (``editlens.*``) and the rules for adapter names, aliases, version references and version files, with
the checks that raise ``InvalidArgumentError``. Kept apart from ``store.py`` (the lifecycle) so that the
validation and the layout constants can be read, and imported (the server checks adapter names), without
the MLflow plumbing; this module imports neither MLflow nor anything else outside the standard library.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from .errors import InvalidArgumentError

EXPERIMENT_NAME = "editlens-adapters"
LIVE = "live"
MANIFEST = "manifest.json"

TAG_KIND = "editlens.kind"
KIND_ADAPTER = "adapter"
TAG_BASE = "editlens.base_fingerprint"
TAG_EDITOR = "editlens.editor"
TAG_NUM_EDITS = "editlens.num_edits"
TAG_PARENT = "editlens.parent"
TAG_FILES = "editlens.files"
TAG_SHA256 = "editlens.sha256"
TAG_HISTORY = "editlens.live_history"
TAG_FORMAT = "editlens.format"
#: the version whose files a delta version's files build on (it cannot be deleted while the delta exists)
TAG_DELTA_OF = "editlens.delta_of"
TAG_AUDIT = "editlens.audit."  # + a nanosecond timestamp: one registered-model tag per mutation
FORMAT_VERSION = "1"
HISTORY_LIMIT = 100

#: File types a version may hold: edit sets, manifests, figures, notes. No pickle anywhere.
ALLOWED_SUFFIXES = (".safetensors", ".json", ".png", ".txt", ".md")

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_ALIAS_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
_FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_VERSION_REF_RE = re.compile(r"^[vV]?(\d{1,9})$")


def check_adapter_name(adapter: Any) -> str:
    """``adapter`` when it is a valid adapter name; ``InvalidArgumentError`` otherwise."""
    if not isinstance(adapter, str) or not _NAME_RE.match(adapter):
        raise InvalidArgumentError(
            f"invalid adapter name {adapter!r}: use 1-64 letters, digits, '-', '_' or '.', "
            "starting with a letter or digit"
        )
    return adapter


def check_alias(alias: Any) -> str:
    """``alias`` when it is a valid alias; ``InvalidArgumentError`` otherwise."""
    if not isinstance(alias, str) or not _ALIAS_RE.match(alias):
        raise InvalidArgumentError(
            f"invalid alias {alias!r}: use 1-64 letters, digits, '-' or '_', starting with a letter"
        )
    if alias.lower() == "latest" or _VERSION_REF_RE.match(alias):
        raise InvalidArgumentError(f"invalid alias {alias!r}: 'latest' and 'v<number>' are reserved")
    return alias


def check_version_number(version: Any) -> int:
    """``version`` as an int >= 1; ``InvalidArgumentError`` otherwise."""
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise InvalidArgumentError(f"invalid version {version!r}: a version is a positive integer")
    return version


def parse_ref(ref: Any) -> int | str:
    """A version reference: 3, "3", "v3" -> 3; an alias name ("live") -> the alias."""
    if isinstance(ref, bool):
        raise InvalidArgumentError(f"invalid version reference {ref!r}")
    if isinstance(ref, int):
        return check_version_number(ref)
    if isinstance(ref, str):
        m = _VERSION_REF_RE.match(ref.strip())
        if m:
            return check_version_number(int(m.group(1)))
        if _ALIAS_RE.match(ref) and ref.lower() != "latest":
            return ref
    raise InvalidArgumentError(
        f"invalid version reference {ref!r}: give a version number (3 or 'v3') or an alias (e.g. 'live')"
    )


def check_version_inputs(files, manifest, base_fingerprint, editor, num_edits, parent, description) -> dict[str, Path]:
    """The arguments of ``Registry.create_version`` checked (``InvalidArgumentError`` for the first bad one);
    returns the files to stage (artifact name -> path)."""
    if not isinstance(files, dict) or not files:
        raise InvalidArgumentError("a version needs at least one file (a .safetensors edit set)")
    staged: dict[str, Path] = {}
    for name, path in files.items():
        if not isinstance(name, str) or not _FILE_RE.match(name) or name == MANIFEST:
            raise InvalidArgumentError(
                f"invalid file name {name!r}: a plain name of letters, digits, '.', '-', '_' "
                f"(and not {MANIFEST}, which is written from the manifest)"
            )
        if not name.lower().endswith(ALLOWED_SUFFIXES):
            raise InvalidArgumentError(f"file '{name}': only {', '.join(ALLOWED_SUFFIXES)} files are stored")
        p = Path(path)
        if not p.is_file():
            raise InvalidArgumentError(f"file '{name}' not found at {p}")
        staged[name] = p
    if not any(n.lower().endswith(".safetensors") for n in staged):
        raise InvalidArgumentError("a version needs at least one .safetensors edit set")
    if not isinstance(manifest, dict):
        raise InvalidArgumentError("the manifest must be a JSON object (dict)")
    try:
        json.dumps(manifest)
    except (TypeError, ValueError) as e:
        raise InvalidArgumentError(f"the manifest is not JSON-serialisable: {e}") from e
    for label, value in (("base_fingerprint", base_fingerprint), ("editor", editor)):
        if not isinstance(value, str) or not value.strip() or len(value) > 500:
            raise InvalidArgumentError(f"{label} must be a non-empty string")
    if isinstance(num_edits, bool) or not isinstance(num_edits, int) or num_edits < 0:
        raise InvalidArgumentError(f"num_edits must be a non-negative integer, not {num_edits!r}")
    if parent is not None:
        check_version_number(parent)
    if not isinstance(description, str):
        raise InvalidArgumentError("description must be a string")
    return staged
