"""Output shards of a generation job: the layout, deterministic PNG and tar bytes, and atomic shard writes.

The job's images are numbered 0, 1, ... in prompt order (all images of prompt 0, then of prompt 1, ...).
Shard ``k`` holds images ``[k·S, (k+1)·S)`` for the job's shard size ``S`` (the last one may be shorter), so
the layout depends only on the job, never on the number of processes or devices. In a job of ``P`` processes,
shard ``k`` is generated and written by process ``k mod P`` (:func:`owner`); a job resumed with another
process count simply deals the missing shards out again.

Formats:

- ``tar``: ``shard-KKKKKK.tar``, webdataset style: per image ``NNNNNNNNNN.png`` and ``NNNNNNNNNN.json`` (the
  10-digit image number as key). Members carry fixed metadata (mtime 0, uid/gid 0, no owner names, mode 0644),
  so the same images give the same tar bytes.
- ``folder``: a folder ``shard-KKKKKK/`` with ``NNNNNNNNNN.png`` per image and ``shard-KKKKKK.jsonl``, one JSON
  line per image in image order.

A shard is written under a temp name and renamed to its final name once complete
(:func:`perflow_jax.io.atomic_file` / :func:`perflow_jax.io.atomic_dir`): a shard with its final name is complete,
and a killed job leaves only temp names, which the next run removes.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from perflow_jax.io import MANIFEST, atomic_dir, atomic_file

SHARD_FORMATS = ("tar", "folder")


class ShardImage(NamedTuple):
    """One encoded image of a shard: its key, PNG bytes and per-image JSON record."""

    key: str
    png: bytes
    meta: dict[str, Any]


def num_shards(num_images: int, shard_size: int) -> int:
    """How many shards `num_images` images fill at `shard_size` images per shard."""
    return -(-num_images // shard_size)


def shard_range(k: int, num_images: int, shard_size: int) -> range:
    """The image numbers shard `k` holds."""
    return range(k * shard_size, min((k + 1) * shard_size, num_images))


def owner(k: int, num_processes: int) -> int:
    """The process that generates and writes shard `k` in a job of `num_processes` processes."""
    return k % num_processes


def shard_name(k: int, fmt: str) -> str:
    """Shard `k`'s final file or folder name."""
    return f"shard-{k:06d}.tar" if fmt == "tar" else f"shard-{k:06d}"


def image_key(n: int) -> str:
    """Image `n`'s key: the member name stem in its shard."""
    return f"{n:010d}"


def is_complete(out_dir: str, k: int, fmt: str) -> bool:
    """Whether shard `k` is complete: its final name exists (shards are renamed into place only when whole)."""
    path = os.path.join(out_dir, shard_name(k, fmt))
    return os.path.isdir(path) if fmt == "folder" else os.path.isfile(path)


def encode_png(image: np.ndarray) -> bytes:
    """A uint8 (H, W, 3) image as PNG bytes; the same pixels always give the same bytes (Pillow's zlib
    encoder at its default level, no time or text chunks)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def json_bytes(meta: dict[str, Any]) -> bytes:
    """A per-image record as compact UTF-8 JSON (keys in the order given)."""
    return json.dumps(meta, ensure_ascii=False, allow_nan=False).encode("utf-8")


def write_shard(out_dir: str, k: int, fmt: str, images: Sequence[ShardImage]) -> str:
    """Write shard `k` of `images` (in image order) under a temp name and rename it into place; returns its path."""
    path = os.path.join(out_dir, shard_name(k, fmt))
    if fmt == "tar":
        with atomic_file(path) as tmp, open(tmp, "wb") as f, tarfile.open(fileobj=f, mode="w",
                                                                           format=tarfile.USTAR_FORMAT) as tar:
            for im in images:
                _add_member(tar, f"{im.key}.png", im.png)
                _add_member(tar, f"{im.key}.json", json_bytes(im.meta))
        return path
    with atomic_dir(path) as tmp:
        for im in images:
            with open(os.path.join(tmp, f"{im.key}.png"), "wb") as f:
                f.write(im.png)
        with open(os.path.join(tmp, f"{shard_name(k, fmt)}.jsonl"), "wb") as f:
            for im in images:
                f.write(json_bytes({"key": im.key, **im.meta}) + b"\n")
    return path


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def read_shard(path: str) -> dict[str, bytes]:
    """Every member of a written shard (tar or folder) by name, e.g. for checks; a folder's manifest excluded."""
    if os.path.isdir(path):
        out = {}
        for name in sorted(os.listdir(path)):
            if name != MANIFEST:
                with open(os.path.join(path, name), "rb") as f:
                    out[name] = f.read()
        return out
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


__all__ = ["SHARD_FORMATS", "ShardImage", "encode_png", "image_key", "is_complete", "json_bytes", "num_shards",
           "owner", "read_shard", "shard_name", "shard_range", "write_shard"]
