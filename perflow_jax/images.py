"""Saving generated images: PNG files written atomically, a grid of a batch, and :class:`OutputFolder`, the
``--out`` folder of a generation run (checked before any work; a rerun replaces only what the last run wrote).
"""

from __future__ import annotations

import math
import os

import numpy as np

from perflow_jax.io import MANIFEST, Manifest, atomic_file, read_manifest, write_manifest

GRID = "grid.png"
GRID_MAX_IMAGES = 100  # a run's grid.png shows at most its first 100 images


def make_grid(images: np.ndarray, ncols: int | None = None, pad: int = 2, fill: int = 255) -> np.ndarray:
    """Tile a batch of uint8 images (B, H, W[, C]) into one image, `ncols` wide (default ≈ √B), separated by
    `pad` pixels of value `fill`."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"make_grid needs a non-empty (B, H, W[, C]) batch, got shape {images.shape}.")
    b, h, w, c = images.shape
    ncols = ncols or math.ceil(math.sqrt(b))
    nrows = math.ceil(b / ncols)
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), fill, dtype=images.dtype)
    for i, img in enumerate(images):
        r, col = divmod(i, ncols)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = img
    return grid[..., 0] if c == 1 else grid


def read_image(path: str | os.PathLike, what: str = "image") -> np.ndarray:
    """An image file as RGB uint8 (H, W, 3). A missing or unreadable file is a one-line ``ValueError`` naming
    `what` (e.g. the CLI flag) and the path."""
    from PIL import Image

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{what} {path!r} does not exist.")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        detail = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"{what} {path!r} is not an image file PIL can read ({type(e).__name__}: {detail}).") from None


def save_png(image: np.ndarray, path: str | os.PathLike) -> str:
    """Write one uint8 image (H, W[, C]) as PNG via a temp file + rename, so no half-written file remains."""
    from PIL import Image

    path = os.fspath(path)
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"save_png expects uint8 pixels, got {image.dtype}.")
    with atomic_file(path) as tmp:
        Image.fromarray(image.squeeze(-1) if image.ndim == 3 and image.shape[-1] == 1 else image).save(tmp,
                                                                                                       format="PNG")
    return path


def save_batch(images: np.ndarray, out_dir: str | os.PathLike, prefix: str = "image", start: int = 0
               ) -> list[str]:
    """Save each image of a batch as ``<prefix>_<index>.png`` in `out_dir`; returns the paths."""
    return [save_png(img, os.path.join(os.fspath(out_dir), f"{prefix}_{start + i:04d}.png"))
            for i, img in enumerate(np.asarray(images))]


class OutputFolder:
    """The output folder of one generation run: ``<prefix>_NNNN.png`` per image plus `extra` files (grid.png).

    Constructing it checks the folder before any work: an empty path, a path that is a file or lies under a file,
    a folder that cannot be written, or one that already holds a file of this run's names that perflow-jax did
    not write all raise (ValueError / NotADirectoryError / PermissionError / FileExistsError). The folder keeps a
    manifest (:data:`perflow_jax.io.MANIFEST`) of the files perflow-jax wrote there, so a rerun replaces its own
    earlier images (removing those the new run does not write again) and touches no other file.

    Use: ``out = OutputFolder(path, n)``, then :meth:`save` per batch (the first call creates the folder and
    records the run), then :meth:`finish`.
    """

    def __init__(self, path: str | os.PathLike, num_images: int, *, prefix: str = "image",
                 extra: tuple[str, ...] = (GRID,), what: str = "--out"):
        self.path = os.fspath(path)
        self.num_images = int(num_images)
        self.extra = tuple(extra)
        self.what = what
        self._new = Manifest("images", self.extra, prefix, self.num_images)
        self._old: Manifest | None = None
        self._started = False
        self._check()

    def _check(self) -> None:
        path, what = self.path, self.what
        if not path.strip():
            raise ValueError(f"{what} is empty; give the folder to write the images to.")
        p = os.path.abspath(path)
        existing = p
        while not os.path.lexists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            if existing == p:
                raise NotADirectoryError(f"{what} {path!r} is a file, not a folder; choose a folder.")
            raise NotADirectoryError(f"{what} {path!r} lies under {existing!r}, which is a file, not a folder.")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise PermissionError(f"{what} {path!r}: the folder {existing!r} is not writable; choose another "
                                  f"{what}.")
        if existing != p:
            return
        old = read_manifest(p)
        if old is None and os.path.lexists(os.path.join(p, MANIFEST)):
            raise FileExistsError(f"{what} {path!r} holds a {MANIFEST} that perflow-jax did not write; choose "
                                  f"another {what}.")
        if old is not None and old.kind != "images":
            raise FileExistsError(f"{what} {path!r} is a {old.kind or 'model'} folder written by perflow-jax, not an "
                                  f"image folder; choose another {what}.")
        self._old = old
        for name in sorted(os.listdir(p)):
            if name in self._new and (old is None or name not in old or not os.path.isfile(os.path.join(p, name))
                                      or os.path.islink(os.path.join(p, name))):
                raise FileExistsError(f"{what} {path!r} already holds {name!r}, which perflow-jax did not write; "
                                      f"choose another {what}, or move it away.")

    def _start(self) -> None:
        """Create the folder and record the union of the last run's files and this run's before writing any."""
        os.makedirs(self.path, exist_ok=True)
        old = self._old
        files = set(self.extra) | (old.files if old is not None else set())
        count = max(self.num_images, old.image_count if old is not None else 0)
        write_manifest(self.path, "images", files, self._new.image_prefix, count)
        self._started = True

    def save(self, images: np.ndarray, start: int = 0) -> list[str]:
        """Write images ``start, start + 1, ...`` of the run (uint8 (B, H, W[, C]))."""
        if not self._started:
            self._start()
        return save_batch(images, self.path, prefix=self._new.image_prefix, start=start)

    def extra_path(self, name: str) -> str:
        """The path to write one of the run's `extra` files (e.g. grid.png) to (atomically, e.g. with
        :func:`save_png`)."""
        if name not in self.extra:
            raise ValueError(f"{name!r} is not one of this run's files {self.extra}.")
        if not self._started:
            self._start()
        return os.path.join(self.path, name)

    def finish(self) -> None:
        """Remove the files of the last run that this run did not write again, and record this run's files."""
        if not self._started:
            self._start()
        old = self._old
        if old is not None:  # only names directly in the folder, listed by the last run and not by this one
            for name in os.listdir(self.path):
                target = os.path.join(self.path, name)
                if (name != MANIFEST and name in old and name not in self._new and os.path.isfile(target)
                        and not os.path.islink(target)):
                    os.remove(target)
        write_manifest(self.path, "images", self.extra, self._new.image_prefix, self.num_images)
