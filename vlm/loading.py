"""Loading a vision-language checkpoint of a family in ``vlm.architecture`` from a local folder.

No hub access: the path must be a folder written by ``save_pretrained``
(config.json, safetensors weights, tokenizer and processor files). Device and
dtype are chosen automatically (CUDA + bf16 when present, CPU + fp32
otherwise) unless given.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .architecture import ARCHITECTURES, ArchitectureMap, architecture_for
from .errors import ModelLoadError

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass
class VLM:
    """A loaded model with everything needed to talk to it."""

    model: Any  # the family's *ForConditionalGeneration (arch.model_class)
    processor: Any  # the family's multimodal processor (tokenizer + image processor)
    arch: ArchitectureMap
    path: Path
    device: torch.device
    dtype: torch.dtype
    fingerprint: str

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def config(self):
        return self.model.config

    @property
    def text_config(self):
        return self.model.config.text_config

    @property
    def num_layers(self) -> int:
        return self.text_config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size

    @property
    def image_token_id(self) -> int:
        return getattr(self.model.config, self.arch.image_token_id_attr)

    @property
    def input_device(self) -> torch.device:
        return self.arch.get(self.model, self.arch.embed_tokens).weight.device

    def module(self, path: str) -> torch.nn.Module:
        """The submodule at ``path`` (dotted, relative to the top model)."""
        return self.model.get_submodule(path)


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` as a torch device; auto: CUDA when there is one, else the CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' was requested but no CUDA GPU is available; use --device cpu")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``dtype`` as a torch dtype; auto: bfloat16 on CUDA, float32 on the CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(sorted(_DTYPES))}")
    return _DTYPES[dtype]


def _check_folder(path: Path) -> tuple[dict[str, Any], ArchitectureMap, list[Path]]:
    if not path.exists():
        raise ModelLoadError(f"model folder not found: {path}")
    if not path.is_dir():
        raise ModelLoadError(f"model path is not a folder: {path} (give the folder written by save_pretrained)")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ModelLoadError(f"{path} has no config.json: it is not a Hugging Face model folder")
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {cfg_path}: {exc}") from None
    model_type = config.get("model_type", "<none>")
    arch = architecture_for(model_type)
    if arch is None:
        raise ModelLoadError(
            f"{path} holds a {model_type!r} model, not a vision-language family EditLens knows "
            f"(supported model types: {', '.join(sorted(ARCHITECTURES))})"
        )
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise ModelLoadError(f"{path} has no .safetensors weights (pickled .bin weights are not loaded)")
    return config, arch, weights


def fingerprint_folder(path: str | os.PathLike) -> str:
    """A stable identity of a checkpoint: config plus every weight tensor's name,
    shape, dtype and a sample of its bytes. Cheap even for a 7B model (reads
    headers and 64 KiB per file), and different for any retrained model."""
    path = Path(path)
    h = hashlib.sha256()
    cfg = json.loads((path / "config.json").read_text())
    h.update(json.dumps(cfg, sort_keys=True).encode())
    for wf in sorted(path.glob("*.safetensors")):
        with open(wf, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = f.read(n)
            h.update(header)
            data_start = 8 + n
            size = wf.stat().st_size
            for off in (data_start, max(data_start, (data_start + size) // 2), max(data_start, size - 32768)):
                f.seek(off)
                h.update(f.read(32768))
    return h.hexdigest()[:32]


def _load_processor(path: Path, arch: ArchitectureMap):
    """The family's multimodal processor; for a family whose processor transformers cannot build here (a video
    processor without torchvision), ``vlm.processors.ImageTextProcessor`` from the folder's parts."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        failure = None
    except Exception as exc:  # transformers raises many kinds here
        processor, failure = None, exc
    if arch.fallback_processor and type(processor).__name__ != arch.processor_class:
        from .processors import ImageTextProcessor

        try:
            return ImageTextProcessor.from_pretrained(path, arch)
        except Exception as exc:
            failure = failure or exc
            raise ModelLoadError(f"cannot load the processor/tokenizer from {path}: {failure}") from None
    if failure is not None:
        raise ModelLoadError(f"cannot load the processor/tokenizer from {path}: {failure}") from None
    if not hasattr(processor, "image_processor") or not hasattr(processor, "tokenizer"):
        raise ModelLoadError(f"{path} has no image processor + tokenizer pair (processor_config.json missing?)")
    return processor


def load_vlm(
    path: str | os.PathLike,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = "auto",
    attn_implementation: str = "sdpa",
    device_map: str | dict | None = None,
) -> VLM:
    """Load a checkpoint of a supported family (``vlm.architecture.ARCHITECTURES``) from a local folder.

    ``device_map="auto"`` spreads a model larger than one GPU over several
    (needs ``accelerate``); otherwise the whole model goes to ``device``.
    """
    import transformers

    path = Path(path).expanduser().resolve()
    _config, arch, _weights = _check_folder(path)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    processor = _load_processor(path, arch)
    try:
        model = getattr(transformers, arch.model_class).from_pretrained(
            path,
            dtype=dt,
            local_files_only=True,
            use_safetensors=True,
            attn_implementation=attn_implementation,
            device_map=device_map if device_map is not None else None,
        )
    except Exception as exc:
        raise ModelLoadError(f"cannot load model weights from {path}: {exc}") from None
    if device_map is None:
        model.to(dev)
    model.eval()
    model.requires_grad_(False)
    return VLM(
        model=model,
        processor=processor,
        arch=arch,
        path=path,
        device=dev,
        dtype=dt,
        fingerprint=fingerprint_folder(path),
    )
