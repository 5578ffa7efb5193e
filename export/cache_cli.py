"""`dide-cache`: build, merge, verify and query the image-embedding store with a bundle's image tower, and
search it with a bundle's head (`dide-cache search`, in export.search_cli)."""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from core.bundle import BundleError, read_manifest
from core.preprocess import ImageError, decode_image
from export import search_cli
from export.runtime import Bundle
from export.store import INDEX_KINDS, MANIFEST, EmbeddingStore, StoreError, StoreLocked, content_key

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
ID_MODES = ("stem", "relpath", "none")


# --- listing and sharding -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageItem:
    path: Path  # where to read it
    name: str  # how it is listed and sorted: relative to the root, the glob match, or the list line


def list_images(spec: str) -> list[ImageItem]:
    """A directory tree (image suffixes only), a glob, a text file listing paths, or one image file; sorted."""
    path = Path(spec)
    if path.is_dir():
        items = [
            ImageItem(p, p.relative_to(path).as_posix())
            for p in path.rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        ]
    elif path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
        items = [ImageItem(path, path.name)]
    elif path.is_file():
        lines = [ln.strip() for ln in path.read_text().splitlines()]
        items = [
            ImageItem(Path(ln) if Path(ln).is_absolute() else path.parent / ln, ln)
            for ln in lines
            if ln and not ln.startswith("#")
        ]
    elif glob.has_magic(spec):
        items = [ImageItem(Path(p), p) for p in glob.glob(spec, recursive=True) if Path(p).is_file()]
    else:
        raise ValueError(f"--images {spec!r} is not a directory, a file, or a glob matching anything")
    return sorted(items, key=lambda it: it.name)


def parse_shard(text: str) -> tuple[int, int]:
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r} must look like K/N, e.g. 0/4") from None
    if n < 1 or not 0 <= k < n:
        raise ValueError(f"--shard {text!r}: need 0 <= K < N")
    return k, n


def shard_of(items: list[ImageItem], k: int, n: int) -> list[ImageItem]:
    """Shard k of n: the k-th contiguous slice of the sorted listing.

    Contiguous slices (rather than a hash of the path) make `merge` of shards 0..N-1 append rows in
    exactly the order of one unsharded run, so row numbers and faiss ids match too. Every machine
    must list the same images (the same --images spec over the same files).
    """
    return items[k * len(items) // n : (k + 1) * len(items) // n]


def user_id(item: ImageItem, mode: str) -> str | None:
    if mode == "none":
        return None
    if mode == "stem":
        return item.path.stem
    return str(Path(item.name).with_suffix(""))


# --- build -----------------------------------------------------------------------------------------------


@dataclass
class Read:
    """One listed file after reading (and, unless already cached, decoding) it."""

    item: ImageItem
    sha256: str | None = None
    pixels: np.ndarray | None = None
    cached: bool = False
    error: str | None = None


@dataclass
class BuildSummary:
    listed: int = 0  # files in the listing (before sharding)
    in_shard: int = 0
    encoded: int = 0  # new rows
    cached: int = 0  # content already in the store
    duplicates: int = 0  # content seen earlier in this run
    rejected: int = 0
    id_conflicts: int = 0
    seconds: float = 0.0
    store_rows: int = 0
    rejects_file: str = ""

    @property
    def images_per_s(self) -> float:
        return self.encoded / self.seconds if self.seconds else 0.0

    def lines(self) -> list[str]:
        return [
            f"listed {self.listed} files, {self.in_shard} in this shard",
            f"encoded {self.encoded} new images in {self.seconds:.1f} s ({self.images_per_s:.1f} images/s)",
            f"skipped {self.cached} already cached and {self.duplicates} duplicates within this run",
            f"rejected {self.rejected} (listed in {self.rejects_file})" if self.rejected else "rejected 0",
            f"{self.id_conflicts} user ids already naming other content were not remapped",
            f"the store now holds {self.store_rows} images",
        ]


def ordered_map(
    fn: Callable[[ImageItem], Read], items: Iterable[ImageItem], workers: int, depth: int
) -> Iterator[Read]:
    """fn over items on a thread pool, in order, with at most `depth` results in flight."""
    with ThreadPoolExecutor(workers, thread_name_prefix="dide-read") as pool:
        queue: deque = deque()
        for item in items:
            queue.append(pool.submit(fn, item))
            if len(queue) >= depth:
                yield queue.popleft().result()
        while queue:
            yield queue.popleft().result()


def build(
    bundle: Bundle,
    store: EmbeddingStore,
    items: list[ImageItem],
    *,
    batch_size: int = 32,
    id_mode: str = "stem",
    workers: int = 2,
    progress: bool | None = None,
) -> BuildSummary:
    """Encode every listed image not yet in the store, committing one batch at a time; the caller holds the lock."""
    summary = BuildSummary(in_shard=len(items), rejects_file=str(store.rejects_file))
    reported = {(e["path"], e["sha256"]) for e in store.rejects()}

    def read(item: ImageItem) -> Read:
        try:
            data = item.path.read_bytes()
        except OSError as e:
            return Read(item, error=f"cannot read the file: {e.strerror}")
        sha = content_key(data)
        r = Read(item, sha256=sha)
        if store.contains(sha):
            r.cached = True
            return r
        try:
            r.pixels = decode_image(data, bundle.image_spec)
        except ImageError as e:
            r.error = str(e)
        return r

    pending: dict[str, str | None] = {}  # sha256 -> user id of the rows in the batch being gathered, in order
    pixels: list[np.ndarray] = []  # their pixels
    id_pairs: list[tuple[str, str]] = []
    new_rejects: list[dict] = []
    t0 = time.perf_counter()
    bar = tqdm(total=len(items), unit="img", desc="build", disable=None if progress is None else not progress)

    def claim(uid: str | None, sha: str) -> str | None:
        """The user id to record for sha, or None when there is none or it already names other content."""
        if uid is None:
            return None
        have = store.resolve(uid) or next((s for s, u in pending.items() if u == uid), None)
        have = have or next((s for u, s in id_pairs if u == uid), None)
        if have is None:
            return uid
        if have != sha:
            summary.id_conflicts += 1
            log.warning("user id %r already names %s; not remapping it to %s", uid, have, sha)
        return None

    def flush() -> None:
        if pending:
            vectors = bundle.encode_images(np.stack(pixels))
            summary.encoded += store.add(list(pending), vectors, list(pending.values()))
        if id_pairs:
            store.add_ids(id_pairs)
        if new_rejects:
            store.add_rejects(new_rejects)
        pending.clear()
        pixels.clear()
        id_pairs.clear()
        new_rejects.clear()
        seconds = time.perf_counter() - t0
        bar.set_postfix(
            encoded=summary.encoded, rejected=summary.rejected, enc_per_s=f"{summary.encoded / seconds:.1f}"
        )

    for r in ordered_map(read, items, workers, depth=max(4 * batch_size, 16)):
        bar.update(1)
        if r.error is not None:
            summary.rejected += 1
            if (str(r.item.path), r.sha256) not in reported:
                reported.add((str(r.item.path), r.sha256))
                new_rejects.append(
                    {"path": str(r.item.path), "sha256": r.sha256, "reason": r.error, "time": time.time()}
                )
            log.debug("rejected %s: %s", r.item.path, r.error)
            continue
        assert r.sha256 is not None  # set for every file that could be read
        sha, uid = r.sha256, user_id(r.item, id_mode)
        if r.cached or sha in pending or store.contains(sha):
            if sha in pending:
                summary.duplicates += 1
            else:
                summary.cached += 1
            if (uid := claim(uid, sha)) is not None:
                id_pairs.append((uid, sha))
            continue
        assert r.pixels is not None  # decoded because it was not cached
        pending[sha] = claim(uid, sha)
        pixels.append(r.pixels)
        if len(pending) >= batch_size:
            flush()
    flush()
    bar.close()
    summary.seconds = time.perf_counter() - t0
    summary.store_rows = len(store)
    return summary


# --- merge -----------------------------------------------------------------------------------------------


@dataclass
class MergeSummary:
    sources: list[str] = field(default_factory=list)
    rows_added: int = 0
    ids_added: int = 0
    id_conflicts: int = 0
    store_rows: int = 0


def merge(sources: list[EmbeddingStore], dest: EmbeddingStore, chunk: int = 4096) -> MergeSummary:
    """Append each source's rows and user ids, in order, skipping content already present; caller holds dest's lock."""
    summary = MergeSummary(sources=[str(s.directory) for s in sources])
    for src in sources:
        holder = src.locked_by()
        if holder is not None:
            raise StoreLocked(f"the shard store {src.directory} is still being written by {holder}: let it finish")
        for a in tqdm(range(0, len(src), chunk), desc=f"merge {src.directory.parent.name}", disable=None):
            b = min(len(src), a + chunk)
            summary.rows_added += dest.add(src.sha256_at(range(a, b)), np.ascontiguousarray(src.vectors[a:b]))
        pairs = []
        for uid, sha in src.user_ids().items():
            have = dest.resolve(uid)
            if have is None:
                pairs.append((uid, sha))
            elif have != sha:
                summary.id_conflicts += 1
                log.warning(
                    "user id %r names %s in %s but %s in the merged store; kept the latter",
                    uid,
                    sha,
                    src.directory,
                    have,
                )
        for a in range(0, len(pairs), chunk):
            summary.ids_added += dest.add_ids(pairs[a : a + chunk])
        dest.add_rejects(src.rejects())
    summary.store_rows = len(dest)
    return summary


def shard_order(store: EmbeddingStore) -> tuple[int, int]:
    info = store.shard()
    return (sys.maxsize, sys.maxsize) if info is None else (info["of"], info["shard"])


# --- commands --------------------------------------------------------------------------------------------


def store_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if (p / MANIFEST).is_file()) if root.is_dir() else []


def bundle_model(bundle_dir: str) -> tuple[str, int]:
    """The (model_id, dim) a bundle's manifest names: the store it fills."""
    manifest = read_manifest(bundle_dir)
    try:
        return str(manifest["model_id"]), int(manifest["dim"])
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"{bundle_dir}: the bundle manifest has no usable model_id and dim: {e}") from None


def open_existing(root: str, model_id: str | None, bundle_dir: str | None) -> EmbeddingStore:
    """The store under root named by --model-id, by the bundle's model_id, or the only one there."""
    if model_id is None and bundle_dir is not None:
        model_id = bundle_model(bundle_dir)[0]
    if model_id is None:
        found = store_dirs(Path(root))
        if len(found) != 1:
            what = f"holds stores for {', '.join(found)}" if found else "holds no store"
            raise ValueError(f"{root} {what}: name one with --model-id or --bundle")
        model_id = found[0]
    return EmbeddingStore.open(root, model_id, None)


def cmd_build(args: argparse.Namespace) -> int:
    k, n = parse_shard(args.shard) if args.shard else (0, 1)
    bundle = Bundle.load(args.bundle, threads=args.threads)
    items = list_images(args.images)
    listed = len(items)
    items = shard_of(items, k, n)
    if not items:
        log.error(
            "no images to encode: %s lists %d files%s", args.images, listed, " (none in this shard)" if listed else ""
        )
        return 1
    store = EmbeddingStore.open(args.store, bundle.model_id, bundle.dim, create=True)
    with store.writer(f"dide-cache build --images {args.images}" + (f" --shard {args.shard}" if args.shard else "")):
        if args.shard:
            store.set_shard({"shard": k, "of": n, "images": args.images, "listed": listed})
        log.info(
            "building %s with %s (%s): %d images, batch %d",
            store.directory,
            args.bundle,
            bundle.provider,
            len(items),
            args.batch_size,
        )
        summary = build(bundle, store, items, batch_size=args.batch_size, id_mode=args.ids, workers=args.workers)
        summary.listed = listed
        store.save_index(args.index)
    for line in summary.lines():
        print(line)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    dest_root = Path(args.store)
    by_model: dict[str, list[EmbeddingStore]] = {}
    for src_root in args.sources:
        ids = [args.model_id] if args.model_id else store_dirs(Path(src_root))
        if not ids:
            raise ValueError(f"{src_root} holds no store to merge")
        for mid in ids:
            src = EmbeddingStore.open(src_root, mid, None)
            if src.directory.resolve() == (dest_root / mid).resolve():
                raise ValueError(f"{src_root} is the destination itself")
            by_model.setdefault(mid, []).append(src)
    for mid, sources in by_model.items():
        sources.sort(key=shard_order)  # shards in K order reproduce the unsharded row order
        parts = {shard_order(s) for s in sources}
        of = {p[0] for p in parts}
        if len(of) == 1 and sys.maxsize not in of and len(parts) < next(iter(of)):
            log.warning("merging %d shards of %d for %s: some shards are missing", len(parts), next(iter(of)), mid)
        dest = EmbeddingStore.open(dest_root, mid, sources[0].dim, create=True)
        with dest.writer(f"dide-cache merge {' '.join(args.sources)}"):
            summary = merge(sources, dest)
            dest.save_index(args.index)
        print(
            f"{mid}: merged {len(sources)} stores: +{summary.rows_added} rows, +{summary.ids_added} ids, "
            f"{summary.id_conflicts} id conflicts; {summary.store_rows} rows in {dest.directory}"
        )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    store = open_existing(args.store, args.model_id, args.bundle)
    problems, warnings = store.verify()
    if args.bundle:
        model_id, dim = bundle_model(args.bundle)
        if (model_id, dim) != (store.model_id, store.dim):
            problems.append(f"the bundle's model_id/dim {model_id}/{dim} differ from the store's")
    for w in warnings:
        log.warning("%s", w)
    if problems:
        for p in problems:
            print(f"FAIL {store.directory}: {p}")
        return 1
    held = f"{len(store)} rows of dim {store.dim}, {len(store.commits())} commits, {len(store.user_ids())} user ids"
    print(f"OK {store.directory}: {held}, index {store.index_kind}")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    store = open_existing(args.store, args.model_id, args.bundle)
    stats = {
        "directory": str(store.directory),
        "model_id": store.model_id,
        "rows": len(store),
        "dim": store.dim,
        "user_ids": len(store.user_ids()),
        "commits": len(store.commits()),
        "bytes": store.disk_bytes(),
        "index": store.manifest.get("index"),
        "rejects": len(store.rejects()),
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(store.manifest["updated"])),
        "locked_by": store.locked_by(),
    }
    if store.shard() is not None:
        stats["shard"] = store.shard()
    print(json.dumps(stats, indent=2))
    return 0


def cmd_similar(args: argparse.Namespace) -> int:
    store = open_existing(args.store, args.model_id, args.bundle)
    if args.id is not None:
        vectors, found = store.get([args.id])
        if not found[0]:
            raise ValueError(f"{args.id!r} is neither a sha256 nor a user id in {store.directory}")
        query = vectors[0]
    else:
        data = Path(args.image).read_bytes()
        vectors, found = store.get([content_key(data)])
        if found[0]:
            query = vectors[0]
        elif args.bundle:
            bundle = Bundle.load(args.bundle)
            query = bundle.encode_images(bundle.preprocess_images([data]))[0]
        else:
            raise ValueError(f"{args.image} is not in the store; pass --bundle to encode it")
    names: dict[str, list[str]] = {}
    for uid, sha in store.user_ids().items():
        names.setdefault(sha, []).append(uid)
    for rank, (sha, score) in enumerate(store.search(query, args.k), 1):
        print(f"{rank:3d}  {score:.4f}  {sha}  {','.join(names.get(sha, []))}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dide-cache",
        description=__doc__,
        epilog="exit status: 0 done, 1 error (the log says why), 3 the store is locked by another writer",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def store_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--store", required=True, help="store root (holds one directory per model_id)")
        p.add_argument("--model-id", help="which store under the root (default: the bundle's, or the only one)")
        p.add_argument("--bundle", help="bundle directory, to name the store by its model_id")

    p = sub.add_parser("build", help="encode images into the store, skipping what is cached")
    p.add_argument("--bundle", required=True, help="bundle directory written by dide-export")
    p.add_argument("--images", required=True, help="a directory tree, a glob (quote it), or a text file of paths")
    p.add_argument("--store", required=True, help="store root; the store is ROOT/<bundle model_id>")
    p.add_argument("--batch-size", type=int, default=32, help="images per ONNX run and per commit")
    p.add_argument("--shard", help="K/N: encode only the K-th of N contiguous slices of the sorted listing")
    p.add_argument("--ids", choices=ID_MODES, default="stem", help="user id recorded per file (file stem by default)")
    p.add_argument("--index", choices=INDEX_KINDS, help="faiss index kind to save (default: the store's, flat)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="threads reading and decoding")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: all cores)")
    p.set_defaults(run=cmd_build)

    p = sub.add_parser("merge", help="merge shard stores into one store")
    p.add_argument("--store", required=True, help="destination store root")
    p.add_argument("sources", nargs="+", help="shard store roots (merged in shard order)")
    p.add_argument("--model-id", help="merge only this model_id (default: every one found)")
    p.add_argument("--index", choices=INDEX_KINDS, help="faiss index kind to save (default: flat)")
    p.set_defaults(run=cmd_merge)

    p = sub.add_parser("verify", help="check every row against the manifest and commit log")
    store_args(p)
    p.set_defaults(run=cmd_verify)

    p = sub.add_parser("stats", help="print the store's size and state as JSON")
    store_args(p)
    p.set_defaults(run=cmd_stats)

    p = sub.add_parser("similar", help="nearest neighbours of an image in the store")
    store_args(p)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", help="a sha256 or user id in the store")
    which.add_argument("--image", help="an image file (encoded with --bundle if not in the store)")
    p.add_argument("-k", type=int, default=10, help="neighbours to list")
    p.set_defaults(run=cmd_similar)

    search_cli.add_parser(sub)

    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if getattr(args, "batch_size", 1) < 1:
        parser.error("--batch-size must be at least 1")
    try:
        return args.run(args)
    except StoreLocked as e:
        log.error("%s", e)
        return 3
    except (StoreError, BundleError, ValueError, OSError) as e:
        log.error("%s", e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
