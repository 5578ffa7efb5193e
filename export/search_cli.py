"""`dide-cache search`: rank every image of a store by a question's answer, a hypothesis's label or a statement.

    dide-cache search --store S --bundle B --text "is there a red circle?" --want yes -k 5
    dide-cache search --store S --bundle B --queries queries.jsonl > results.jsonl    # batch jobs

A queries file holds one JSON object per line: {"text", "want", "k"?, "ids"?, "prefix"?, "pair"?, "side"?};
each answer is one JSON line in the same order. The store's image parts are computed once for all queries.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np

from export.runtime import Bundle
from export.search import SIDES, BadQuery, StoreSearch
from export.store import EmbeddingStore, content_key

log = logging.getLogger(__name__)

QUERY_KEYS = {"text", "want", "k", "ids", "prefix", "pair", "side"}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="rank every cached image by a question, hypothesis or statement")
    p.add_argument("--store", required=True, help="store root (the store is ROOT/<the bundle's model_id>)")
    p.add_argument("--bundle", required=True, help="the task's bundle (exported with the search files)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--text", help="the question (vqa), hypothesis (entailment) or statement (reasoning)")
    which.add_argument("--queries", help="a JSON-lines file of queries (see the module help); answers as JSON lines")
    p.add_argument("--want", help="with --text: the wanted answer (vqa), label (entailment) or true/false (reasoning)")
    p.add_argument("-k", type=int, default=10, help="images to list per query")
    p.add_argument("--ids", help="a file of ids (sha256s or user ids), one a line: search only those images")
    p.add_argument("--prefix", help="search only images whose user id starts with this")
    p.add_argument("--pair", help="reasoning: the given image, an id in the store or an image file")
    p.add_argument("--side", choices=SIDES, default="left", help="reasoning: where the given image goes")
    p.add_argument("--json", action="store_true", help="with --text: print the answer as one JSON line")
    p.add_argument("--threads", type=int, help="cores to scan on (default: all)")
    p.set_defaults(run=cmd_search)


def read_queries(args: argparse.Namespace) -> Iterator[dict]:
    if args.text is not None:
        if args.want is None:
            raise ValueError("--text needs --want: the answer, label or verdict to rank the images by")
        ids = None
        if args.ids:
            ids = [ln.strip() for ln in Path(args.ids).read_text().splitlines() if ln.strip()]
        yield {"text": args.text, "want": args.want, "k": args.k, "ids": ids, "prefix": args.prefix,
               "pair": args.pair, "side": args.side}  # fmt: skip
        return
    with open(args.queries) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            q = json.loads(line)
            if not isinstance(q, dict) or not {"text", "want"} <= q.keys() or q.keys() - QUERY_KEYS:
                raise ValueError(f"{args.queries}:{i}: a query is an object with text, want and only {QUERY_KEYS}")
            yield {"k": args.k, "side": "left", **q}


def pair_vector(bundle: Bundle, store: EmbeddingStore, pair: str | None) -> np.ndarray | None:
    """The given image of a reasoning query: an id in the store, or an image file (looked up, else encoded)."""
    if pair is None:
        return None
    path = Path(pair)
    key = content_key(path.read_bytes()) if path.is_file() else pair
    hit = store.lookup(key)
    if hit is not None:
        return hit[1]
    if path.is_file():
        return bundle.encode_images(bundle.preprocess_images([path.read_bytes()]))[0]
    raise ValueError(f"{pair!r} is neither an image file nor an id in {store.directory}")


def cmd_search(args: argparse.Namespace) -> int:
    bundle = Bundle.load(args.bundle)
    store = EmbeddingStore.open(args.store, bundle.model_id, bundle.dim)
    search = StoreSearch(bundle, store, threads=args.threads)
    t0 = time.perf_counter()
    rows = search.catch_up()
    log.info("%d images, image parts computed in %.2f s (%.1f MB)", rows, time.perf_counter() - t0,
             search.parts.nbytes / 1e6)  # fmt: skip
    for q in read_queries(args):
        t0 = time.perf_counter()
        text = bundle.encode_texts([q["text"]])[0]
        pair = pair_vector(bundle, store, q.get("pair"))
        try:
            res = search.run(text, str(q["want"]), int(q["k"]), ids=q.get("ids"), prefix=q.get("prefix"),
                             pair=pair, side=q["side"])  # fmt: skip
        except BadQuery as e:
            if args.queries is None:
                raise
            print(json.dumps({"text": q["text"], "want": q["want"], "error": str(e)}), flush=True)
            continue
        seconds = time.perf_counter() - t0
        if args.queries is not None or args.json:
            out = {"text": q["text"], "want": q["want"], **asdict(res), "seconds": round(seconds, 4)}
            out["results"] = out.pop("hits")
            print(json.dumps(out), flush=True)
            continue
        for rank, hit in enumerate(res.hits, 1):
            print(f"{rank:3d}  {hit.score:.6f}  {hit.image_id}  {','.join(hit.names)}")
        extra = f", {len(res.unknown_ids)} unknown ids" if res.unknown_ids else ""
        print(f"scanned {res.scanned} of {res.collection} images in {seconds * 1000:.1f} ms{extra}")
    return 0
