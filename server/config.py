"""What ``editlens serve`` is configured with: address, model, registry, auth, limits."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Limits:
    """Per-request limits; beyond them a request is refused with a readable status."""

    max_image_bytes: int = 10 * 1024 * 1024      # RESOURCE_EXHAUSTED beyond
    max_image_pixels: int = 4096 * 4096          # width * height; RESOURCE_EXHAUSTED beyond
    max_prompt_tokens: int | None = None         # None: the model's context minus max_new_tokens; INVALID_ARGUMENT beyond
    max_new_tokens: int = 32                     # answer tokens a request may ask for; INVALID_ARGUMENT beyond
    default_new_tokens: int = 16                 # when a request asks for 0
    max_queued_jobs: int = 8                     # edits/diagnostics waiting for a worker; RESOURCE_EXHAUSTED beyond

    @property
    def max_message_bytes(self) -> int:
        """gRPC's receive limit: an edit carries two images, plus room for the text fields."""
        return 2 * self.max_image_bytes + (1 << 20)

    def check(self) -> None:
        for name in ("max_image_bytes", "max_image_pixels", "max_new_tokens", "default_new_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.max_queued_jobs < 0:
            raise ValueError("max_queued_jobs must be >= 0")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens <= 0:
            raise ValueError("max_prompt_tokens must be positive")
        if self.default_new_tokens > self.max_new_tokens:
            self.default_new_tokens = self.max_new_tokens


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051                           # 0: any free port (the bound address is printed)
    model: Path | None = None                   # None: the embedded world's tiny model (built if absent)
    seed: int = 0                               # which embedded world
    device: str = "auto"
    dtype: str = "auto"
    registry_uri: str | None = None             # None: sqlite in registry_dir
    registry_dir: Path | None = None            # None: $EDITLENS_HOME/registry
    default_adapter: str = "default"
    token: str | None = field(default_factory=lambda: os.environ.get("EDITLENS_TOKEN") or None)
    limits: Limits = field(default_factory=Limits)
    live_ttl: float = 0.5                       # seconds a live-alias lookup may be reused
    bundle_cache: int = 8                       # loaded versions kept (LRU)
    job_workers: int = 1                        # edits/diagnostics run at once
    grpc_workers: int = 16                      # threads serving RPCs
    max_concurrent_rpcs: int | None = None      # None: unlimited (RESOURCE_EXHAUSTED beyond)

    def check(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port {self.port} is outside 0..65535")
        if self.live_ttl < 0:
            raise ValueError("live_ttl must be >= 0")
        if self.bundle_cache < 1 or self.job_workers < 1 or self.grpc_workers < 2:
            raise ValueError("bundle_cache and job_workers must be >= 1, grpc_workers >= 2")
        if self.token is not None and not self.token.strip():
            self.token = None
        self.limits.check()
