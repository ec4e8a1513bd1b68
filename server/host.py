"""What the server's work runs on once the model is loaded: the model, the registry and their helpers."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .config import ServerConfig
from .inputs import Inputs
from .versions import Versions


@dataclass
class Host:
    """The loaded model (``vlm``), the registry, version resolution (``versions``), the input checks
    (``inputs``) and the world's named-entity phrases (the causal trace's replacements)."""

    vlm: object
    registry: object
    versions: Versions
    inputs: Inputs
    phrases: list[str] = field(default_factory=list)

    @classmethod
    def create(cls, vlm, registry, config: ServerConfig) -> Host:
        """The host of a loaded model and registry, configured as ``config`` says."""
        from diagnostics.cases import world_phrases

        versions = Versions(registry, vlm, config.default_adapter, config.live_ttl, config.bundle_cache)
        return cls(vlm, registry, versions, Inputs(config.limits, vlm), world_phrases(Path(vlm.path).parent))
