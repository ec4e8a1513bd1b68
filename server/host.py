"""What the server's work runs on once the model is loaded: the model, the registry and their helpers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from vlm.world.folder import WorldFolder, world_phrases

from .batching import Batcher
from .config import ServerConfig
from .inputs import Inputs
from .versions import Versions


@dataclass
class Host:
    """The loaded model (``vlm``), the registry, version resolution (``versions``), the input checks
    (``inputs``), the world's named-entity phrases (the causal trace's replacements), the generation
    ``batcher`` (None: every request decodes alone in its own thread) and the ``world`` whose model the
    loaded model is (``WorldFolder.of_model``, asked once here; None for any other checkpoint)."""

    vlm: object
    registry: object
    versions: Versions
    inputs: Inputs
    phrases: list[str] = field(default_factory=list)
    batcher: Batcher | None = None
    world: WorldFolder | None = None

    @classmethod
    def create(cls, vlm, registry, config: ServerConfig, on_batch: Callable[[int], None] | None = None) -> Host:
        """The host of a loaded model and registry, configured as ``config`` says (``on_batch``: told each
        generation batch's size)."""
        versions = Versions(
            registry, vlm, config.default_adapter, config.live_ttl, config.bundle_cache, config.reverify_s
        )
        batcher = (
            Batcher(vlm, config.max_batch_size, config.batch_wait_ms / 1000, on_batch)
            if config.max_batch_size > 1
            else None
        )
        world = WorldFolder.of_model(vlm)
        phrases = world_phrases(world.root) if world is not None else []
        return cls(vlm, registry, versions, Inputs(config.limits, vlm), phrases, batcher, world)

    def close(self) -> None:
        """Stop the batcher (requests still waiting are answered UNAVAILABLE) and the re-verification."""
        self.versions.close()
        if self.batcher is not None:
            self.batcher.close()
