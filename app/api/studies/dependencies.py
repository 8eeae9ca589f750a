"""Lookups that can 404, done once here so no route repeats them; the plot cache."""

import threading
import uuid
from collections import OrderedDict
from typing import Annotated

from fastapi import Depends, Request

from app.api.auth import CallerDep
from app.api.dependencies import SessionDep
from app.api.studies import service
from app.core.models import Study


def study_from_path(study_id: uuid.UUID, session: SessionDep, caller: CallerDep) -> Study:
    return service.get_study(session, study_id, caller)


StudyDep = Annotated[Study, Depends(study_from_path)]


class PlotCache:
    """Rendered plots of ended studies, least recently used first out. A study that has ended
    no longer changes, so its plots are drawn once; a running study's are drawn each time."""

    def __init__(self, size: int = 128) -> None:
        self.size = size
        self._entries: OrderedDict[tuple[object, ...], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[object, ...]) -> bytes | None:
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
            return found

    def put(self, key: tuple[object, ...], png: bytes) -> None:
        with self._lock:
            self._entries[key] = png
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)


def get_plot_cache(request: Request) -> PlotCache:
    # One per application, made on first use (nothing is built at import time).
    state = request.app.state
    with _cache_lock:
        if getattr(state, "study_plot_cache", None) is None:
            state.study_plot_cache = PlotCache()
    cache: PlotCache = state.study_plot_cache
    return cache


_cache_lock = threading.Lock()
PlotCacheDep = Annotated[PlotCache, Depends(get_plot_cache)]
