"""Safe writes: atomic files and folders, destinations checked before any work, and a manifest of what
perflow-jax wrote, so that it never deletes or replaces a file it did not create.

- :func:`atomic_file` / :func:`atomic_dir` build a result under a temp name beside its destination and rename
  it into place, so a crash or an error never leaves a half-written result. Temp names carry the writing
  process's host and pid (``.NAME.tmp-<host>-<pid>-<rand>``); the next write into that folder removes the temp
  files and folders of processes that no longer exist on this host (:func:`clean_stale_temps`). Temps of live
  processes (a concurrent job) and of other hosts are never touched.
- Files and folders are created with the process umask (e.g. 0644 / 0755 under umask 022), like any other tool.
- Every folder :func:`atomic_dir` writes holds a manifest (:data:`MANIFEST`) listing its files; replacing an
  existing folder (``overwrite``) is allowed only when it is empty or every file in it is listed there.
  :func:`check_destination` also refuses a destination that is, contains or lies inside a source.
- :func:`write_json` refuses NaN and infinity (JSON has no such numbers) with an error naming the key.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
import shutil
import socket
from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["MANIFEST", "Manifest", "atomic_dir", "atomic_file", "check_destination", "clean_stale_temps",
           "check_creatable", "copy_file", "copy_tree", "foreign_files", "read_json", "read_manifest", "temp_path",
           "write_json", "write_manifest"]

MANIFEST = ".perflow-jax-manifest.json"
_WRITTEN_BY = "perflow-jax"

# .NAME.tmp-<host>-<pid>-<8 hex>: the pid and the random part hold no "-", so the split is unambiguous.
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<host>[A-Za-z0-9._-]+)-(?P<pid>[0-9]+)-(?P<rand>[0-9a-f]{8})$")
_cleaned: set[str] = set()  # folders this process has already cleaned


# ----------------------------------------------------------------------------------------------------------
# Temp names and stale temps
# ----------------------------------------------------------------------------------------------------------


def _host() -> str:
    """This host's name as it appears in temp names (characters other than letters, digits, '.', '-' → '_')."""
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "localhost"


def temp_path(path: str | os.PathLike) -> str:
    """A fresh temp path beside `path`: ``.NAME.tmp-<host>-<pid>-<rand>`` in the same folder."""
    path = os.path.abspath(os.fspath(path))
    name = f".{os.path.basename(path)}.tmp-{_host()}-{os.getpid()}-{secrets.token_hex(4)}"
    return os.path.join(os.path.dirname(path), name)


def _pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (when in doubt: yes, so its temps are kept)."""
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, owned by someone else
        return True
    return True


def clean_stale_temps(folder: str | os.PathLike, *, force: bool = False) -> list[str]:
    """Remove the temp files and folders in `folder` left by perflow-jax processes of this host that no longer
    exist (a killed convert or sample). Temps of live processes and of other hosts are kept. Each folder is
    cleaned once per process (`force` cleans again). Returns the paths removed."""
    folder = os.path.abspath(os.fspath(folder))
    if not force and folder in _cleaned:
        return []
    _cleaned.add(folder)
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    host, removed = _host(), []
    for name in names:
        m = _TEMP_RE.match(name)
        if m is None or m["host"] != host or _pid_alive(int(m["pid"])):
            continue
        path = os.path.join(folder, name)
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
            removed.append(path)
        except OSError:
            pass  # gone already (another cleaner) or not ours to remove: leave it
    return removed


# ----------------------------------------------------------------------------------------------------------
# Atomic files and folders
# ----------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temp path beside `path` (an empty file, mode 0666 less the umask); on success it replaces
    `path`, on error it is removed."""
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    clean_stale_temps(folder)
    tmp = temp_path(path)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False, *, sources: Iterable[str | os.PathLike | None] = (),
               flag: str = "overwrite=True") -> Iterator[str]:
    """Yield an empty temp folder beside `path`; on success it takes `path`'s place, on error it is removed.

    The destination is checked first with :func:`check_destination` (against `sources`; an existing `path` is
    replaced only with `overwrite` and only if perflow-jax wrote everything in it) and checked again just
    before the replace. A :data:`MANIFEST` listing every file is written into the folder before it is renamed.
    `flag` is how the error messages name the overwrite switch (``--overwrite`` for the CLI).
    """
    path = os.path.abspath(os.fspath(path))
    check_destination(path, sources, overwrite=overwrite, flag=flag)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    clean_stale_temps(parent)
    tmp = temp_path(path)
    os.mkdir(tmp, 0o777)
    try:
        yield tmp
        write_manifest(tmp, kind="model", files=_list_files(tmp))
        if os.path.lexists(path):
            check_destination(path, (), overwrite=overwrite, flag=flag)  # files may have appeared meanwhile
            old = temp_path(path)
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    finally:
        if os.path.lexists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy a file's contents; the copy gets the umask's mode (not the source's, unlike ``shutil.copy2``)."""
    shutil.copyfile(src, dst)


def copy_tree(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy a folder's files (symlinks followed) into a new folder `dst`, with umask modes throughout."""
    src, dst = os.fspath(src), os.fspath(dst)
    for folder, _, files in os.walk(src, followlinks=True):
        out = os.path.join(dst, os.path.relpath(folder, src))
        os.makedirs(out, exist_ok=True)
        for name in files:
            shutil.copyfile(os.path.join(folder, name), os.path.join(out, name))


# ----------------------------------------------------------------------------------------------------------
# Destinations and manifests
# ----------------------------------------------------------------------------------------------------------


class Manifest:
    """What perflow-jax wrote in a folder: ``files`` (relative, '/'-separated) and an image series
    ``<prefix>_<index:04d>.png`` for index < ``image_count`` (kept as a count: a run may write millions)."""

    def __init__(self, kind: str, files: Iterable[str] = (), image_prefix: str = "image", image_count: int = 0):
        self.kind = kind
        self.files = set(files)
        self.image_prefix = image_prefix
        self.image_count = int(image_count)

    def image_name(self, index: int) -> str:
        return f"{self.image_prefix}_{index:04d}.png"

    def image_index(self, name: str) -> int | None:
        """The series index of `name`, or None if it is not a name of this series."""
        m = re.fullmatch(re.escape(self.image_prefix) + r"_([0-9]{4,})\.png", name)
        if m is None or self.image_name(int(m[1])) != name:
            return None
        return int(m[1])

    def __contains__(self, rel: str) -> bool:
        if rel in self.files:
            return True
        i = self.image_index(rel)
        return i is not None and i < self.image_count

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"written_by": _WRITTEN_BY, "version": 1, "kind": self.kind, "files": sorted(self.files)}
        if self.image_count:
            d["images"] = {"prefix": self.image_prefix, "count": self.image_count}
        return d


def read_manifest(folder: str | os.PathLike) -> Manifest | None:
    """The manifest of `folder`, or None if it has none or one perflow-jax did not write."""
    path = os.path.join(os.fspath(folder), MANIFEST)
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        if not isinstance(d, dict) or d.get("written_by") != _WRITTEN_BY:
            return None
        images = d.get("images") or {}
        return Manifest(str(d.get("kind", "")), [str(f) for f in d.get("files", [])],
                        str(images.get("prefix", "image")), int(images.get("count", 0)))
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def write_manifest(folder: str | os.PathLike, kind: str, files: Iterable[str] = (), image_prefix: str = "image",
                   image_count: int = 0) -> None:
    """Write `folder`'s :data:`MANIFEST` (atomically)."""
    manifest = Manifest(kind, (f for f in files if f != MANIFEST), image_prefix, image_count)
    write_json(os.path.join(os.fspath(folder), MANIFEST), manifest.to_dict())


def _list_files(folder: str) -> list[str]:
    """Every file (and symlink) under `folder`, relative and '/'-separated."""
    out = []
    for root, dirs, files in os.walk(folder):
        links = [d for d in dirs if os.path.islink(os.path.join(root, d))]
        for name in files + links:
            out.append(os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/"))
    return sorted(out)


def foreign_files(folder: str | os.PathLike) -> list[str]:
    """Files and folders in `folder` that perflow-jax did not write (not in its manifest), relative paths.
    Empty for an empty folder or one written wholly by perflow-jax."""
    folder = os.fspath(folder)
    manifest = read_manifest(folder)
    listed = (lambda rel: False) if manifest is None else manifest.__contains__  # noqa: E731
    foreign, kept_dirs = [], set()
    for rel in _list_files(folder):
        if rel == MANIFEST and manifest is not None:
            continue
        if listed(rel) and not os.path.islink(os.path.join(folder, rel)):
            parts = rel.split("/")
            kept_dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))
        else:
            foreign.append(rel)
    for root, dirs, _ in os.walk(folder):
        for d in dirs:
            rel = os.path.relpath(os.path.join(root, d), folder).replace(os.sep, "/")
            if rel not in kept_dirs and not os.path.islink(os.path.join(root, d)):
                foreign.append(rel + "/")
    return sorted(set(foreign))


def check_destination(dst: str | os.PathLike, sources: Iterable[str | os.PathLike | None] = (), *,
                      inputs: Iterable[str | os.PathLike | None] = (), overwrite: bool = False,
                      flag: str = "overwrite=True") -> None:
    """Refuse, before any work, a destination folder that would lose data.

    Raises ValueError if `dst` is, contains or lies inside one of `sources` (the models read), or is or
    contains one of `inputs` (other files read, e.g. a ΔW or LoRA: a destination inside their folder is fine);
    FileExistsError if `dst` exists and `overwrite` is off, if it is a file or a symlink, or if it holds
    anything perflow-jax did not write (``overwrite`` only replaces an empty folder or one perflow-jax wrote,
    see :data:`MANIFEST`); NotADirectoryError if a parent of `dst` is a file. `flag` names the overwrite switch
    in the messages (``--overwrite`` for the CLI).
    """
    dst_s = os.fspath(dst)
    if not dst_s.strip():
        raise ValueError("The destination is an empty path; give the folder to write.")
    real = os.path.realpath(dst_s)
    checks = [(src, True) for src in sources] + [(src, False) for src in inputs]
    for src, whole in checks:
        if src is None or not os.fspath(src).strip() or not os.path.lexists(os.fspath(src)):
            continue  # e.g. a hub repo id: its snapshot folder is passed as another source
        s = os.path.realpath(os.fspath(src))
        if real == s:
            raise ValueError(f"The destination {dst_s!r} is the source {os.fspath(src)!r}; choose another "
                             "destination.")
        if _inside(s, real):
            raise ValueError(f"The destination {dst_s!r} contains the source {os.fspath(src)!r} (replacing it "
                             "would delete the source); choose another destination.")
        if whole and _inside(real, s):
            raise ValueError(f"The destination {dst_s!r} lies inside the source {os.fspath(src)!r}; choose a "
                             "destination outside it.")
    if not os.path.lexists(dst_s):
        check_creatable(dst_s)
        return
    if os.path.islink(dst_s):
        raise FileExistsError(f"The destination {dst_s!r} is a symbolic link; choose another destination "
                              "(perflow-jax does not replace links).")
    if not os.path.isdir(dst_s):
        raise FileExistsError(f"The destination {dst_s!r} is an existing file, not a folder; choose another "
                              "destination.")
    if not overwrite:
        raise FileExistsError(f"{dst_s!r} already exists; choose another destination or pass {flag} to replace "
                              "it.")
    foreign = foreign_files(dst_s)
    if foreign:
        shown = ", ".join(repr(f) for f in foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise FileExistsError(f"{dst_s!r} holds files perflow-jax did not write ({shown}); {flag} only replaces an "
                              "empty folder or one perflow-jax wrote. Choose another destination, or move those "
                              "files away yourself.")


def _inside(path: str, folder: str) -> bool:
    """Whether real path `path` lies strictly inside real path `folder`."""
    return path != folder and os.path.commonpath([path, folder]) == folder


def check_creatable(path: str) -> None:
    """For a path that does not exist: its nearest existing parent must be a writable folder."""
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise NotADirectoryError(f"Cannot create {path!r}: {parent!r} is a file, not a folder.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"Cannot create {path!r}: the folder {parent!r} is not writable.")


# ----------------------------------------------------------------------------------------------------------
# JSON
# ----------------------------------------------------------------------------------------------------------


def _nonfinite_key(obj: Any, where: str = "") -> str | None:
    """The key path of the first NaN or infinity in a JSON-like object, or None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return where or "(the value)"
    if isinstance(obj, dict):
        items: Iterable[tuple[Any, Any]] = obj.items()
    elif isinstance(obj, list | tuple):
        items = enumerate(obj)
    else:
        return None
    for k, v in items:
        found = _nonfinite_key(v, f"{where}[{k}]" if isinstance(k, int) else f"{where}.{k}" if where else str(k))
        if found is not None:
            return found
    return None


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2, sort_keys: bool = False) -> str:
    """Write `obj` as JSON (atomically, with a trailing newline). NaN and infinity are refused with a
    ValueError naming the key: JSON has no such numbers, and other readers reject them."""
    path = os.fspath(path)
    try:
        text = json.dumps(obj, indent=indent, sort_keys=sort_keys, allow_nan=False)
    except ValueError as e:
        key = _nonfinite_key(obj)
        if key is None:
            raise
        raise ValueError(f"Cannot write {path!r}: {key} is not a finite number, which JSON cannot hold; fix the "
                         "value that produced it.") from e
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    return path


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """Load a JSON object from `path`; a missing file, invalid JSON or UTF-8, or JSON that is not an object
    (a list, a number, ...) raises an error naming the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} does not exist.")
    with open(path, encoding="utf-8") as f:
        try:
            obj = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path!r} is not valid JSON: {e}") from e
        except UnicodeDecodeError as e:
            raise ValueError(f"{path!r} is not UTF-8 text, so not a JSON file: {e}") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path!r} holds a JSON {_json_type(obj)}; expected a JSON object ({{...}}) of settings.")
    return obj


def _json_type(obj: Any) -> str:
    return {list: "list", str: "string", bool: "boolean", type(None): "null"}.get(type(obj), "number")
