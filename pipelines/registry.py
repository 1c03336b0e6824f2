"""The one registry of pipeline kinds.

A pipeline kind is a class with a spec model and a ``run`` method (see
:class:`pipelines.pipeline.Pipeline`), registered with :func:`register`. The CLI, the
search runner and job submission look kinds up here and know none of them by name.
raysmith's own kinds live in the modules of :data:`BUILTIN_MODULES`; other packages add
theirs through the ``raysmith.pipelines`` entry-point group.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipelines.pipeline import Pipeline

BUILTIN_MODULES: tuple[str, ...] = ("pipelines.rl", "pipelines.classify", "pipelines.forgery", "pipelines.watermark",
                                   "pipelines.peco")
ENTRY_POINT_GROUP = "raysmith.pipelines"

_KINDS: dict[str, type["Pipeline"]] = {}
_loaded = False


def register(cls: type["Pipeline"]) -> type["Pipeline"]:
    """Class decorator: make ``cls`` the pipeline for ``cls.kind``."""
    kind = cls.kind
    existing = _KINDS.get(kind)
    if existing is not None and existing is not cls:
        raise ValueError(f"pipeline kind {kind!r} is already registered by {existing.__module__}.{existing.__name__}")
    _KINDS[kind] = cls
    return cls


def _load() -> None:
    global _loaded
    if _loaded:
        return
    for module in BUILTIN_MODULES:
        importlib.import_module(module)
    for point in entry_points(group=ENTRY_POINT_GROUP):
        try:
            register(point.load())
        except Exception as err:
            raise ImportError(f"pipeline kind plug-in {point.name!r} ({point.value}) failed to load: {err}") from err
    _loaded = True


def available_kinds() -> list[str]:
    _load()
    return sorted(_KINDS)


def get_pipeline(kind: str) -> "Pipeline":
    """An instance of the pipeline registered for ``kind`` (KeyError if none)."""
    _load()
    return _KINDS[kind]()
