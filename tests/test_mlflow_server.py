"""Replicas on a real MLflow tracking server: `mlflow server` (its own backend store — sqlite, and PostgreSQL
where the machine has it — and its artifacts, served through it, in a temporary folder or in an S3 bucket of
a moto server) and two `editlens serve --registry-uri http://...` processes, each with its own
`--registry-dir`. An edit on one is served by the other, a rollback on the other reaches the first, and the
MLflow server restarted mid-run leaves both serving their cached versions and recovering by themselves."""

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from test_service_e2e import TOKEN, ServeProcess

from client.sdk import EditLensClient

pytestmark = [
    pytest.mark.slow,  # a tracking server and two `editlens serve` processes per backend and artifact store
    pytest.mark.skipif(
        subprocess.run([sys.executable, "-c", "import mlflow.server"], capture_output=True).returncode != 0,
        reason="the full mlflow package (pip install -e '.[server]') brings `mlflow server`",
    ),
]
TTL = 0.3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Postgres:
    """A throwaway PostgreSQL cluster in a temporary folder on 127.0.0.1 (run as ``nobody`` when the tests run as root,
    which initdb refuses), trust authentication, stopped by ``stop``."""

    def __init__(self):
        import tempfile

        # its own folder: the unprivileged user cannot enter pytest's (mode 700)
        self.folder, self.port = Path(tempfile.mkdtemp(prefix="editlens-pg-")), _free_port()
        self.as_user = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            shutil.chown(self.folder, "nobody")
        self._run("initdb", "-D", str(self.folder / "data"), "-A", "trust", "-U", "editlens")
        opts = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1"
        self._run("pg_ctl", "-D", str(self.folder / "data"), "-l", str(self.folder / "log"), "-o", opts, "-w", "start")
        # the driver the [server] extra brings, named: SQLAlchemy 2.1 takes a bare postgresql:// for psycopg 3
        self.uri = f"postgresql+psycopg2://editlens@127.0.0.1:{self.port}/postgres"

    def _run(self, *cmd):
        subprocess.run([*self.as_user, *cmd], check=True, capture_output=True, timeout=120)

    def stop(self):
        try:
            self._run("pg_ctl", "-D", str(self.folder / "data"), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)


def _postgres_available() -> str | None:
    """Why PostgreSQL cannot back the test here, or None when it can."""
    if not all(shutil.which(t) for t in ("initdb", "pg_ctl")):
        return "no PostgreSQL server binaries (initdb, pg_ctl) on this machine"
    if os.geteuid() == 0 and not shutil.which("runuser"):
        return "running as root without runuser (initdb refuses root)"
    if subprocess.run([sys.executable, "-c", "import psycopg2"], capture_output=True).returncode != 0:
        return "no psycopg2 (pip install -e '.[server]')"
    return None


class MotoS3:
    """moto's S3 server, in this process (a thread) on 127.0.0.1 and a free port, for the tracking server's
    artifacts: ``bucket`` makes a fresh bucket, ``env`` is what a process needs to reach it, ``keys`` lists a
    bucket's objects."""

    CREDENTIALS = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }

    def __init__(self):
        import boto3
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        starting = threading.Thread(target=self.server.start, daemon=True)  # start() waits unbounded
        starting.start()
        starting.join(30)
        if starting.is_alive():
            raise AssertionError("the moto server did not start within 30 s")
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self.env = {"MLFLOW_S3_ENDPOINT_URL": self.endpoint, **self.CREDENTIALS}
        self.s3 = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.CREDENTIALS["AWS_DEFAULT_REGION"],
            aws_access_key_id=self.CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        )

    def bucket(self) -> str:
        name = f"editlens-{uuid.uuid4().hex[:12]}"
        self.s3.create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str) -> list[str]:
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def stop(self):
        self.server.stop()


@pytest.fixture(scope="module")
def moto_s3():
    """One moto server for the module's S3 cases; skips them where moto is not installed (the test extra)."""
    for module in ("moto.server", "boto3"):
        pytest.importorskip(
            module, reason="the S3 artifact store needs moto[server] and boto3 (pip install -e '.[test]')"
        )
    moto = MotoS3()
    try:
        yield moto
    finally:
        moto.stop()


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with the ``store`` backend (default: sqlite in ``folder``) and served
    artifacts in ``artifacts`` (default: a folder in ``folder``; an ``s3://`` destination reads ``env``)."""

    def __init__(
        self, folder: Path, port: int, store: str | None = None, artifacts: str | None = None, env: dict | None = None
    ):
        self.folder, self.port, self.proc = folder, port, None
        self.store = store or f"sqlite:///{folder / 'mlflow.db'}"
        self.artifacts = artifacts or str(folder / "artifacts")
        self.env = env or {}
        self.uri = f"http://127.0.0.1:{port}"

    def start(self):
        exe = Path(sys.executable).parent / "mlflow"
        self.log = open(self.folder / "mlflow-server.log", "ab")
        self.proc = subprocess.Popen(
            [
                str(exe),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
                "--backend-store-uri",
                self.store,
                "--artifacts-destination",
                self.artifacts,
                "--serve-artifacts",
            ],
            stdout=self.log,
            stderr=self.log,
            env={**os.environ, "MLFLOW_ENABLE_TELEMETRY": "false", **self.env},
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise AssertionError(
            f"mlflow server did not come up: {(self.folder / 'mlflow-server.log').read_text()[-2000:]}"
        )

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc is not None:
            self.log.close()


def _eventually(fn, timeout=30.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = fn()
            if got:
                return got
        except Exception:
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError("never happened")
        time.sleep(0.2)


# the artifact store is independent of the backend store: S3 is tested on sqlite only (a fourth case, PostgreSQL
# with S3, would add two minutes to the suite and test nothing the other three do not)
@pytest.mark.parametrize(("store", "artifacts"), [("sqlite", "folder"), ("sqlite", "s3"), ("postgresql", "folder")])
def test_two_replicas_on_a_real_mlflow_server(
    store, artifacts, insertion_case, test_cases, world_dir, tmp_path, request
):
    s3 = bucket = None
    if artifacts == "s3":
        s3 = request.getfixturevalue("moto_s3")
    postgres = None
    if store == "postgresql":
        why = _postgres_available()
        if why:
            pytest.skip(why)
        postgres = Postgres()
    try:
        if s3 is not None:
            bucket = s3.bucket()
        mlflow = MlflowServer(
            tmp_path,
            _free_port(),
            postgres.uri if postgres else None,
            artifacts=f"s3://{bucket}/editlens" if s3 else None,
            env=s3.env if s3 else None,
        )
        versions = _replicas(mlflow, insertion_case, test_cases, world_dir, tmp_path)
    finally:
        if postgres is not None:
            postgres.stop()
    if s3 is not None:  # the versions' files went to the bucket, none to a local folder of the tracking server
        keys = s3.keys(bucket)
        for v in versions:
            names = [n for n in v.files if n.endswith(".safetensors")]
            assert names, v.files
            for name in names:
                assert any(k.startswith("editlens/") and k.endswith(f"/artifacts/{name}") for k in keys), (name, keys)
        assert len({k.split("/artifacts/")[0] for k in keys if k.endswith(".safetensors")}) >= len(versions), keys
        assert not list((tmp_path / "artifacts").rglob("*.safetensors"))


def _replicas(mlflow, insertion_case, test_cases, world_dir, tmp_path):
    mlflow.start()
    extra = ["--registry-uri", mlflow.uri, "--live-ttl", str(TTL)]
    a = ServeProcess(tmp_path / "a", tmp_path / "a.log", extra=extra)
    b = ServeProcess(tmp_path / "b", tmp_path / "b.log", extra=extra)
    # the first edit's answer is checked on both replicas: a case whose MultEdit edit answers (conftest.py)
    first = dict(insertion_case, alt=insertion_case["ground_truth"])
    second = next(c for c in test_cases if c["entity"] != first["entity"])
    try:
        with EditLensClient(a.address, token=TOKEN) as la, EditLensClient(b.address, token=TOKEN) as lb:
            la.wait_ready(120), lb.wait_ready(120)
            img1, img2 = world_dir / first["image"], world_dir / second["image"]
            before = lb.generate(img1, first["src"], base=True).text
            v1 = la.edit(
                img1, first["src"], first["constraint"], first["alt"], adapter="shared", editor="multedit", layer=0
            )
            # an edit on A is served by B within the live-cache time
            got = _eventually(
                lambda: (g := lb.generate(img1, first["src"], adapter="shared")).served.version == v1.version and g
            )
            assert got.text == first["alt"] != before
            v2 = lb.edit(
                img2, second["src"], second["constraint"], second["alt"], adapter="shared", editor="multedit", layer=0
            )
            assert v2.parent == v1.version
            _eventually(lambda: la.generate(img2, second["src"], adapter="shared").served.version == v2.version)
            # a rollback on B reaches A
            lb.rollback(adapter="shared")
            _eventually(lambda: la.generate(img1, first["src"], adapter="shared").served.version == v1.version)
            # the MLflow server goes away: both replicas keep serving the version they have
            mlflow.stop()
            time.sleep(2 * TTL)
            for lens in (la, lb):
                g = lens.generate(img1, first["src"], adapter="shared")
                assert g.served.version == v1.version and g.text == first["alt"]
            # ... and recover by themselves when it is back (same port, same store)
            mlflow.start()
            la.promote(v2.version, adapter="shared")
            _eventually(lambda: lb.generate(img2, second["src"], adapter="shared").served.version == v2.version, 60)
            return v1, v2
    finally:
        a.stop(), b.stop(), mlflow.stop()
