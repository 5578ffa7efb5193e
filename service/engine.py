"""The loaded bundles and embedding stores, and the inference pipeline the routes call."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.runtime import Bundle
from export.search import Results
from export.store import EmbeddingStore, StoreError, is_sha256
from service.answers import (
    EntailmentAnswer,
    ModelSummary,
    ReasoningAnswer,
    VQAAnswer,
    entailment_scores,
    reasoning_verdict,
    top_answers,
)
from service.batcher import MicroBatcher, Overloaded
from service.metrics import Metrics
from service.search import Searcher, searcher_for
from service.settings import Settings
from service.space import ImageVector, Space

log = logging.getLogger(__name__)

# The service never waits long for the store's write lock: a build holding it sends vectors to the overlay.
STORE_LOCK_TIMEOUT_S = 0.05
FLUSH_INTERVAL_S = 0.5


class ImageNotFound(LookupError):
    """An image id that no loaded store (nor the in-memory overlay) knows: a 404."""


class TaskNotLoaded(LookupError):
    """The service was started without a bundle for this task: a 404."""


class SearchNotAvailable(LookupError):
    """The task's bundle was exported without the search files: a 404 that says to export it again."""


@dataclass(frozen=True)
class Row:
    """One request's input to the text tower and head."""

    text: str
    images: tuple[np.ndarray, ...]  # one (D,) vector, two for reasoning


class TextCache:
    """A thread-safe LRU of text -> text embedding (D,)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, text: str) -> np.ndarray | None:
        with self._lock:
            vec = self._items.get(text)
            if vec is not None:
                self._items.move_to_end(text)
            return vec

    def put(self, text: str, vec: np.ndarray) -> None:
        if self.size <= 0:
            return
        with self._lock:
            self._items[text] = vec
            self._items.move_to_end(text)
            while len(self._items) > self.size:
                self._items.popitem(last=False)


class Model:
    """One task's bundle, its space, its text-embedding cache and its micro-batcher."""

    def __init__(
        self, bundle: Bundle, space: Space, metrics: Metrics, settings: Settings, executor: ThreadPoolExecutor
    ):
        self.bundle = bundle
        self.space = space
        self.metrics = metrics
        self.text_cache = TextCache(settings.text_cache_size)
        self.searcher: Searcher | None = None
        self.search_problem: str | None = "collection search is not loaded yet"
        self.batcher: MicroBatcher[Row, np.ndarray] = MicroBatcher(
            self.run,
            executor,
            max_batch=settings.batch_max,
            wait_s=settings.batch_wait_ms / 1000.0,
            queue_max=settings.queue_max,
            enabled=settings.batching,
            inline_max_s=settings.inline_max_ms / 1000.0,
            depth_gauge=metrics.queue_depth,
            name=f"{bundle.task} batcher",
        )

    def run(self, rows: list[Row]) -> list[np.ndarray]:
        """Text tower (texts not in the cache, each once) and head over a batch: logits (C,) per row."""
        texts = self.text_embeddings([row.text for row in rows])
        text_emb = np.stack([texts[row.text] for row in rows])
        images = [np.stack([row.images[i] for row in rows]) for i in range(len(rows[0].images))]
        with self.metrics.stage("head"):
            logits = self.bundle.head(text_emb, *images)
        self.metrics.batch_sizes["head"].observe(len(rows))
        return list(logits)

    def text_embeddings(self, wanted: list[str]) -> dict[str, np.ndarray]:
        """Text -> embedding (D,) for each distinct text: from the cache, the rest through the text tower at once."""
        texts: dict[str, np.ndarray] = {}
        missing: list[str] = []
        for text in wanted:
            if text in texts or text in missing:
                continue
            vec = self.text_cache.get(text)
            if vec is None:
                missing.append(text)
            else:
                texts[text] = vec
        self.metrics.hit("text", len(texts))
        self.metrics.miss("text", len(missing))
        if missing:
            with self.metrics.stage("tokenize"):
                ids, mask = self.bundle.tokenize(missing)
            with self.metrics.stage("text_encode"):
                encoded = self.bundle.encode_tokens(ids, mask)
            self.metrics.batch_sizes["text"].observe(len(missing))
            for text, vec in zip(missing, encoded, strict=True):
                texts[text] = vec
                self.text_cache.put(text, vec)
        return texts


class Engine:
    """Everything the routes need: models per task, spaces per model_id, and the worker threads."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self._executor: ThreadPoolExecutor | None = None
        self._io: ThreadPoolExecutor | None = None  # store commits and refreshes, off the model threads
        self.models: dict[str, Model] = {}
        self.spaces: dict[str, Space] = {}
        self.ready = False
        self._encoding = 0  # image encodes queued or running, bounded by queue_max
        self._searching = 0  # searches queued or running, bounded by queue_max; one scans at a time
        self._scan_lock = asyncio.Lock()  # binds to the running loop on first use
        self._tasks: list[asyncio.Task[None]] = []

    # --- life cycle ----------------------------------------------------------------------------------------

    @property
    def executor(self) -> ThreadPoolExecutor:
        if self._executor is None:
            raise RuntimeError("the engine is not loaded")
        return self._executor

    @property
    def io(self) -> ThreadPoolExecutor:
        if self._io is None:
            raise RuntimeError("the engine is not loaded")
        return self._io

    def load(self) -> None:
        """Load and verify every bundle, open (or create) each model_id's store, warm every session."""
        if not self.settings.bundles:
            raise ValueError("no bundles to serve: set DIDE_BUNDLES to one or more bundle directories")
        self._executor = ThreadPoolExecutor(self.settings.threads, thread_name_prefix="dide-worker")
        self._io = ThreadPoolExecutor(2, thread_name_prefix="dide-store")
        bundles: dict[str, Bundle] = {}
        for directory in self.settings.bundles:
            bundle = Bundle.load(
                Path(directory), self.settings.providers or None, threads=self.settings.intra_op_threads or None
            )
            if bundle.task in bundles:
                raise ValueError(
                    f"two bundles for task {bundle.task!r} ({bundles[bundle.task].directory} and {directory}): "
                    "DIDE_BUNDLES takes at most one per task"
                )
            bundles[bundle.task] = bundle
        for task, bundle in bundles.items():
            space = self.spaces.get(bundle.model_id)
            if space is None:
                store = EmbeddingStore.open(
                    self.settings.store, bundle.model_id, bundle.dim, create=True, lock_timeout=STORE_LOCK_TIMEOUT_S
                )
                if self.settings.verify_store:
                    problems, _ = store.verify()
                    if problems:  # a build committing right now may replace its index under us: look again
                        problems, _ = store.verify()
                    if problems:
                        raise StoreError(
                            f"the embedding store {store.directory} is damaged: {'; '.join(problems)}. "
                            f"Check it with `dide-cache verify --store {self.settings.store} --model-id "
                            f"{bundle.model_id}`; restore it from a backup or rebuild it with `dide-cache build`"
                        )
                space = self.spaces[bundle.model_id] = Space(store, bundle, self.metrics, self.settings.overlay_max)
                log.info("store %s: %d images cached at %s", bundle.model_id, len(store), store.directory)
            self.models[task] = Model(bundle, space, self.metrics, self.settings, self.executor)
        for task, model in self.models.items():
            model.bundle.warmup()
            model.run([Row("warm up", (np.zeros(model.bundle.dim, np.float32),) * (2 if task == "reasoning" else 1))])
            log.info("%s: warm, provider %s", task, model.bundle.provider)
            model.searcher, model.search_problem = searcher_for(model.bundle, model.space.store, self.metrics)

    @property
    def provider(self) -> str:
        return next(iter(self.models.values())).bundle.provider if self.models else "none"

    async def start(self) -> None:
        for model in self.models.values():
            model.batcher.start()
        self._tasks.append(asyncio.create_task(self._flush_loop(), name="store flush"))
        if self.settings.store_refresh_s > 0:
            self._tasks.append(asyncio.create_task(self._refresh_loop(), name="store refresh"))
        self.ready = True
        self.metrics.ready.set(1)

    async def stop(self) -> None:
        self.ready = False
        self.metrics.ready.set(0)
        for model in self.models.values():
            await model.batcher.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        loop = asyncio.get_running_loop()
        for space in self.spaces.values():
            if not await loop.run_in_executor(self.io, space.flush):
                log.warning("store %s: %d new vectors not committed at shutdown", space.model_id, space.pending)
        self.executor.shutdown(wait=True)
        self.io.shutdown(wait=True)
        self._executor = self._io = None
        self.models.clear()
        self.spaces.clear()

    async def _flush_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            for space in self.spaces.values():
                if space.pending:
                    try:
                        await loop.run_in_executor(self.io, space.flush)
                    except Exception:
                        log.exception("store %s: committing new vectors failed", space.model_id)

    async def _refresh_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.settings.store_refresh_s)
            for space in self.spaces.values():
                try:
                    await loop.run_in_executor(self.io, space.refresh)
                except Exception:
                    log.exception("store %s: refresh failed", space.model_id)

    # --- requests ------------------------------------------------------------------------------------------

    def model(self, task: str) -> Model:
        model = self.models.get(task)
        if model is None:
            served = ", ".join(sorted(self.models)) or "none"
            raise TaskNotLoaded(f"this service has no {task} model (tasks served: {served})")
        return model

    async def image(self, space: Space, ref: str | bytes) -> ImageVector:
        """An image id (looked up) or image bytes (looked up by sha256, else encoded) -> its vector."""
        if isinstance(ref, bytes):
            return await self._in_pool_bounded(space.encode, ref)
        with self.metrics.stage("lookup"):
            hit = await self._lookup(space, ref)
        if hit is None:
            self.metrics.miss("image")
            raise ImageNotFound(
                f"no image {ref!r} in the {space.model_id} store: send the image bytes instead, or POST it to /images"
            )
        self.metrics.hit("image")
        return ImageVector(hit[0], hit[1], cached=True)

    async def predict(self, task: str, text: str, refs: Sequence[str | bytes]) -> tuple[np.ndarray, list[ImageVector]]:
        """Logits (C,) for one text and its image(s), through the micro-batcher."""
        model = self.model(task)
        with model.batcher.slot() as slot:
            if len(refs) == 1:
                images = [await self.image(model.space, refs[0])]
            else:  # reasoning: both images at once (either may need encoding)
                images = list(await asyncio.gather(*(self.image(model.space, ref) for ref in refs)))
            logits = await slot.submit(Row(text, tuple(im.vector for im in images)))
        return logits, images

    async def vqa(self, question: str, ref: str | bytes, top_k: int) -> VQAAnswer:
        """The top_k answers to a question about one image."""
        model = self.model("vqa")
        logits, (image,) = await self.predict("vqa", question, [ref])
        return VQAAnswer(top_answers(logits, model.bundle.labels, top_k), image, model.space.model_id)

    async def entailment(self, hypothesis: str, ref: str | bytes) -> EntailmentAnswer:
        """Whether one image entails, contradicts or leaves open a hypothesis, with every label's probability."""
        model = self.model("entailment")
        logits, (image,) = await self.predict("entailment", hypothesis, [ref])
        label, scores = entailment_scores(logits, model.bundle.labels)
        return EntailmentAnswer(label, scores, image, model.space.model_id)

    async def reasoning(self, statement: str, refs: Sequence[str | bytes]) -> ReasoningAnswer:
        """Whether a statement is true of a pair of images, and the probability that it is."""
        model = self.model("reasoning")
        logits, images = await self.predict("reasoning", statement, refs)
        label, score = reasoning_verdict(logits, model.bundle.labels)
        return ReasoningAnswer(label, score, images, model.space.model_id)

    async def search(
        self,
        task: str,
        text: str,
        wanted: str,
        k: int,
        *,
        ids: list[str] | None = None,
        prefix: str | None = None,
        pair: str | bytes | None = None,
        side: str = "left",
    ) -> Results:
        """The k cached images most likely to get the wanted answer (label, verdict) for the text; for reasoning,
        each paired with the image `pair` placed on `side`. One scan runs at a time (it uses every core)."""
        model = self.model(task)
        searcher = model.searcher
        if searcher is None:
            raise SearchNotAvailable(f"{task} search is not available: {model.search_problem}")
        if self._searching >= self.settings.queue_max:
            raise Overloaded(f"{self._searching} searches are queued, the limit is {self.settings.queue_max}")
        self._searching += 1
        try:
            given = None if pair is None else (await self.image(model.space, pair)).vector
            loop = asyncio.get_running_loop()
            text_emb = (await loop.run_in_executor(self.executor, model.text_embeddings, [text]))[text]
            async with self._scan_lock:
                return await loop.run_in_executor(
                    self.executor,
                    lambda: searcher.run(text_emb, wanted, k, ids=ids, prefix=prefix, pair=given, side=side),
                )
        finally:
            self._searching -= 1

    def summaries(self) -> dict[str, ModelSummary]:
        """What each task's model is: its embedding space, provider, number of labels and width."""
        return {
            task: ModelSummary(m.space.model_id, m.bundle.provider, len(m.bundle.labels), m.bundle.dim)
            for task, m in self.models.items()
        }

    async def upload(self, data: bytes, name: str | None) -> tuple[str, bool, list[str]]:
        """Encode an image once per model_id and commit it to every store: (sha256, was cached, model ids)."""
        if not self.spaces:
            raise TaskNotLoaded("this service has no models loaded")
        loop = asyncio.get_running_loop()
        cached = True
        sha = ""
        for space in self.spaces.values():
            vec = await self._in_pool_bounded(space.encode, data)
            sha, cached = vec.sha256, cached and vec.cached
            if name is not None:
                space.name(name, sha)
            await loop.run_in_executor(self.io, space.flush)  # if it cannot commit now, the overlay serves it
        return sha, cached, list(self.spaces)

    async def _lookup(self, space: Space, key: str) -> tuple[str, np.ndarray] | None:
        """Inline (microseconds) unless this process is writing to that store right now."""
        if space.writing:
            return await asyncio.get_running_loop().run_in_executor(self.io, space.lookup, key)
        return space.lookup(key)

    async def status(self, key: str) -> tuple[str, list[str], list[str]]:
        """(sha256, model ids that have it, tasks that can answer about it); ImageNotFound if unknown."""
        sha: str | None = key if is_sha256(key) else None
        have: list[str] = []
        for model_id, space in self.spaces.items():
            hit = await self._lookup(space, key)
            if hit is not None:
                sha = hit[0]
                have.append(model_id)
        if sha is None:
            raise ImageNotFound(f"no image {key!r} in any store")
        tasks = [task for task, model in self.models.items() if model.space.model_id in have]
        return sha, have, tasks

    async def _in_pool_bounded(self, fn: Callable[[bytes], ImageVector], data: bytes) -> ImageVector:
        if self._encoding >= self.settings.queue_max:
            raise Overloaded(f"{self._encoding} image encodes are queued, the limit is {self.settings.queue_max}")
        self._encoding += 1
        self.metrics.image_encodes.inc()
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, fn, data)
        finally:
            self._encoding -= 1
            self.metrics.image_encodes.dec()
