"""One built world's folder: where each part of it lives, how each is read, and what counts as a world.

``editlens world build`` writes (``vlm/world/build.py``)::

    <root>/model/                      the world's model (a save_pretrained folder)
    <root>/images/*.png                every rendering of every entity
    <root>/world.json                  the world's description (entities, facts, relations, config)
    <root>/questions/<set>.json        train, heldout_paraphrase, heldout_image, text_fact, multi_constraint
    <root>/edit_cases/<split>.json     train, test (E-VQA records; image paths relative to <root>)
    <root>/summary.json                accuracies, build key, the model's fingerprint

and later work adds ``<root>/stream/images/`` (the edit stream's new entities, ``vlm/world/stream.py``) and
``<root>/visedit/adapter.safetensors`` (``editlens visedit train``'s default adapter).

``WorldFolder`` knows that layout once: the paths as properties, ``spec()`` (``world.json``, parsed once per
folder object), ``summary()``, ``edit_cases(split)``, ``questions(name)``, ``phrases()`` (the named-entity
phrases the causal trace corrupts constraints with) and ``world()`` (the ``World`` regenerated from its config).
A missing or unreadable part raises ``WorldFolderError`` (a ``ValueError``) that names the folder and says how
to get a world.

**Is a model the world's model?** ``WorldFolder.of_model(vlm_or_path)`` answers for the server and the CLI
(the causal trace's phrases, the default training world, the default statistics prompts). A model is a world's
only when it is the ``model/`` folder of a world folder whose ``summary.json`` records that model's fingerprint
(``vlm.loading.fingerprint_folder``: config plus weight headers and samples); the build writes that summary
last, from the model it just trained. A real checkpoint whose parent folder merely holds a ``world.json`` (or
a whole world beside it) is not taken for the world's, and neither is a world's model folder retrained or
replaced in place.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..home import worlds_dir

if TYPE_CHECKING:
    from .spec import World

QUESTION_SETS = ("train", "heldout_paraphrase", "heldout_image", "text_fact", "multi_constraint")
EDIT_SPLITS = ("train", "test")
STREAM_DIR = "stream"  # the edit stream's drawings: <root>/stream/images/<id>-<k>.png
BUILD_HINT = "run `editlens world build` (or give another world folder)"


class WorldFolderError(ValueError):
    """A folder is not a (built) world, or a part of it is missing or unreadable."""


def default_world_dir(seed: int = 0, family: str = "llava") -> Path:
    """Where ``editlens world build --seed N [--family F]`` puts its world by default:
    ``<home>/worlds/seed-N``, or ``seed-N-F`` for a family other than LLaVA."""
    return worlds_dir() / (f"seed-{seed}" if family == "llava" else f"seed-{seed}-{family}")


@dataclass(frozen=True)
class WorldFolder:
    """A world folder (``root``): its layout, its contents (read once per object) and what it is."""

    root: Path
    _cache: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).expanduser())

    @classmethod
    def default(cls, seed: int = 0, family: str = "llava") -> WorldFolder:
        """The world ``editlens world build --seed N [--family F]`` builds by default (see ``default_world_dir``)."""
        return cls(default_world_dir(seed, family))

    def __fspath__(self) -> str:
        return os.fspath(self.root)

    def __str__(self) -> str:
        return str(self.root)

    # ------------------------------------------------------------------------------------- layout
    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    @property
    def images_dir(self) -> Path:
        return self.root / "images"

    @property
    def world_json(self) -> Path:
        return self.root / "world.json"

    @property
    def summary_json(self) -> Path:
        return self.root / "summary.json"

    @property
    def questions_dir(self) -> Path:
        return self.root / "questions"

    @property
    def edit_cases_dir(self) -> Path:
        return self.root / "edit_cases"

    @property
    def stream_dir(self) -> Path:
        """The edit stream's drawings (``stream/images/``: image paths ``stream/images/<id>-<k>.png``)."""
        return self.root / STREAM_DIR

    @property
    def visedit_adapter(self) -> Path:
        """Where ``editlens visedit train`` puts this world's trained adapter by default."""
        return self.root / "visedit" / "adapter.safetensors"

    def questions_file(self, name: str = "train") -> Path:
        return self.questions_dir / f"{name}.json"

    def edit_cases_file(self, split: str = "test") -> Path:
        return self.edit_cases_dir / f"{split}.json"

    def image(self, rel: str | os.PathLike) -> Path:
        """An image path of a record (relative to the world folder) as a path."""
        return self.root / rel

    # -------------------------------------------------------------------------- what the folder is
    @staticmethod
    def is_world(path: str | os.PathLike) -> bool:
        """Whether ``path`` is a world folder: it holds a ``world.json``. (Whether a model is the world's model
        is ``of_model``'s question, decided by more than this.)"""
        return (Path(path) / "world.json").is_file()

    def is_built(self) -> bool:
        """Whether the folder holds a complete build: a readable ``summary.json`` and a model folder."""
        return self.summary() is not None and (self.model_dir / "config.json").is_file()

    def built_summary(self) -> dict[str, Any] | None:
        """The summary of a complete build, or None (what ``build_world`` reuses)."""
        return self.summary() if self.is_built() else None

    def require(self, *parts: Path, hint: str = BUILD_HINT) -> WorldFolder:
        """This folder, if it holds ``parts`` (default: ``world.json``, the model and the test edit cases);
        else a ``WorldFolderError`` saying which are missing and (``hint``) how to get a world."""
        parts = parts or (self.world_json, self.model_dir / "config.json", self.edit_cases_file("test"))
        missing = [str(p.relative_to(self.root) if p.is_relative_to(self.root) else p) for p in parts if not p.exists()]
        if missing:
            raise WorldFolderError(f"{self.root} holds no built world (no {', '.join(missing)}); {hint}")
        return self

    @classmethod
    def containing(cls, path: str | os.PathLike) -> WorldFolder | None:
        """The world folder ``path`` is or lies in (a world folder, a file or folder in it, or one a level
        deeper such as ``edit_cases/test.json``), or None."""
        path = Path(path).expanduser()
        for base in (path, path.parent, path.parent.parent):
            if cls.is_world(base):
                return cls(base)
        return None

    @classmethod
    def of_model(cls, model: Any, fingerprint: str | None = None) -> WorldFolder | None:
        """The world whose model ``model`` is (a loaded ``VLM``, or a model folder), or None (see the module
        docstring: the folder must be ``<world>/model`` and ``<world>/summary.json`` must record its
        fingerprint). ``fingerprint``: the model's, when known (a ``VLM`` carries its own)."""
        path = Path(getattr(model, "path", model)).expanduser()
        world = cls(path.parent)
        if path.name != world.model_dir.name or not world.world_json.is_file():
            return None
        summary = world.summary()
        recorded = summary.get("fingerprint") if isinstance(summary, dict) else None
        if not recorded:
            return None
        fingerprint = fingerprint or getattr(model, "fingerprint", None)
        if fingerprint is None:
            from ..loading import fingerprint_folder

            try:
                fingerprint = fingerprint_folder(path)
            except (OSError, ValueError):
                return None
        return world if recorded == fingerprint else None

    # ------------------------------------------------------------------------------------ contents
    def _read(self, path: Path) -> Any:
        key = str(path)
        if key not in self._cache:
            try:
                self._cache[key] = json.loads(path.read_text())
            except FileNotFoundError:
                raise WorldFolderError(
                    f"{path} is missing: {self.root} is not a built world folder; {BUILD_HINT}"
                ) from None
            except (OSError, json.JSONDecodeError) as exc:
                raise WorldFolderError(f"cannot read {path} ({exc}); {BUILD_HINT}") from None
        return self._cache[key]

    def spec(self) -> dict[str, Any]:
        """``world.json``: entities, facts, relations, templates and the generating config (parsed once)."""
        spec = self._read(self.world_json)
        if not isinstance(spec, dict) or not isinstance(spec.get("config"), dict):
            raise WorldFolderError(f"{self.world_json} is not a world's description (no config); {BUILD_HINT}")
        return spec

    def config(self) -> dict[str, Any]:
        """The ``WorldConfig`` the world was generated from, as a dict."""
        return self.spec()["config"]

    def summary(self) -> dict[str, Any] | None:
        """``summary.json`` (accuracies, build key, the model's fingerprint), or None when it is missing or
        unreadable."""
        try:
            summary = self._read(self.summary_json)
        except WorldFolderError:
            return None
        return summary if isinstance(summary, dict) else None

    def edit_cases(self, split: str = "test") -> list[dict[str, Any]]:
        """The E-VQA edit-case records of ``split`` (train or test); image paths relative to the folder."""
        cases = self._read(self.edit_cases_file(split))
        if not isinstance(cases, list) or not cases:
            raise WorldFolderError(f"{self.edit_cases_file(split)} holds no edit cases; {BUILD_HINT}")
        return cases

    def questions(self, name: str = "train") -> list[dict[str, Any]]:
        """The question set ``name`` (``QUESTION_SETS``): ``{question, answer, image, entity, relation, ...}``."""
        items = self._read(self.questions_file(name))
        if not isinstance(items, list):
            raise WorldFolderError(f"{self.questions_file(name)} holds no list of questions; {BUILD_HINT}")
        return items

    def phrases(self) -> list[str]:
        """The named-entity phrases of the world (every entity's name, bare and with "the"), the causal trace's
        candidate replacements for a constraint."""
        spec = self.spec()
        try:
            names = [e["name"] for e in spec.get("text_only_entities", []) + spec.get("entities", [])]
        except (KeyError, TypeError):
            raise WorldFolderError(f"{self.world_json} lists malformed entities; {BUILD_HINT}") from None
        return [p for n in names for p in (n, f"the {n}")]

    def world(self) -> World:
        """The ``World`` the folder was generated from (regenerated from ``world.json``'s config)."""
        from .spec import World, WorldConfig

        try:
            return World(WorldConfig(**self.config()))
        except TypeError as exc:
            raise WorldFolderError(f"{self.world_json} has a config this version cannot read ({exc})") from None


def world_phrases(where: str | os.PathLike | None) -> list[str]:
    """The phrases of the world ``where`` is or lies in (``WorldFolder.containing``), or [] when there is none
    or its description is unreadable; ``world.json`` is read once per version of the file (``EditRequest.from_case``
    asks for every case). For a model, ask ``WorldFolder.of_model`` instead."""
    world = WorldFolder.containing(where) if where is not None else None
    if world is None:
        return []
    try:
        st = world.world_json.stat()
    except OSError:
        return []
    return list(_phrases(str(world.root), st.st_mtime_ns, st.st_size))


@functools.lru_cache(maxsize=16)
def _phrases(root: str, mtime_ns: int, size: int) -> tuple[str, ...]:
    try:
        return tuple(WorldFolder(root).phrases())
    except WorldFolderError:
        return ()
