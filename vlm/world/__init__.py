"""The synthetic factual-VQA world and its tiny LLaVA (the embedded default model)."""

from .build import build_world, default_world_dir, editlens_home, load_summary
from .spec import KIND_CONSTRAINT, RELATIONS, World, WorldConfig
from .train import WORLD_FAMILIES, ModelConfig, TrainConfig

__all__ = [
    "build_world",
    "default_world_dir",
    "editlens_home",
    "load_summary",
    "KIND_CONSTRAINT",
    "RELATIONS",
    "World",
    "WorldConfig",
    "ModelConfig",
    "WORLD_FAMILIES",
    "TrainConfig",
]
