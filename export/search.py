"""Asking a whole collection (DESIGN 7b): score every cached image for one question, hypothesis or statement.

The fusion MLP's first layer is linear in [t; v]: W1 [t; v] + b1 = (W1_t t + b1) + W1_v v. `ImageParts`
keeps W1_v v for every row of a store (computed once, caught up as the store grows); per query the text
tower runs once, `SearchHead.query` computes the text's part (and, for reasoning, the given image's share
of the classifier), and `scan` runs the rest of the head (`scan.onnx`: add, LayerNorm, GELU, second fusion
layer, classifier, only the head rows the wanted answer needs) over the rows in blocks, keeping the top k.
Per image that is 8 D^2 + 4 D R multiply-add FLOPs (R head rows) against the whole head's 12 D^2 + 4 D R.

A "product" fusion ([t; v; t*v], training/student.py) is still linear in v for a given t:
W1_v v + W1_p (t*v) = (W1_v + W1_p diag(t)) v. Its image parts are then the cached vectors themselves (D
floats a row, not 2D), and each query brings its matrix (W1_v + W1_p diag(t)), applied block by block
before the scan graph: 4 D^2 more FLOPs per image.
"""

from __future__ import annotations

import math
import os
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from core.bundle import SCAN, SCAN_INPUTS, SCAN_OUTPUT, BundleError
from export.runtime import Bundle
from export.store import EmbeddingStore

TASKS = ("vqa", "entailment", "reasoning")
SIDES = ("left", "right")
CHUNK_ROWS = 65536  # ImageParts holds its rows in chunks of this many, so growing never copies them all
# Rows per scan call, as bytes of image parts: on CPU a block and its activations stay in a core's L2 cache
# (one single-threaded session call per core beats one call over all cores); on GPU, big transfers.
CPU_BLOCK_BYTES = 1 << 20
GPU_BLOCK_BYTES = 64 << 20
ERF = np.frompyfunc(math.erf, 1, 1)


class SearchUnavailable(BundleError):
    """The bundle was exported without the search files: export it again (the message says how)."""


class BadQuery(ValueError):
    """A query the model cannot answer as asked (an unknown answer or label): the message lists the valid ones."""


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, in float64 (one vector of logits, or one row per image)."""
    x = x.astype(np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.asarray(ERF(x / math.sqrt(2.0)), np.float64))


@dataclass(frozen=True)
class Query:
    """One query's inputs to the scan graph, and how its logits become the wanted answer's probability."""

    feeds: dict[str, np.ndarray]  # every scan.onnx input but image_part
    kind: str  # "sigmoid": the one logit's sigmoid; "softmax": softmax over the rows, column `column`
    column: int
    negate: bool = False  # reasoning with one logit and the wanted label false: 1 - sigmoid
    image_matrix: np.ndarray | None = None  # product fusion: (D, 2D) taking a cached vector to its image part

    def scores(self, logits: np.ndarray) -> np.ndarray:
        """Logits (B, R) -> the wanted answer's probability (B,), float64, as the per-image endpoints compute it."""
        if self.kind == "sigmoid":
            p = sigmoid(logits[:, self.column])
            return 1.0 - p if self.negate else p
        return softmax(logits)[:, self.column]


class SearchHead:
    """A bundle's head split for scanning: per-image parts, per-query parts, and the scan graph's session."""

    def __init__(
        self,
        task: str,
        labels: list[str],
        fusion: dict[str, np.ndarray],
        scan_graph: bytes,
        providers: list[str],
        *,
        threads: int | None = None,
        source: str = SCAN,
    ) -> None:
        """From fusion.npz's arrays and scan.onnx's bytes (`of` reads them from a bundle); `threads`: CPU cores to
        scan on (default: all), each running its own blocks through the scan graph."""
        self.task = task
        self.labels = labels
        self.dim = D = fusion["fusion_w2"].shape[0]
        a = fusion
        f32 = np.float32
        self._w1_text = np.ascontiguousarray(a["fusion_w1"][:, :D], f32)  # (2D, D)
        self._w1_image_t = np.ascontiguousarray(a["fusion_w1"][:, D : 2 * D].T, f32)  # (D, 2D)
        # Product fusion: the first layer's block over t*v, transposed (D, 2D); None for the paper's concat.
        self.product = a["fusion_w1"].shape[1] == 3 * D
        self._w1_product_t = np.ascontiguousarray(a["fusion_w1"][:, 2 * D :].T, f32) if self.product else None
        self._a = a
        self._fixed = {
            "ln1_w": a["fusion_ln_w"],
            "ln1_b": a["fusion_ln_b"],
            "w2": np.ascontiguousarray(a["fusion_w2"].T, f32),  # (2D, D)
            "b2": a["fusion_b2"],
            "ln2_w": a["cls_ln_w"],
            "ln2_b": a["cls_ln_b"],
        }
        options = ort.SessionOptions()
        if providers[0] == "CPUExecutionProvider":
            options.intra_op_num_threads = 1
        try:
            self._session = ort.InferenceSession(scan_graph, options, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types for invalid models
            raise BundleError(f"{source}: ONNX Runtime cannot load it: {e}") from None
        got = tuple(i.name for i in self._session.get_inputs())
        if got != SCAN_INPUTS:
            raise BundleError(f"{source}: graph inputs {got}, expected {SCAN_INPUTS}")
        self.provider: str = self._session.get_providers()[0]
        self.workers = (threads or os.cpu_count() or 1) if self.provider == "CPUExecutionProvider" else 1
        block_bytes = CPU_BLOCK_BYTES if self.provider == "CPUExecutionProvider" else GPU_BLOCK_BYTES
        self.block = max(256, block_bytes // self.part_bytes)  # rows per scan call
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="dide-scan")

    @classmethod
    def of(cls, bundle: Bundle, *, threads: int | None = None) -> SearchHead:
        """The bundle's head split for scanning; SearchUnavailable when it was exported without the search files."""
        if bundle.search_problem is not None:
            raise SearchUnavailable(bundle.search_problem)
        return cls(bundle.task, bundle.labels, bundle.fusion, bundle.scan_graph, bundle.providers, threads=threads,
                   source=str(bundle.directory / SCAN))  # fmt: skip

    # --- per image, once ----------------------------------------------------------------------------------

    def image_parts(self, vectors: np.ndarray) -> np.ndarray:
        """Image embeddings (B, D) -> their share of the first fusion layer, W1_v v (B, 2D) float32; with a
        product fusion, whose share depends on the query, the embeddings themselves (B, D)."""
        if self.product:
            return np.asarray(vectors, np.float32)
        return np.asarray(vectors, np.float32) @ self._w1_image_t

    @property
    def part_bytes(self) -> int:
        """Memory per cached image of its precomputed part: 2D float32 (product fusion: D)."""
        return (1 if self.product else 2) * self.dim * 4

    # --- per query, once ----------------------------------------------------------------------------------

    def query(self, text: np.ndarray, wanted: str, *, pair: np.ndarray | None = None, side: str = "left") -> Query:
        """The scan's inputs for one text embedding (D,) and the wanted answer (VQA), label (entailment) or
        verdict ("true"/"false", reasoning); for reasoning, `pair` (D,) is the given image and `side` its place."""
        D, a, f32 = self.dim, self._a, np.float32
        text = np.asarray(text, f32).reshape(D)
        text_part = (self._w1_text @ text + a["fusion_b1"]).astype(f32)[None]  # (1, 2D)
        w3, b3 = a["cls_w1"], a["cls_b1"].astype(np.float64)
        if self.task == "reasoning":
            if pair is None:
                raise BadQuery("a reasoning search needs the given image the cached images are paired with")
            if side not in SIDES:
                raise BadQuery(f"side must be 'left' or 'right' (where the given image goes), got {side!r}")
            given = self._fused(text, np.asarray(pair, f32).reshape(D))  # (D,) float64
            mine, other = (slice(D, None), slice(None, D)) if side == "left" else (slice(None, D), slice(D, None))
            b3 = b3 + w3[:, other].astype(np.float64) @ given
            w3 = w3[:, mine]
        elif pair is not None:
            raise BadQuery(f"a {self.task} search takes no second image")
        rows, kind, column, negate = self._rows(wanted)
        feeds = {
            **self._fixed,
            "text_part": text_part,
            "w3": np.ascontiguousarray(w3.T, f32),  # (D, 2D)
            "b3": b3.astype(f32)[None],  # (1, 2D)
            "w4": np.ascontiguousarray(a["cls_w2"][rows].T, f32),  # (2D, R)
            "b4": np.ascontiguousarray(a["cls_b2"][rows], f32),
        }
        matrix = None
        if self.product:  # W1_v v + W1_p (t*v) = v (W1_v^T + diag(t) W1_p^T)
            matrix = np.ascontiguousarray(self._w1_image_t + text[:, None] * self._w1_product_t, f32)
        return Query(feeds, kind, column, negate, matrix)

    def _fused(self, text: np.ndarray, image: np.ndarray) -> np.ndarray:
        """The fusion MLP over one [text; image] pair, float64 (the given image of a reasoning search)."""
        a = self._a
        inputs = [text, image] + ([text * image] if self.product else [])
        x = a["fusion_w1"].astype(np.float64) @ np.concatenate(inputs).astype(np.float64) + a["fusion_b1"]
        h = _gelu(_layer_norm(x, a["fusion_ln_w"], a["fusion_ln_b"], float(a["fusion_ln_eps"])))
        return a["fusion_w2"].astype(np.float64) @ h + a["fusion_b2"]

    def _rows(self, wanted: str) -> tuple[list[int], str, int, bool]:
        """The head rows the wanted answer needs, and how their logits score it."""
        labels = self.labels
        if self.task == "vqa":
            if wanted not in labels:
                raise BadQuery(f"{wanted!r} is not an answer this model gives; it gives {', '.join(labels)}")
            return [labels.index(wanted)], "sigmoid", 0, False  # answers are scored independently, as /vqa
        if self.task == "entailment":
            if wanted not in labels:
                raise BadQuery(f"label {wanted!r} is not one of {', '.join(labels)}")
            return list(range(len(labels))), "softmax", labels.index(wanted), False
        verdict = wanted.strip().lower()
        if verdict not in ("true", "false"):
            raise BadQuery(f"a reasoning search wants the verdict 'true' or 'false', got {wanted!r}")
        from_labels = [label.strip().lower() in ("true", "yes", "1") for label in labels]
        if len(labels) == 1:
            return [0], "sigmoid", 0, verdict == "false"
        i_true = from_labels.index(True) if True in from_labels else len(labels) - 1  # as answers.true_index
        column = i_true if verdict == "true" else (1 - i_true if len(labels) == 2 else -1)
        if column < 0:
            raise BadQuery("a false verdict is only defined for a two-label reasoning head")
        return list(range(len(labels))), "softmax", column, False

    # --- per block of images -----------------------------------------------------------------------------

    def logits(self, image_part: np.ndarray, query: Query) -> np.ndarray:
        """Image parts (B, 2D; product fusion: the cached vectors, B x D) -> the logits (B, R) of the query's
        head rows."""
        if query.image_matrix is not None:
            image_part = image_part @ query.image_matrix
        return self._session.run([SCAN_OUTPUT], {"image_part": image_part, **query.feeds})[0]


class ImageParts:
    """W1_v v for every row of one store, in memory (rows x 2D x 4 bytes; product fusion: the vectors, rows x D
    x 4), computed once and caught up as the store grows. Reads the store's memory-mapped vectors a chunk at a
    time: they are never copied whole."""

    def __init__(self, head: SearchHead) -> None:
        self.head = head
        self._chunks: list[np.ndarray] = []  # every chunk but the last holds CHUNK_ROWS rows
        self._rows = 0
        self._generation: object = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._rows

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self._chunks)

    def catch_up(self, vectors: np.ndarray, generation: object = None) -> int:
        """Compute the parts of rows added since the last call (all of them if `generation` changed); rows now."""
        with self._lock:
            n = len(vectors)
            if generation != self._generation or n < self._rows:  # the store was rebuilt
                self._chunks, self._rows, self._generation = [], 0, generation
            while self._rows < n:
                last = self._chunks[-1] if self._chunks and len(self._chunks[-1]) < CHUNK_ROWS else None
                start = self._rows
                end = min(n, start + CHUNK_ROWS - (0 if last is None else len(last)))
                new = self.head.image_parts(vectors[start:end])
                if last is None:
                    self._chunks.append(new)
                else:
                    self._chunks[-1] = np.concatenate([last, new])
                self._rows = end
            return self._rows

    def blocks(self, rows: np.ndarray | None, block: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(row numbers, parts (B, 2D)) in blocks of at most `block` rows: every row, or the sorted `rows`."""
        chunks, total = self._chunks, self._rows  # a snapshot: rows caught up later are not half-seen
        if rows is None:
            for c, chunk in enumerate(chunks):
                for a in range(0, len(chunk), block):
                    part = chunk[a : a + block]
                    yield np.arange(c * CHUNK_ROWS + a, c * CHUNK_ROWS + a + len(part)), part
            return
        rows = rows[rows < total]
        for c in np.unique(rows // CHUNK_ROWS):
            mine = rows[(rows // CHUNK_ROWS) == c]
            for a in range(0, len(mine), block):
                sel = mine[a : a + block]
                yield sel, chunks[c][sel - c * CHUNK_ROWS]


def _top(rows: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of (rows, scores), unordered."""
    if len(scores) <= k:
        return rows, scores
    keep = np.argpartition(-scores, k - 1)[:k]
    return rows[keep], scores[keep]


def scan(
    head: SearchHead, parts: ImageParts, query: Query, k: int, rows: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, int]:
    """The k best rows by the wanted answer's probability, best first (ties: lower row first):
    (row numbers, scores float64, rows scanned). `rows`: only these (sorted, unique) row numbers.

    Blocks run on head.workers threads at once (each a single-threaded session call on CPU); each keeps its
    own top k, merged here, so memory stays at a few blocks whatever the collection's size."""
    if k < 1:
        raise BadQuery(f"k must be at least 1, got {k}")

    def one(item: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        ids, part = item
        return _top(ids, query.scores(head.logits(np.ascontiguousarray(part), query)), k)

    best_rows, best_scores = np.empty(0, np.int64), np.empty(0, np.float64)
    scanned = 0
    pending: deque = deque()

    def merge() -> None:
        nonlocal best_rows, best_scores
        ids, scores = pending.popleft().result()
        best_rows, best_scores = _top(np.concatenate([best_rows, ids]), np.concatenate([best_scores, scores]), k)

    for item in parts.blocks(rows, head.block):
        scanned += len(item[0])
        pending.append(head._pool.submit(one, item))
        if len(pending) >= 2 * head.workers:
            merge()
    while pending:
        merge()
    order = np.lexsort((best_rows, -best_scores))
    return best_rows[order], best_scores[order], scanned


@dataclass(frozen=True)
class Hit:
    image_id: str  # sha256
    names: list[str]  # user ids naming it
    score: float  # probability of the wanted answer


@dataclass(frozen=True)
class Results:
    hits: list[Hit]  # best first
    scanned: int  # rows scored (after the filters)
    collection: int  # rows in the store
    unknown_ids: list[str]  # ids of the filter that name no row
    model_id: str


class StoreSearch:
    """One store searched with one bundle's head: the image parts of every row, kept in step with the store."""

    def __init__(self, bundle: Bundle, store: EmbeddingStore, *, threads: int | None = None) -> None:
        if (bundle.model_id, bundle.dim) != (store.model_id, store.dim):
            raise ValueError(
                f"the {bundle.task} bundle embeds into {bundle.model_id}, the store holds {store.model_id}"
            )
        self.task = bundle.task
        self.head = SearchHead.of(bundle, threads=threads)
        self.parts = ImageParts(self.head)
        self.store = store

    def catch_up(self) -> int:
        """Image parts for rows committed since the last call (the store is append-only); rows now."""
        return self.parts.catch_up(self.store.vectors, self.store.manifest.get("created"))

    def run(
        self,
        text: np.ndarray,
        wanted: str,
        k: int,
        *,
        ids: list[str] | None = None,
        prefix: str | None = None,
        pair: np.ndarray | None = None,
        side: str = "left",
    ) -> Results:
        """The k best rows for the wanted answer given the text embedding (D,), among `ids` and/or the rows
        named with `prefix` when given; BadQuery for an answer or label the model does not have."""
        query = self.head.query(text, wanted, pair=pair, side=side)
        total = self.catch_up()
        rows: np.ndarray | None = None
        unknown: list[str] = []
        if ids is not None:
            rows, unknown = self.store.rows_of(ids)
        if prefix is not None:
            named = self.store.rows_named(prefix)
            rows = named if rows is None else np.intersect1d(rows, named)
        best, scores, scanned = scan(self.head, self.parts, query, k, rows)
        shas, names = self.store.sha256_at(best), self.store.names_at(best)
        hits = [Hit(s, n, float(p)) for s, n, p in zip(shas, names, scores, strict=True)]
        return Results(hits, scanned, total, unknown, self.store.model_id)


def scan_parity(bundle: Bundle, n: int = 64, seed: int = 0) -> dict:
    """Max |logit difference| between the scan (every head row) and the bundle's head.onnx on n random pairs."""
    head = SearchHead.of(bundle)
    rng = np.random.default_rng(seed)
    D = bundle.dim
    images = rng.uniform(-1, 1, (n, D)).astype(np.float32)  # towers end in tanh: embeddings lie in [-1, 1]
    texts = rng.uniform(-1, 1, (3, D)).astype(np.float32)
    parts = head.image_parts(images)
    everything = head.labels[0] if bundle.task == "entailment" else "true"  # a wanted label that needs every row
    worst = 0.0
    for t in texts:
        sides = SIDES if bundle.task == "reasoning" else ("left",)
        for side in sides:
            pair = images[0] if bundle.task == "reasoning" else None
            if bundle.task == "vqa":
                got = np.concatenate([head.logits(parts, head.query(t, label)) for label in bundle.labels], 1)
            else:
                got = head.logits(parts, head.query(t, everything, pair=pair, side=side))
            tile, given = np.repeat(t[None], n, 0), None if pair is None else np.repeat(pair[None], n, 0)
            if given is None:
                want = bundle.head(tile, images)
            else:  # the given image on `side`, the scanned ones on the other
                want = bundle.head(tile, given, images) if side == "left" else bundle.head(tile, images, given)
            worst = max(worst, float(np.abs(want - got).max()))
    return {"pairs": n * len(texts), "max_abs_logit_diff": worst, "provider": head.provider}
