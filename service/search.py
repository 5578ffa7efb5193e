"""Collection search for one task's model in the service: export.search.StoreSearch, timed and counted."""

from __future__ import annotations

import logging

import numpy as np

from export.runtime import Bundle
from export.search import Results, SearchUnavailable, StoreSearch
from export.store import EmbeddingStore
from service.metrics import Metrics

log = logging.getLogger(__name__)


class Searcher:
    """A task's StoreSearch over its space's store, with the search stages timed and the rows scanned counted."""

    def __init__(self, bundle: Bundle, store: EmbeddingStore, metrics: Metrics) -> None:
        self.search = StoreSearch(bundle, store)
        self.metrics = metrics
        self.catch_up()
        head, parts = self.search.head, self.search.parts
        log.info(
            "%s search: %d images, %.1f MB of image parts in memory (%d bytes each), %s, %d worker(s)",
            bundle.task,
            len(parts),
            parts.nbytes / 1e6,
            head.part_bytes,
            head.provider,
            head.workers,
        )

    def catch_up(self) -> int:
        with self.metrics.stage("search_parts"):
            return self.search.catch_up()

    def run(self, text: np.ndarray, wanted: str, k: int, **filters) -> Results:
        """StoreSearch.run in a worker thread; BadQuery for an answer or label the model does not have."""
        self.catch_up()
        with self.metrics.stage("search_scan"):
            results = self.search.run(text, wanted, k, **filters)
        self.metrics.search_rows.labels(task=self.search.task).inc(results.scanned)
        return results


def searcher_for(bundle: Bundle, store: EmbeddingStore, metrics: Metrics) -> tuple[Searcher | None, str | None]:
    """(the task's searcher, None), or (None, why not) when the bundle was exported without the search files."""
    try:
        return Searcher(bundle, store, metrics), None
    except SearchUnavailable as e:
        log.warning("%s: collection search is off: %s", bundle.task, e)
        return None, str(e)
