"""Which version serves a request: the live-alias cache and version resolution, in one place.

* ``live_version(adapter)``: the adapter's live version number, looked up in
  the registry at most once per ``live_ttl`` seconds (a promote or rollback
  made on another replica reaches this one within that time; changes made
  through this server are seen at once: ``forget`` drops the entry). An
  adapter that does not exist is cached as such too, so the default adapter
  before its first edit costs no registry call per request. While the registry
  is unavailable (an MLflow server restarting) the version last seen live
  keeps serving, and the lookup is tried again after each TTL.
* ``resolve(ref)``: an ``AdapterRef`` (adapter + version, alias, base or
  nothing: the live alias) to the ``Served`` message and the ``Bundle`` to
  attach, resolved once per request so an answer never mixes two versions.
* ``bundle(adapter, version)``: the validated, attachable version, through the
  ``BundleCache`` (versions are immutable; a deleted one is dropped).
* a delta version (``bundles``) loads on its parent: from the nearest version
  of its lineage that is loaded (or stored whole), down, one delta at a time;
  ``manifest(info)`` is its manifest with every edit of the lineage, as a
  version stored whole records them (kept per version: versions are immutable).
* ``lookup(editor, adapter, version)``: one editor's edit set of a version
  (VisEdit finds its trained adapter this way, ``editors.EditContext``).
* ``reverify()``: every ``reverify_s`` seconds (a background thread) the
  files of each version held in memory — and of every version of its
  lineage, for a delta version — are fetched from the artifact store again
  and checked (``Registry.verify_stored``); a version whose stored files, or
  whose ancestors' files, fail is dropped and refused (FAILED_PRECONDITION
  naming the file, and the ancestor) until they verify again, so a server
  that loaded a version before its files were damaged answers as a replica
  that never loaded it does.
"""

from __future__ import annotations

import logging
import threading
import time

from editlens.v1 import editlens_pb2 as pb

from registry import NotFoundError, Registry, VersionInfo, check_adapter_name
from registry import UnavailableError as RegistryUnavailableError

from .bundles import Bundle, BundleCache, BundleError, lineage_edits, load_lineage
from .errors import invalid, not_found, precondition

log = logging.getLogger(__name__)
_MISSING = object()  # the adapter does not exist (cached like a version number)


class Versions:
    """Version resolution, the live-alias cache and the bundle cache of one server."""

    def __init__(
        self,
        registry: Registry,
        vlm,
        default_adapter: str,
        live_ttl: float,
        cache_size: int,
        reverify_s: float = 0.0,
    ):
        self.registry, self.vlm = registry, vlm
        self.default_adapter = default_adapter
        self.live_ttl = live_ttl
        self.bundles = BundleCache(cache_size)
        self._live: dict[str, tuple[object, float]] = {}
        self._lock = threading.Lock()
        self._damaged: dict[tuple[str, int], str] = {}  # versions whose stored files failed: why
        self._stop = threading.Event()
        self._edits: dict[tuple[str, int], list[dict]] = {}  # a version's edits, its lineage's included
        self._parents: dict[tuple[str, int], int | None] = {}  # each version's delta_of, once read
        if reverify_s > 0:
            threading.Thread(
                target=self._reverifying, args=(reverify_s,), name="editlens-reverify", daemon=True
            ).start()

    # ------------------------------------------------------ stored files
    def _reverifying(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                self.reverify()
            except Exception as exc:  # never let the loop die; the next round tries again
                log.warning("re-verifying the loaded versions failed: %s", exc)

    def reverify(self) -> None:
        """Check the stored files of every version in memory — of its whole lineage, for a delta version: the
        versions it was composed from, which are not kept in memory — and of those found damaged (which may have
        been repaired); drop and refuse the versions whose files, or whose ancestors' files, fail."""
        verdicts: dict[tuple[str, int], str | None] = {}  # this round's checks: None (verified) or why not
        for adapter, version in sorted(set(self.bundles.keys()) | set(self._damaged)):
            try:
                why = self._lineage_failure(adapter, version, verdicts)
            except NotFoundError:  # deleted meanwhile
                self.bundles.drop(adapter, version)
                self._damaged.pop((adapter, version), None)
                continue
            except RegistryUnavailableError:
                return  # the registry is down: keep serving what was verified; ask again next round
            if why is not None:
                if (adapter, version) not in self._damaged:
                    log.error("adapter '%s' version %s: %s", adapter, version, why)
                self._damaged[(adapter, version)] = why
                self.bundles.drop(adapter, version)
            elif self._damaged.pop((adapter, version), None) is not None:
                log.info("adapter '%s' version %s: its stored files verify again", adapter, version)

    def _lineage_failure(self, adapter: str, version: int, verdicts: dict[tuple[str, int], str | None]) -> str | None:
        """Why ``version`` cannot be served from its stored files (its own fail, or those of a version of its
        lineage, which is then refused as well), or None; each version is fetched once per round (``verdicts``)."""
        current: int | None = version
        while current is not None:
            key = (adapter, current)
            if key not in verdicts:
                try:
                    self.registry.verify_stored(adapter, current)
                    verdicts[key] = None
                except RegistryUnavailableError:
                    raise
                except NotFoundError:
                    if current == version:
                        raise
                    verdicts[key] = f"version {current} is missing"  # deletion refuses a version deltas build on
                except Exception as exc:
                    verdicts[key] = str(exc)
            why = verdicts[key]
            if why is not None:
                if current == version:
                    return why
                self._damaged[key] = why  # the ancestor is refused too, and re-checked each round
                return f"it builds on version {current}, whose stored files fail: {why}"
            current = self._parent(adapter, current)
        return None

    def _parent(self, adapter: str, version: int) -> int | None:
        """The version ``version`` is a delta of (None: stored whole); versions are immutable, so it is kept."""
        key = (adapter, version)
        with self._lock:
            if key in self._parents:
                return self._parents[key]
        parent = self.registry.version(adapter, version).delta_of
        with self._lock:
            self._parents[key] = parent
        return parent

    def close(self) -> None:
        self._stop.set()

    def adapter_name(self, name: str) -> str:
        """``name`` checked (INVALID_ARGUMENT if malformed), or the default adapter when empty."""
        return check_adapter_name(name or self.default_adapter)

    # ------------------------------------------------------------ live alias
    def _live_entry(self, adapter: str):
        now = time.monotonic()
        with self._lock:
            hit = self._live.get(adapter)
        if hit is not None and now - hit[1] < self.live_ttl:
            return hit[0]
        try:
            value = self.registry.live_version_number(adapter)
        except NotFoundError:
            value = _MISSING
        except RegistryUnavailableError:
            if hit is None:
                raise
            # the registry (an MLflow server) is down: keep serving the version last seen live; the next
            # lookup after the TTL asks again, so the server recovers by itself when the registry is back
            log.warning("the registry is unavailable; adapter '%s' keeps its last live version", adapter)
            with self._lock:
                self._live[adapter] = (hit[0], now)
            return hit[0]
        with self._lock:
            self._live[adapter] = (value, now)
        return value

    def live_version(self, adapter: str) -> int | None:
        """The live version number (None: the adapter has no live version); NOT_FOUND for no such adapter."""
        value = self._live_entry(adapter)
        if value is _MISSING:
            raise not_found(f"adapter '{adapter}' not found")
        return value

    def known_live(self) -> dict[str, int | None]:
        """Each adapter's live version as last looked up (no registry call; for the metrics)."""
        with self._lock:
            return {a: v for a, (v, _) in self._live.items() if v is not _MISSING}

    def live_info(self, adapter: str) -> VersionInfo | None:
        """The live version, read fresh (what a new edit builds on); None when there is none."""
        try:
            return self.registry.live(adapter)
        except NotFoundError:
            return None

    def forget(self, adapter: str) -> None:
        """This server changed the adapter's live version: read it again now (so that it is known should the
        registry become unavailable later), or expire the cached one if the registry cannot be read."""
        now = time.monotonic()
        try:
            value = self.registry.live_version_number(adapter)
        except NotFoundError:
            value = _MISSING
        except RegistryUnavailableError:
            with self._lock:
                hit = self._live.get(adapter)
                if hit is not None:
                    self._live[adapter] = (hit[0], float("-inf"))  # stale: asked again at the next lookup
            return
        with self._lock:
            self._live[adapter] = (value, now)

    def dropped(self, adapter: str, version: int) -> None:
        """A version was deleted: forget its bundle and the live alias."""
        self.bundles.drop(adapter, version)
        self.forget(adapter)

    # -------------------------------------------------------------- bundles
    def bundle(self, adapter: str, version: int, info: VersionInfo | None = None) -> Bundle:
        """Version ``version`` of ``adapter``, loaded and validated once (FAILED_PRECONDITION when unusable)."""
        damaged = self._damaged.get((adapter, version))
        if damaged is not None:
            raise BundleError(f"adapter '{adapter}' version {version} cannot be served: {damaged}")
        return self.bundles.get(adapter, version, lambda: self._load(adapter, version, info))

    def _load(self, adapter: str, version: int, info: VersionInfo | None) -> Bundle:
        """The version loaded: a delta version on its lineage, from the nearest ancestor that is loaded or
        stored whole, down (the ancestors loaded on the way are not kept: the cache holds what is asked for)."""

        def loaded(ancestor: int) -> Bundle | None:
            damaged = self._damaged.get((adapter, ancestor))
            if damaged is not None:
                raise BundleError(f"adapter '{adapter}' version {version} builds on version {ancestor}: {damaged}")
            return self.bundles.peek(adapter, ancestor)

        return load_lineage(self.registry, self.vlm, info or self.registry.version(adapter, version), loaded)

    def manifest(self, info: VersionInfo) -> dict:
        """``info``'s manifest with every edit of its lineage in ``edits`` (a delta version records only its own),
        each naming the version that added it."""
        manifest = info.manifest
        if manifest.get("delta_of") is None:
            return manifest
        return {**manifest, "edits": self._lineage_edits(info)}

    def _lineage_edits(self, info: VersionInfo) -> list[dict]:
        def known(version: int) -> list[dict] | None:
            with self._lock:
                return self._edits.get((info.adapter, version))

        def keep(version: int, edits: list[dict]) -> None:
            with self._lock:
                self._edits[(info.adapter, version)] = edits
                while len(self._edits) > 4 * max(1, self.bundles.size):
                    self._edits.pop(next(iter(self._edits)))

        return lineage_edits(self.registry, info, known, keep)

    def lookup(self, editor: str, adapter: str, version: int):
        """The edit set of ``editor`` in ``adapter``'s ``version`` (0: live) and that version's number."""
        adapter = self.adapter_name(adapter)
        if not version:
            version = self.live_version(adapter)
            if version is None:
                raise not_found(f"adapter '{adapter}' has no live version; name the version")
        edit_set = self.bundle(adapter, version).edit_sets.get(editor)
        if edit_set is None:
            raise precondition(f"adapter '{adapter}' version {version} holds no {editor} edit set")
        return edit_set, version

    # ------------------------------------------------------------ requests
    def resolve(self, ref: pb.AdapterRef | None) -> tuple[pb.Served, Bundle | None]:
        """The version a request uses (resolved once) and its bundle (None: the base model)."""
        explicit = bool(ref is not None and ref.adapter)
        adapter = self.adapter_name(ref.adapter if ref is not None else "")
        which = ref.WhichOneof("ref") if ref is not None else None
        if which == "base" and ref.base:  # base: false is no choice at all: the live version, as if unset
            return pb.Served(), None
        if which == "version":
            if ref.version < 1:
                raise invalid("a version number is >= 1")
            return pb.Served(adapter=adapter, version=ref.version), self.bundle(adapter, ref.version)
        if which == "alias" and ref.alias != "live":
            info = self.registry.version(adapter, ref.alias)
            return pb.Served(adapter=adapter, version=info.version, alias=ref.alias), self.bundle(
                adapter, info.version, info
            )
        live = self._live_entry(adapter)
        if live is _MISSING:
            if explicit:
                raise not_found(f"adapter '{adapter}' not found")
            return pb.Served(), None  # the default adapter has no version yet: the base model answers
        if live is None:
            if which == "alias":
                raise not_found(f"adapter '{adapter}' has no alias 'live'")
            return pb.Served(), None
        return pb.Served(adapter=adapter, version=live, alias="live"), self.bundle(adapter, live)
