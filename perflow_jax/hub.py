"""Resolve a model location: a local folder, a repo id in the HF cache, or a repo id fetched from the Hub.

A Hugging Face repo id (``"org/name"``) resolves to its snapshot in the local cache (``$HF_HUB_CACHE``, else
``$HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub`` or ``~/.cache/huggingface/hub``, as huggingface_hub)
at ``refs/<revision>``. A repo id that is not cached is downloaded with ``huggingface_hub.snapshot_download``
from ``$HF_ENDPOINT`` (default huggingface.co), limited to what perflow-jax reads (:func:`download_patterns`,
:func:`select_files`): JSON configs, tokenizer files and the safetensors of the requested variant (per folder,
the plain ones where a folder lacks the variant); PyTorch pickles only with ``allow_pickle``; never ``.ckpt``,
``.msgpack`` or ``.onnx``.
``HF_HUB_OFFLINE=1`` or ``local_files_only=True`` turn downloads off: then a repo id must already be cached.
The environment is read at each call, so ``HF_ENDPOINT`` / ``HF_HOME`` set after import still apply.
"""

from __future__ import annotations

import fnmatch
import os
import posixpath
import re
from collections.abc import Iterable, Sequence

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TRUE = {"1", "ON", "YES", "TRUE"}


def hf_cache_dir() -> str:
    """The Hugging Face hub cache folder this process would use."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    home = os.environ.get("HF_HOME") or os.path.join(cache, "huggingface")
    return os.path.join(home, "hub")


def is_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) turns downloads off: set now, or set when
    huggingface_hub was imported (it reads the variable once, and then refuses every request)."""
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or any(
        os.environ.get(name, "").upper() in _TRUE for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def is_repo_id(path: str | os.PathLike) -> bool:
    """``"org/name"`` that is not an existing local path."""
    path = os.fspath(path)
    return not os.path.exists(path) and bool(_REPO_ID.match(path))


_OTHER_PATTERNS = ("*.json", "*merges.txt", "*delta_weights.safetensors")


def _weight_patterns(variant: str | None, allow_pickle: bool) -> list[str]:
    v = f".{variant}" if variant else ""
    patterns = [f"*model{v}.safetensors", f"*model{v}-*-of-*.safetensors", f"*model-*-of-*{v}.safetensors"]
    return patterns + ([f"*model{v}.bin", f"*model{v}-*-of-*.bin"] if allow_pickle else [])


def download_patterns(variant: str | None = None, allow_pickle: bool = False) -> list[str]:
    """``allow_patterns`` for what perflow-jax reads from a repo: JSON configs (model_index, config,
    scheduler, tokenizer configs, sharded-weights indexes), ``merges.txt``, ΔW files, and the model weights of
    `variant` only (``*model[.variant].safetensors`` and their shards); ``*model[.variant].bin`` only with
    `allow_pickle`. ``*`` also matches ``/``, so each pattern covers every subfolder."""
    return list(_OTHER_PATTERNS) + _weight_patterns(variant, allow_pickle)


def select_files(files: Sequence[str], variant: str | None, allow_pickle: bool = False) -> list[str]:
    """The files of a repo listing that perflow-jax reads: configs and tokenizer files, and in each folder the
    weights of `variant` where the folder has them, else its plain weights (diffusers' rule for a pipeline
    whose components do not all come in the variant)."""
    chosen = [f for f in files if any(fnmatch.fnmatch(f, p) for p in _OTHER_PATTERNS)]
    folders: dict[str, list[str]] = {}
    for f in files:
        folders.setdefault(posixpath.dirname(f), []).append(f)
    for names in folders.values():
        def matching(v: str | None, names: list[str] = names) -> list[str]:
            return [f for f in names if any(fnmatch.fnmatch(posixpath.basename(f), p)
                                            for p in _weight_patterns(v, allow_pickle))]
        chosen += (matching(variant) if variant else []) or matching(None)
    return sorted(set(chosen))


def cached_snapshot(repo_id: str, revision: str = "main") -> str | None:
    """The cached snapshot folder of `repo_id` at `revision` (a branch, tag or commit), or None."""
    repo_dir = os.path.join(hf_cache_dir(), "models--" + repo_id.replace("/", "--"))
    ref_file = os.path.join(repo_dir, "refs", revision)
    snapshot = revision
    if os.path.isfile(ref_file):
        with open(ref_file, encoding="utf-8") as f:
            snapshot = f.read().strip()
    snap_dir = os.path.join(repo_dir, "snapshots", snapshot)
    return snap_dir if os.path.isdir(snap_dir) else None


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".msgpack", ".json")


def names_have_variant(names: Iterable[str], variant: str) -> bool:
    """Some name is a weights file of `variant`: ``*.{variant}.safetensors`` (or ``.bin``, ``.msgpack``, a
    sharded index ``*.{variant}.json``) or a shard ``*.{variant}-00001-of-00002.safetensors``."""
    return any((f".{variant}." in n or f".{variant}-" in n) and n.endswith(_WEIGHT_SUFFIXES) for n in names)


def _has_variant(folder: str, variant: str) -> bool:
    """A cached snapshot already holds some weights of `variant`."""
    return names_have_variant((n for _, _, names in os.walk(folder) for n in names), variant)


def _hub_error(repo_id: str, e: Exception) -> OSError:
    """One line for a failed Hub call (huggingface_hub's messages span several lines)."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    return FileNotFoundError(f"Could not fetch {repo_id!r} from {endpoint} ({type(e).__name__}: {first}); check "
                             "the repo id, revision and network, or pass a local diffusers-format folder.")


def repo_files(repo_id: str, revision: str = "main") -> list[str]:
    """The file paths of `repo_id` at `revision` on the Hub (one listing call; downloads nothing)."""
    from huggingface_hub import HfApi

    try:
        return list(HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None).list_repo_files(repo_id, revision=revision))
    except Exception as e:  # huggingface_hub/httpx raise many types; all mean "could not list"
        raise _hub_error(repo_id, e) from e


def _offline_error(repo_id: str, revision: str, local_files_only: bool) -> FileNotFoundError:
    why = "local_files_only=True" if local_files_only else "HF_HUB_OFFLINE is set"
    return FileNotFoundError(
        f"{repo_id!r} is not a local folder and is not in the Hugging Face cache at {hf_cache_dir()!r} (revision "
        f"{revision!r}), and downloads are off ({why}): fetch it first on a machine with network (e.g. "
        f"`hf download {repo_id}`), allow downloads, or pass a local diffusers-format folder.")


def downloads_allowed(local_files_only: bool = False) -> bool:
    """False when `local_files_only` or ``HF_HUB_OFFLINE`` turns downloads off."""
    return not (local_files_only or is_offline())


def resolve_model_path(path_or_repo_id: str | os.PathLike, revision: str = "main", *, variant: str | None = None,
                       allow_pickle: bool = False, local_files_only: bool = False,
                       allow_patterns: Sequence[str] | None = None) -> str:
    """A local path for `path_or_repo_id`: itself if it exists, else the cached snapshot of the repo id (one
    without any file of `variant` is completed from the Hub when downloads are allowed), else the snapshot
    downloaded now (only :func:`select_files` / :func:`download_patterns` of `variant`, or `allow_patterns`).

    Raises:
      FileNotFoundError: neither a path nor a repo id; or a repo id that is not cached while downloads are off
        (``HF_HUB_OFFLINE=1`` / `local_files_only`), or that the Hub cannot serve (unknown repo or revision,
        no network); the message names the repo, the cache folder and what to do.
    """
    path = os.fspath(path_or_repo_id)
    if os.path.exists(path):
        return path
    if not _REPO_ID.match(path):
        raise FileNotFoundError(f"{path!r} is neither an existing file or folder nor a Hugging Face repo id.")
    cached = cached_snapshot(path, revision)
    # A cached snapshot is used as is, unless it lacks the asked variant, or the caller names files to fetch.
    complete = allow_patterns is None and (variant is None or _has_variant(cached, variant)) if cached else False
    if cached is not None and (complete or not downloads_allowed(local_files_only)):
        return cached
    if not downloads_allowed(local_files_only):
        raise _offline_error(path, revision, local_files_only)
    from huggingface_hub import snapshot_download

    if allow_patterns is None and variant is not None:  # per folder: the variant, else the plain weights
        files = repo_files(path, revision)
        allow_patterns = select_files(files, variant, allow_pickle)
        if not names_have_variant(map(posixpath.basename, allow_patterns), variant):
            raise FileNotFoundError(f"Hub repo {path!r} has no weights of variant {variant!r}; its files: "
                                    f"{sorted(files)[:30]}. Check the variant name, or leave it out.")
    try:
        return snapshot_download(path, revision=revision, cache_dir=hf_cache_dir(),
                                 endpoint=os.environ.get("HF_ENDPOINT") or None,
                                 allow_patterns=list(allow_patterns or download_patterns(variant, allow_pickle)))
    except Exception as e:  # huggingface_hub/httpx raise many types; all mean "could not download"
        raise _hub_error(path, e) from e
