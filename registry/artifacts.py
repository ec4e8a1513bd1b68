"""The artifact side of the registry: checksums, the download cache and verification against the store.

A version's files live in the artifact folder of its MLflow run, each with its sha256 in the version's
tags. ``sha256_file`` computes those checksums; ``ArtifactFiles`` holds the ``Registry`` methods that fetch
files and check them (``download`` into ``<data_dir>/cache/<adapter>/<version>``, ``verify_stored``,
the lazily loaded manifest), clear the cache and delete a run with its artifacts. Kept apart from
``store.py`` because what is on disk, and whether it is intact, is a concern of its own; the lifecycle
there only calls these methods.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import uuid
from pathlib import Path

from .errors import RegistryError
from .names import MANIFEST, check_adapter_name, check_version_number

log = logging.getLogger(__name__)

_CACHE_MARKER = ".editlens-version.json"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """The sha256 hex digest of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


class ArtifactFiles:
    """The files of ``Registry`` (a mixin): its constructor sets ``_client``, ``tracking_uri``, ``cache_dir``,
    ``_manifests``, ``_dl_locks`` and ``_dl_guard``, which these methods use."""

    def clear_cache(self, adapter: str | None = None, version: int | None = None) -> None:
        """Remove downloaded copies (all, one adapter's, or one version's)."""
        target = self.cache_dir
        if adapter is not None:
            target = target / check_adapter_name(adapter)
            if version is not None:
                target = target / str(check_version_number(version))
        shutil.rmtree(target, ignore_errors=True)

    def _fetch(self, source: str, name: str, dst: Path, adapter: str, version: int, expected: str) -> Path:
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        label = f"adapter '{adapter}' version {version}"
        try:
            repo = get_artifact_repository(source, tracking_uri=self.tracking_uri)
            local = Path(repo.download_artifacts(name, dst_path=str(dst)))
        except Exception as e:
            raise RegistryError(
                f"{label}: file '{name}' is missing or unreadable in the artifact store ({type(e).__name__})"
            ) from e
        if not local.is_file():
            raise RegistryError(f"{label}: file '{name}' is missing in the artifact store")
        got = sha256_file(local)
        if got != expected:
            raise RegistryError(
                f"{label}: file '{name}' is corrupted (sha256 {got[:12]}..., expected {expected[:12]}...)"
            )
        return local

    def verify_stored(self, adapter: str, version: int) -> None:
        """Fetch the version's files from the artifact store again and check each against its checksum, as a
        replica that never downloaded them would (the local cache is not consulted); RegistryError naming the
        first missing or corrupted file."""
        check_adapter_name(adapter)
        check_version_number(version)
        mv = self._model_version(adapter, version)
        sha = self._info(mv).sha256
        if not sha:
            raise RegistryError(f"adapter '{adapter}' version {version} has no recorded checksums")
        with tempfile.TemporaryDirectory(prefix="editlens-verify-") as tmp:
            for name in sorted(sha):
                self._fetch(mv.source, name, Path(tmp), adapter, version, sha[name])

    def stored_bytes(self, adapter: str) -> int:
        """The bytes the artifact store holds for the adapter: every file of every version, as the store lists
        them (what a lineage costs in storage)."""
        check_adapter_name(adapter)
        total = 0
        for mv in self._search_versions(adapter):
            if mv.run_id:
                listed = self._call(f"adapter '{adapter}'", lambda mv=mv: self.client.list_artifacts(mv.run_id))
                total += sum(int(f.file_size or 0) for f in listed if not f.is_dir)
        return total

    def _cached_ok(self, folder: Path, run_id: str, sha: dict[str, str]) -> bool:
        try:
            marker = json.loads((folder / _CACHE_MARKER).read_text())
        except (OSError, ValueError):
            return False
        if marker.get("run_id") != run_id or marker.get("sha256") != sha:
            return False
        return all((folder / n).is_file() and sha256_file(folder / n) == h for n, h in sha.items())

    def download(self, adapter: str, version: int) -> Path:
        """A local folder with the version's files, cached in ``<data_dir>/cache/<adapter>/<version>``.
        Every file's sha256 is checked against the registry (also for cached copies); a missing
        or corrupted file raises RegistryError naming it, and no partial folder is left."""
        check_adapter_name(adapter)
        check_version_number(version)
        mv = self._model_version(adapter, version)
        info = self._info(mv)
        sha = info.sha256
        if not sha:
            raise RegistryError(
                f"adapter '{adapter}' version {version} has no recorded checksums (not created by EditLens)"
            )
        final = self.cache_dir / adapter / str(version)
        with self._dl_guard:
            lock = self._dl_locks.setdefault((adapter, version), threading.Lock())
        with lock:
            if final.is_dir() and self._cached_ok(final, mv.run_id or "", sha):
                return final
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = final.parent / f".tmp-{version}-{uuid.uuid4().hex}"
            try:
                tmp.mkdir()
                for name in sorted(sha):
                    self._fetch(mv.source, name, tmp, adapter, version, sha[name])
                for extra in tmp.iterdir():
                    if extra.name not in sha:
                        shutil.rmtree(extra) if extra.is_dir() else extra.unlink()
                (tmp / _CACHE_MARKER).write_text(json.dumps({"run_id": mv.run_id or "", "sha256": sha}))
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            return final

    def _load_manifest(self, adapter: str, version: int, run_id: str, source: str, sha: dict[str, str]) -> dict:
        key = (adapter, version, run_id)
        if key in self._manifests:
            return self._manifests[key]
        expected = sha.get(MANIFEST)
        if expected is None:
            raise RegistryError(f"adapter '{adapter}' version {version} has no manifest checksum")
        cached = self.cache_dir / adapter / str(version) / MANIFEST
        if cached.is_file() and sha256_file(cached) == expected:
            text = cached.read_text(encoding="utf-8")
        else:
            with tempfile.TemporaryDirectory(prefix="editlens-manifest-") as tmp:
                text = self._fetch(source, MANIFEST, Path(tmp), adapter, version, expected).read_text(encoding="utf-8")
        manifest = json.loads(text)
        self._manifests[key] = manifest
        return manifest

    def _delete_run(self, run_id: str) -> None:
        """Delete a run's artifacts and the run (best effort for the artifacts)."""
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        c = self._client
        try:
            uri = c.get_run(run_id).info.artifact_uri
            get_artifact_repository(uri, tracking_uri=self.tracking_uri).delete_artifacts()
        except Exception as e:
            log.debug("could not delete the artifacts of run %s: %s", run_id, e)
        c.delete_run(run_id)
