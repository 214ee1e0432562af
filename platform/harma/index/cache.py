"""Node-local copies of index files, so a replica can memory-map an index that lives in s3://.

    path = local_file("s3://bucket/indexes/rsitmd", "images.f16.npy", key=fingerprint)

A local index is used where it is. A remote file is fetched once per node into
`$HARMA_INDEX_CACHE` (default `~/.cache/harma/indexes`) under `key` (the index's fingerprint and
version), written to a temporary name and renamed, so replicas starting together on one node never
map half a file, and the next replica on the node maps the same pages without another download.
The cache is bounded (`$HARMA_INDEX_CACHE_BYTES`, default 64 GiB): after a fetch, the versions
used longest ago are removed until the rest fit (never the one just fetched; a replica still
mapping a removed file keeps its pages: Linux frees an unlinked file when its last map goes).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from harma import storage

CACHE_VAR = "HARMA_INDEX_CACHE"
LIMIT_VAR = "HARMA_INDEX_CACHE_BYTES"
DEFAULT_LIMIT = 64 << 30


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_VAR) or Path.home() / ".cache" / "harma" / "indexes")


def local_file(uri: str, name: str, key: str) -> str:
    """A local path holding file `name` of the index at `uri` (the file itself for a local index)."""
    if not storage.is_s3(uri):
        return storage.join(uri, name)
    folder = cache_root() / re.sub(r"[^A-Za-z0-9_.-]", "_", key)
    target = folder / name
    if target.exists():
        os.utime(folder)  # used now: the last to be evicted
        return str(target)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{name}.", delete=False) as tmp:
        tmp.write(storage.read_bytes(storage.join(uri, name)))
    os.replace(tmp.name, target)
    os.utime(folder)
    evict(keep=folder, limit=int(os.environ.get(LIMIT_VAR) or DEFAULT_LIMIT))
    return str(target)


def evict(keep: Path, limit: int) -> list[str]:
    """Remove whole cached versions, least recently used first, until the cache holds at most
    `limit` bytes or only `keep` is left; the names removed."""
    root = cache_root()
    versions = [d for d in root.iterdir() if d.is_dir()] if root.exists() else []
    sizes = {d: sum(f.stat().st_size for f in d.iterdir() if f.is_file()) for d in versions}
    total, removed = sum(sizes.values()), []
    for d in sorted(versions, key=lambda d: d.stat().st_mtime):
        if total <= limit:
            break
        if d == keep:
            continue
        shutil.rmtree(d, ignore_errors=True)
        total -= sizes[d]
        removed.append(d.name)
    return removed
