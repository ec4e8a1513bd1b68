"""The consistency check: what a crash can leave behind in the registry, found and (with ``repair``) removed.

``ConsistencyCheck.check_consistency`` verifies every version's files against their checksums and every
alias against the verified versions, and finds the runs no version references (a registration that died
between logging its artifacts and creating its version). Kept apart from ``store.py`` because it is an
operator's audit over the whole registry (``editlens registry check``), not part of a version's lifecycle.
"""

from __future__ import annotations

import time
from typing import Any

from .errors import RegistryError


class ConsistencyCheck:
    """The consistency check of ``Registry`` (a mixin): it uses the registry's reading, download and run
    deletion methods."""

    def check_consistency(self, repair: bool = False, grace_seconds: float = 600.0) -> dict[str, Any]:
        """What a crash can leave, checked: every version's files verify against its checksums (downloaded
        as ``download`` does), every alias points at a verified version, and no run of the EditLens experiment
        is an orphan (artifacts logged by a registration that died before its version was made). Orphans
        older than ``grace_seconds`` (a younger one may be another replica's registration in flight) are
        deleted with ``repair``. Returns the findings: ``versions`` checked, ``bad_versions``,
        ``bad_aliases``, ``orphan_runs`` (found) and ``deleted_runs``."""
        out: dict[str, Any] = {
            "versions": 0,
            "bad_versions": [],
            "bad_aliases": [],
            "orphan_runs": [],
            "deleted_runs": [],
        }
        referenced: set[str] = set()
        for adapter in self.adapters():
            verified: set[int] = set()
            for mv in self._search_versions(adapter):
                if mv.run_id:
                    referenced.add(mv.run_id)
                out["versions"] += 1
                try:
                    self.clear_cache(adapter, int(mv.version))  # the store's copy, not a cached one, is checked
                    self.download(adapter, int(mv.version))
                    verified.add(int(mv.version))
                except RegistryError as e:
                    out["bad_versions"].append({"adapter": adapter, "version": int(mv.version), "error": str(e)})
            for alias, v in (self._registered_model(adapter).aliases or {}).items():
                if int(v) not in verified:
                    out["bad_aliases"].append({"adapter": adapter, "alias": alias, "version": int(v)})
        now_ms = time.time() * 1000
        from mlflow.entities import ViewType

        runs = self._call(
            "runs",
            lambda: self.client.search_runs(
                [self._experiment()], max_results=50_000, run_view_type=ViewType.ACTIVE_ONLY
            ),
        )
        for run in runs:
            if run.info.run_id in referenced:
                continue
            age = (now_ms - float(run.info.start_time or now_ms)) / 1000
            out["orphan_runs"].append({"run_id": run.info.run_id, "status": run.info.status, "age_s": round(age, 1)})
            if repair and age >= grace_seconds:
                self._delete_run(run.info.run_id)
                out["deleted_runs"].append(run.info.run_id)
        return out
