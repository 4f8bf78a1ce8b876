"""Artifacts that travel between the nodes of a cluster, and each node's local cache that holds them.

An artifact is a file or folder at a relative path under a node's cache (`teachers/<spec hash>`); its path names
its content, so a node that holds the path already never fetches it again. The node that made it packs it as a tar,
either into an array for Ray's object store or onto a storage URL (any fsspec URL: `s3://bucket/kd`,
`file:///shared/kd`); a node that needs it unpacks it beside the path and renames it into place, so no reader sees
half an artifact and two workers that place the same one at once both end with one whole copy.
Nothing here imports Ray: the scheduler (ray_cluster) moves what this module packs.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import tarfile
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

CACHE_ENV = "KDBENCH_NODE_CACHE"


def node_cache_dir() -> Path:
    """This node's cache: $KDBENCH_NODE_CACHE (set it per node, e.g. `KDBENCH_NODE_CACHE=/local/ssd ray start`),
    else a folder in the system's temporary directory."""
    root = Path(os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir()) / "kdbench-node-cache")
    root.mkdir(parents=True, exist_ok=True)
    return root


@dataclass
class Transfer:
    """What placing or packing one artifact cost: `how` is hit (already here), fetched, packed, uploaded, kept
    (already on the storage) or absent (the job made nothing there, or no source was given)."""

    path: str
    how: str
    bytes: int = 0
    seconds: float = 0.0


def _check_relative(rel: str) -> None:
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise ValueError(f"artifact path {rel!r} must be relative to the node cache, without '..'")


def _tar(src: Path, out: Path) -> None:
    with tarfile.open(out, "w") as tar:  # uncompressed: model weights barely compress, and time is the cost
        tar.add(src, arcname=src.name)


def _untar_into_place(tar_path: Path, dest: Path) -> None:
    """Unpack a tar made by `_tar` so that `dest` appears whole, in one rename."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.incoming-", dir=dest.parent))
    try:
        with tarfile.open(tar_path) as tar:
            tar.extractall(tmp, filter="data")  # no absolute paths, links out of the folder or device files
        (only,) = list(tmp.iterdir())
        os.rename(only, dest)
    except OSError:
        if not dest.exists():  # a worker beside us placed it first: keep theirs
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _storage(url: str):
    from fsspec.core import url_to_fs

    return url_to_fs(url)


def _storage_url(storage: str, rel: str) -> str:
    return storage.rstrip("/") + "/" + rel + ".tar"


def pack(cache: Path, rel: str, storage: str | None = None) -> tuple[Any, Transfer]:
    """Pack `cache/rel` for other nodes: (a uint8 array of the tar, for the object store) without `storage`, else
    (the URL it was uploaded to); None when the job left nothing at `rel`."""
    import numpy as np

    _check_relative(rel)
    src = cache / rel
    if not src.exists():
        return None, Transfer(rel, "absent")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=cache, prefix=".pack-") as tmp:
        tar_path = Path(tmp) / "artifact.tar"
        if storage is None:
            _tar(src, tar_path)
            data = np.fromfile(tar_path, dtype=np.uint8)  # an array goes into the object store without pickling
            return data, Transfer(rel, "packed", data.nbytes, time.perf_counter() - t0)
        url = _storage_url(storage, rel)
        fs, path = _storage(url)
        if fs.exists(path):  # the path names the content: what is there is what we would upload
            return url, Transfer(rel, "kept", 0, time.perf_counter() - t0)
        _tar(src, tar_path)
        part = f"{path}.{uuid.uuid4().hex}.part"
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        fs.put_file(str(tar_path), part)
        fs.mv(part, path)  # readers never see a partial upload under the final name
        return url, Transfer(rel, "uploaded", tar_path.stat().st_size, time.perf_counter() - t0)


def pack_local(path: str | Path) -> Any:
    """A driver-side file or folder as an object-store source (an array of its tar), for `place`."""
    import numpy as np

    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        tar_path = Path(tmp) / "artifact.tar"
        _tar(path, tar_path)
        return np.fromfile(tar_path, dtype=np.uint8)


def place(cache: Path, rel: str, fetch: Callable[[], Any]) -> Transfer:
    """Make `cache/rel` exist, unless it does: `fetch()` is called only then and returns what `pack` made (an
    array, a URL or None)."""
    _check_relative(rel)
    dest = cache / rel
    if dest.exists():
        return Transfer(rel, "hit")
    t0 = time.perf_counter()
    source = fetch()
    if source is None:
        return Transfer(rel, "absent")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".fetch-") as tmp:
        tar_path = Path(tmp) / "artifact.tar"
        if isinstance(source, str):
            fs, path = _storage(source)
            fs.get_file(path, str(tar_path))
        else:
            with open(tar_path, "wb") as f:
                f.write(memoryview(source))  # straight from the object store's shared memory
        size = tar_path.stat().st_size
        _untar_into_place(tar_path, dest)
    return Transfer(rel, "fetched", size, time.perf_counter() - t0)
