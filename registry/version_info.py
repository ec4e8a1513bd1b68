"""VersionInfo: what the registry knows about one adapter version."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class VersionInfo:
    """One immutable version of an adapter (a registered model in MLflow).

    ``manifest`` is loaded lazily: listing versions reads only MLflow metadata (tags); the
    first access to ``manifest`` fetches ``manifest.json`` from the artifact store (or the
    local download cache), verifies its sha256 against the version's recorded checksum and
    caches it in the Registry. A VersionInfo returned by ``create_version`` carries its
    manifest already (``loaded_manifest``).
    """

    adapter: str
    version: int
    aliases: list[str]
    created: float  # unix seconds
    base_fingerprint: str
    editor: str  # "multedit", "visedit", "multedit+visedit", ...
    num_edits: int
    parent: int | None  # the version this one was built on
    description: str
    files: list[str]  # artifact file names, manifest.json included
    sha256: dict[str, str] = field(default_factory=dict, repr=False)  # file name -> hex digest
    manifest_loader: Callable[[], dict] | None = field(default=None, repr=False, compare=False)
    loaded_manifest: dict | None = field(default=None, repr=False, compare=False)  # set: no load needed
    delta_of: int | None = None  # a delta version: the version whose files its files build on

    def __post_init__(self) -> None:
        self.version, self.num_edits, self.created = int(self.version), int(self.num_edits), float(self.created)
        self.aliases, self.files, self.sha256 = list(self.aliases), list(self.files), dict(self.sha256)

    @property
    def manifest(self) -> dict:
        """The version's manifest.json content (loaded on first access, then kept)."""
        if self.loaded_manifest is None:
            if self.manifest_loader is None:
                from .errors import RegistryError

                raise RegistryError(f"adapter '{self.adapter}' version {self.version}: manifest not available")
            self.loaded_manifest = self.manifest_loader()
        return self.loaded_manifest

    @property
    def is_live(self) -> bool:
        return "live" in self.aliases

    def to_dict(self, include_manifest: bool = True) -> dict[str, Any]:
        d: dict[str, Any] = {
            "adapter": self.adapter,
            "version": self.version,
            "aliases": list(self.aliases),
            "created": self.created,
            "base_fingerprint": self.base_fingerprint,
            "editor": self.editor,
            "num_edits": self.num_edits,
            "parent": self.parent,
            "delta_of": self.delta_of,
            "description": self.description,
            "files": list(self.files),
            "sha256": dict(self.sha256),
        }
        if include_manifest:
            d["manifest"] = self.manifest
        return d
