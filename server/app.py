"""Starting and stopping the EditLens gRPC server.

``EditLensServer(config).start()`` binds the port at once (health: NOT_SERVING),
then loads the registry and the model in the background: the given model
folder, or the embedded world's tiny model, built on the first start when
absent. Once both are there the health service says SERVING; until then
every EditLens call answers UNAVAILABLE. Tests pass an already loaded ``vlm``
(and ``registry``) to skip the loading.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from concurrent import futures

import grpc
from editlens.v1 import editlens_pb2 as pb
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .config import ServerConfig
from .service import EditLensService
from .wire import service_handler

log = logging.getLogger("editlens.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["EditLens"].full_name  # "editlens.v1.EditLens"


def host_port(host: str, port: int) -> str:
    """``host:port`` as gRPC reads it: an IPv6 literal in brackets (``[::1]:50051``)."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class EditLensServer:
    """One gRPC server: the EditLens service, health and reflection, the model loaded in the background."""

    def __init__(self, config: ServerConfig, vlm=None, registry=None, say: Callable[[str], None] | None = None):
        config.check()
        self.config = config
        self._vlm, self._registry = vlm, registry
        self.say = say or (lambda msg: log.info(msg))
        self.service = EditLensService(config)
        self.health = health.HealthServicer()
        self.port: int | None = None
        self.metrics_port: int | None = None  # where /metrics is served (serve --metrics-port)
        self._server: grpc.Server | None = None
        self._loader: threading.Thread | None = None
        self._ready = threading.Event()
        self._stopped = threading.Event()
        self._done = threading.Event()

    @property
    def address(self) -> str:
        return host_port(self.config.host, self.port)

    def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)

    def start(self) -> str:
        """Bind and start serving (the model loads in the background); returns host:port."""
        cfg = self.config
        size = cfg.limits.max_message_bytes
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=cfg.grpc_workers, thread_name_prefix="editlens-rpc"),
            options=[
                ("grpc.max_receive_message_length", size),
                ("grpc.max_send_message_length", 64 << 20),
                ("grpc.so_reuseport", 0),
            ],
            maximum_concurrent_rpcs=cfg.max_concurrent_rpcs,
        )
        self._server.add_generic_rpc_handlers((service_handler(self.service),))  # undecodable: INVALID_ARGUMENT
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server)
        self._set_health(False)
        try:
            where = host_port(cfg.host, cfg.port)
            if cfg.tls:
                self.port = self._server.add_secure_port(where, cfg.server_credentials())
            else:
                self.port = self._server.add_insecure_port(where)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {where}: {exc}") from None
        if not self.port:
            raise OSError(f"cannot listen on {where} (in use?)")
        if self.service.metrics is not None:
            self.metrics_port = self.service.metrics.serve(cfg.metrics_host, cfg.metrics_port)
        self._server.start()
        self._loader = threading.Thread(target=self._load, name="editlens-loader", daemon=True)
        self._loader.start()
        return self.address

    def _load(self) -> None:
        try:
            self.service.set_loading("opening the registry")
            registry = self._registry
            if registry is None:
                from registry import Registry
                from vlm.home import registry_dir

                registry = Registry(
                    tracking_uri=self.config.registry_uri,
                    data_dir=self.config.registry_dir or registry_dir(),
                )
                registry.check()
            vlm = self._vlm
            if vlm is None:
                vlm = self._load_model()
            from editors import editor_names

            editor_names()  # every built-in editor registered before the server says SERVING
            self.service.set_ready(vlm, registry)
            self._set_health(True)
            self._ready.set()
            self.say(
                f"ready: model {vlm.path} (fingerprint {vlm.fingerprint}, {vlm.device}), "
                f"registry {registry.tracking_uri}"
            )
        except Exception as exc:
            log.error("loading failed: %s", exc, exc_info=not isinstance(exc, (OSError, ValueError)))
            self.service.set_failed(str(exc))
            self.say(f"error: the server cannot serve: {exc}")
            self._ready.set()

    def _loading(self, detail: str) -> None:
        self.service.set_loading(detail)
        self.say(detail)

    def _load_model(self):
        from vlm import load_vlm

        model = self.config.model
        if model is None:
            from vlm.world import WorldFolder, build_world

            if not WorldFolder.default(self.config.seed).is_built():
                self._loading("building the embedded world model (first start: a few minutes)")
            summary = build_world(seed=self.config.seed, stage=lambda m: self.say(f"world: {m}"))
            model = WorldFolder(summary["path"]).model_dir
        self._loading(f"loading the model {model}")
        return load_vlm(model, device=self.config.device, dtype=self.config.dtype)

    def wait_ready(self, timeout: float | None = None) -> bool:
        """True once the model is loaded (False if loading failed or timed out)."""
        self._ready.wait(timeout)
        return self.service.host is not None

    # -------------------------------------------- for benchmarks and code that embeds a server
    def _host(self):
        if self.service.host is None:
            raise RuntimeError("the server has not loaded its model yet (wait_ready)")
        return self.service.host

    def loaded_version(self, adapter: str, version: int):
        """Version ``version`` of ``adapter`` as this server serves it (a ``Bundle``: loaded and validated once)."""
        return self._host().versions.bundle(adapter, version)

    def unload_version(self, adapter: str, version: int) -> None:
        """Forget a loaded version: the next request for it loads it from the registry again (a cold switch)."""
        self._host().versions.bundles.drop(adapter, version)

    @property
    def batcher(self):
        """The generation batcher (its ``stats()``), or None when batching is off or the model is not loaded."""
        return self.service.host.batcher if self.service.host is not None else None

    def stop(self, grace: float | None = 2.0) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._set_health(False)
        self.service.close()
        if self.service.metrics is not None:
            self.service.metrics.close()
        try:
            if self._server is not None:
                self._server.stop(grace).wait()
            # a job past its last cancellation point (registering a version) is let finish
            deadline = time.monotonic() + 30
            while (self.service.jobs.running or self.service.diagnoses.running) and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            self._done.set()

    def wait_for_termination(self) -> None:
        self._done.wait()


def serve(config: ServerConfig, say: Callable[[str], None] = print) -> int:
    """Run until SIGINT/SIGTERM. Prints ``listening on HOST:PORT`` (flushed) once bound."""
    server = EditLensServer(config, say=say)
    address = server.start()
    say(f"listening on {address}")
    if server.metrics_port is not None:
        say(f"metrics on http://{host_port(config.metrics_host, server.metrics_port)}/metrics")

    def stop(signum, _frame):
        say(f"stopping ({signal.Signals(signum).name})")
        threading.Thread(target=server.stop, daemon=True).start()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    server.wait_for_termination()
    return 0
