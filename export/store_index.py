"""The embedding store's faiss index: the kinds it can build, and search-time settings.

Index kinds: "flat" (IndexIDMap2 over IndexFlatIP, exact, the default), "hnsw" (IndexHNSWFlat, M=32:
approximate, no training, a good choice up to ~10^8 rows in RAM) and "ivf" (IndexIVFFlat with ~4*sqrt(N)
lists, trained at save time, probed with nprobe=16: for 10^7+ rows when memory per query matters). All
three are wrapped in IndexIDMap2 so faiss ids are row numbers; rows are L2-normalised, so inner product
is cosine similarity.
"""

from __future__ import annotations

import math
from pathlib import Path

import faiss
import numpy as np

from export.store_layout import StoreError

INDEX_KINDS = ("flat", "hnsw", "ivf")
_HNSW_M = 32
_HNSW_EF_SEARCH = 64
_IVF_NPROBE = 16


def normalized(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero), as a new C-contiguous float32 array."""
    x = np.array(x, dtype=np.float32, copy=True, order="C")
    with np.errstate(invalid="ignore", over="ignore"):  # only a corrupt row (checked by verify) is not finite
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        np.divide(x, norms, out=x, where=norms > 0)
    return x


def new_index(kind: str, dim: int, train: np.ndarray) -> faiss.IndexIDMap2:
    """An empty IndexIDMap2 of `kind` (inner product over normalised rows); IVF is trained on `train`."""
    inner: faiss.Index
    if kind == "flat":
        inner = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        inner = faiss.IndexHNSWFlat(dim, _HNSW_M, faiss.METRIC_INNER_PRODUCT)
    elif kind == "ivf":
        nlist = max(1, int(4 * math.sqrt(len(train))))
        if len(train) < 39 * nlist or len(train) < 1000:
            raise ValueError(
                f"an ivf index needs at least max(1000, 39 x nlist) rows to train, the store has "
                f"{len(train)}: use --index flat or hnsw until it grows"
            )
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        sample = np.sort(np.random.default_rng(0).permutation(len(train))[: 256 * nlist])
        ivf.train(normalized(train[sample]))
        ivf.make_direct_map()  # so verify can reconstruct rows by id
        inner = ivf
    else:
        raise ValueError(f"unknown index kind {kind!r}: choose one of {', '.join(INDEX_KINDS)}")
    return tune(faiss.IndexIDMap2(inner))


def as_idmap(index: faiss.Index, what: str) -> faiss.IndexIDMap2:
    # faiss's Python layer already returns read indexes as their concrete class; downcast_index here
    # would make a second, non-owning proxy and let the owning one free the index.
    if not isinstance(index, faiss.IndexIDMap2):
        raise StoreError(f"{what} is a {type(index).__name__}, not the IndexIDMap2 this store writes")
    return index


def tune(index: faiss.IndexIDMap2) -> faiss.IndexIDMap2:
    """Set the search-time knobs, which a saved index may not carry."""
    inner = faiss.downcast_index(index.index)
    if isinstance(inner, faiss.IndexHNSWFlat):
        inner.hnsw.efSearch = _HNSW_EF_SEARCH
    elif isinstance(inner, faiss.IndexIVFFlat):
        inner.nprobe = _IVF_NPROBE
    return index


def add_rows(index: faiss.IndexIDMap2, vectors: np.ndarray, end: int, chunk: int = 65536) -> None:
    """Add rows index.ntotal..end-1 of `vectors` (N, D), normalised, with their row numbers as ids."""
    for a in range(index.ntotal, end, chunk):
        b = min(end, a + chunk)
        index.add_with_ids(normalized(vectors[a:b]), np.arange(a, b, dtype=np.int64))


def open_index(saved: Path | None, kind: str, dim: int, vectors: np.ndarray) -> faiss.IndexIDMap2:
    """The index over every row of `vectors`: the one saved at `saved` topped up, or a new one of `kind`."""
    index = tune(as_idmap(faiss.read_index(str(saved)), str(saved))) if saved else new_index(kind, dim, vectors)
    add_rows(index, vectors, len(vectors))
    return index


def nearest(index: faiss.IndexIDMap2, vector: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The k rows nearest `vector` (D,) by cosine similarity, best first, as (row, score)."""
    if index.ntotal == 0:
        return []
    scores, ids = index.search(normalized(vector.reshape(1, -1)), min(k, index.ntotal))
    return [(int(i), float(s)) for s, i in zip(scores[0], ids[0], strict=True) if i >= 0]
