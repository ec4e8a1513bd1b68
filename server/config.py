"""What ``editlens serve`` is configured with: address, model, registry, auth, limits."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from vlm.options import ConfigError, option


@dataclass
class Limits:
    """Per-request limits; beyond them a request is refused with a readable status."""

    max_image_bytes: int = option(10 * 1024 * 1024, "Largest image accepted, in bytes (RESOURCE_EXHAUSTED beyond).")
    max_image_pixels: int = option(4096 * 4096, "Largest image accepted, width x height (RESOURCE_EXHAUSTED beyond).")
    max_prompt_tokens: int | None = option(
        None, "Longest prompt, image tokens included (default: the model's context minus --max-new-tokens)."
    )
    max_new_tokens: int = option(32, "Most answer tokens a request may ask for (INVALID_ARGUMENT beyond).")
    default_new_tokens: int = option(16, "Answer tokens when a request asks for none.")
    max_queued_jobs: int = option(
        8, "Edit/diagnose jobs that may wait for a worker (RESOURCE_EXHAUSTED beyond).", flag="--max-queue"
    )
    max_text_chars: int = option(
        4096, "Longest free-text field of a request (a question, an answer, a description; INVALID_ARGUMENT beyond)."
    )
    max_job_steps: int = option(
        5000, "Most optimisation or training steps an Edit or TrainVisEdit may ask for (INVALID_ARGUMENT beyond)."
    )
    max_job_seconds: float = option(
        1800.0, "A job that runs longer is stopped at its next progress report (DEADLINE_EXCEEDED; nothing registered)."
    )

    @property
    def max_message_bytes(self) -> int:
        """gRPC's receive limit: an edit carries two images, plus room for the text fields."""
        return 2 * self.max_image_bytes + (1 << 20)

    def check(self) -> None:
        for name in (
            "max_image_bytes",
            "max_image_pixels",
            "max_new_tokens",
            "default_new_tokens",
            "max_text_chars",
            "max_job_steps",
            "max_job_seconds",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        if self.max_queued_jobs < 0:
            raise ConfigError("max_queued_jobs must be >= 0")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens <= 0:
            raise ConfigError("max_prompt_tokens must be positive")
        if self.default_new_tokens > self.max_new_tokens:
            self.default_new_tokens = self.max_new_tokens


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` listens only on this machine."""
    import ipaddress

    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_token_file(path: str | os.PathLike) -> str:
    """The token in a file (its first line, stripped); a ConfigError naming the file otherwise."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read the token file {path}: {exc.strerror or exc}") from None
    token = text.strip().splitlines()[0].strip() if text.strip() else ""
    if not token:
        raise ConfigError(f"the token file {path} is empty")
    return token


@dataclass
class ServerConfig:
    """Everything ``editlens serve`` is started with; the command's options come from these fields."""

    host: str = option("127.0.0.1", "Address to bind (0.0.0.0: every interface).")
    port: int = option(50051, "Port (0: any free port; the bound address is printed).")
    model: Path | None = option(
        None, "Model folder (default: the embedded world's tiny model, built on the first start)."
    )
    seed: int = option(0, "Which embedded world (without --model).")
    device: str = option("auto", "auto, cpu or cuda.")
    dtype: str = option("auto", "auto, float32, bfloat16 or float16.")
    registry_uri: str | None = option(
        None, "An MLflow tracking URI instead of the embedded sqlite (e.g. http://mlflow:5000 shared by replicas)."
    )
    registry_dir: Path | None = option(
        None, "Registry folder: sqlite database, artifacts, cache (default: $EDITLENS_HOME/registry)."
    )
    default_adapter: str = option("default", "The adapter served when a request names none.", flag="--adapter")
    token: str | None = option(
        help="Require 'authorization: Bearer <token>' on edit, train, promote, rollback and delete "
        "(default: $EDITLENS_TOKEN; none: no auth). A process list shows the command line: prefer "
        "--token-file or the environment.",
        factory=lambda: os.environ.get("EDITLENS_TOKEN") or None,
        envvar="EDITLENS_TOKEN",
    )
    token_file: Path | None = option(
        None, "Read the token from this file (its first line) instead.", envvar="EDITLENS_TOKEN_FILE"
    )
    tls_cert: Path | None = option(None, "PEM certificate chain of the server: serve TLS (with --tls-key).")
    tls_key: Path | None = option(None, "PEM private key of --tls-cert.")
    tls_client_ca: Path | None = option(
        None, "PEM CA certificate(s): require every client to present a certificate they signed (mutual TLS)."
    )
    insecure: bool = option(
        False,
        "Allow a non-loopback --host without a token and TLS (every mutating call open to the network, "
        "tokens in clear text).",
    )
    limits: Limits = option(help="Per-request limits.", factory=Limits)
    mutation_wait_s: float = option(
        5.0,
        "How long Rollback, SetAlias and DeleteVersion wait for a running job of the same adapter before they "
        "answer ABORTED, naming the job (two such calls wait per adapter at most; more are refused at once).",
    )
    live_ttl: float = option(
        0.5,
        "Seconds a lookup of an adapter's live version is reused (how soon a rollback made on another "
        "replica reaches this one).",
    )
    bundle_cache: int = option(8, "Loaded versions kept in memory.")
    reverify_s: float = option(
        60.0,
        "Every this many seconds, the files of each version held in memory (and, for a delta version, of the "
        "versions it was composed from) are fetched from the artifact store again and checked against their "
        "checksums; a version whose stored files, or whose ancestors' files, fail is refused "
        "(FAILED_PRECONDITION) from then on, as a replica that never loaded it refuses it (0: never).",
    )
    job_workers: int = option(1, "Jobs run at once.")
    grpc_workers: int = option(16, "Threads serving RPCs.")
    max_batch_size: int = option(
        16,
        "Generate/GenerateStream requests decoded together, one forward pass per step, each row with its own "
        "version's edits (1: every request decodes alone in its own thread).",
    )
    batch_wait_ms: float = option(
        5.0,
        "How long a batch may wait, in milliseconds, for more requests while the server is still reading some "
        "or the previous batch had several rows (requests that come one at a time never wait; those that came "
        "while the previous batch ran join at once).",
    )
    max_concurrent_rpcs: int | None = option(None, "Most RPCs at once (default: unlimited; RESOURCE_EXHAUSTED beyond).")
    metrics_port: int | None = option(
        None,
        "Serve Prometheus metrics on this port (http://METRICS_HOST:PORT/metrics: requests, latencies, batch "
        "sizes, queue depth, jobs, edits, live versions); default: off. 0: any free port.",
    )
    metrics_host: str = option(
        "127.0.0.1",
        "Address of the metrics endpoint. It has no authentication: keep it on loopback or a network only the "
        "scraper reaches.",
    )

    def check(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port {self.port} is outside 0..65535")
        if self.live_ttl < 0:
            raise ConfigError("live_ttl must be >= 0")
        if self.reverify_s < 0:
            raise ConfigError(f"reverify_s must be >= 0 (0: never), not {self.reverify_s}")
        if self.bundle_cache < 1 or self.job_workers < 1 or self.grpc_workers < 2:
            raise ConfigError("bundle_cache and job_workers must be >= 1, grpc_workers >= 2")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics_port {self.metrics_port} is outside 0..65535")
        if self.max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be >= 1 (1: no batching), not {self.max_batch_size}")
        if not 0 <= self.batch_wait_ms <= 1000:
            raise ConfigError(f"batch_wait_ms must be within 0..1000, not {self.batch_wait_ms}")
        if not 0 <= self.mutation_wait_s <= 300:
            raise ConfigError(f"mutation_wait_s must be within 0..300 seconds, not {self.mutation_wait_s}")
        if self.token is not None and not self.token.strip():
            raise ConfigError("the token is blank: give a token, or none for no authentication")
        if self.token_file is not None:
            self.token = read_token_file(self.token_file)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("TLS needs both --tls-cert and --tls-key")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError("--tls-client-ca (mutual TLS) needs the server's own --tls-cert and --tls-key")
        for name in ("tls_cert", "tls_key", "tls_client_ca"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"--{name.replace('_', '-')}: no file {path}")
        if not is_loopback(self.host) and not self.insecure and (self.token is None or self.tls_cert is None):
            missing = " and ".join(
                w for w, gone in (("a token", self.token is None), ("TLS", self.tls_cert is None)) if gone
            )
            raise ConfigError(
                f"--host {self.host} listens beyond this machine without {missing}: anyone who reaches it could "
                "edit, roll back and delete versions, and a token would travel in clear text. Give --token-file "
                "(or $EDITLENS_TOKEN) and --tls-cert/--tls-key, or say --insecure if this network is trusted"
            )
        self.limits.check()

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def server_credentials(self):
        """gRPC server credentials for the TLS settings (mutual TLS with a client CA)."""
        import grpc

        ca = Path(self.tls_client_ca).read_bytes() if self.tls_client_ca is not None else None
        pair = (Path(self.tls_key).read_bytes(), Path(self.tls_cert).read_bytes())
        return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)
