"""Resolve a model location without network: a local folder, or a repo id already in the HF cache.

perflow-jax never downloads. A Hugging Face repo id (``"org/name"``) resolves to its snapshot in the local
cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``), at ``refs/main`` or the
given revision.
"""

from __future__ import annotations

import os
import re

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hf_cache_dir() -> str:
    """The Hugging Face hub cache folder this process would use."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.path.join(home, "hub")


def resolve_model_path(path_or_repo_id: str | os.PathLike, revision: str = "main") -> str:
    """A local folder for `path_or_repo_id`; raises FileNotFoundError saying how to get it if absent."""
    path = os.fspath(path_or_repo_id)
    if os.path.exists(path):
        return path
    if not _REPO_ID.match(path):
        raise FileNotFoundError(f"{path!r} is neither an existing file or folder nor a Hugging Face repo id.")
    cache = hf_cache_dir()
    repo_dir = os.path.join(cache, "models--" + path.replace("/", "--"))
    ref_file = os.path.join(repo_dir, "refs", revision)
    snapshot = revision
    if os.path.isfile(ref_file):
        with open(ref_file, encoding="utf-8") as f:
            snapshot = f.read().strip()
    snap_dir = os.path.join(repo_dir, "snapshots", snapshot)
    if os.path.isdir(snap_dir):
        return snap_dir
    raise FileNotFoundError(
        f"{path!r} is not a local folder and is not in the Hugging Face cache at {cache!r} (revision "
        f"{revision!r}). perflow-jax never downloads: fetch it first on a machine with network, e.g. "
        f"`huggingface-cli download {path}`, or pass a local diffusers-format folder."
    )
