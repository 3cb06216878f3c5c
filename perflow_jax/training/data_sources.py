"""In-memory training data: the built-in digits, an ``.npz`` of arrays, or an image folder with captions,
and the per-step sample order (a function of seed and step only). Grain streams of prepared shards live in
:mod:`perflow_jax.training.data`."""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from perflow_jax.models.adapter import UNetCondition


@dataclasses.dataclass(frozen=True)
class ArrayDataset:
    """An in-memory dataset: samples x (N, C, H, W) (pixels or latents), conditions per sample, null condition.

    ``cond`` is a :class:`UNetCondition` of (N, ...) host arrays (``encoder_hidden_states``, ``text_embeds``,
    ``time_ids``, ``class_labels``; absent parts None); ``null_cond`` holds one unbatched null value for each
    part ``cond`` has. A mapping with those names is accepted for either and converted here, the one place
    where dataset conditions become a :class:`UNetCondition`.
    """

    x: np.ndarray
    cond: UNetCondition
    null_cond: UNetCondition

    def __post_init__(self) -> None:
        if np.ndim(self.x) != 4:
            raise ValueError(f"Dataset x must be (N, C, H, W), got shape {np.shape(self.x)}.")
        cond, null = UNetCondition.from_mapping(self.cond), UNetCondition.from_mapping(self.null_cond)
        object.__setattr__(self, "cond", cond)
        object.__setattr__(self, "null_cond", null)
        n = len(self.x)
        for k, v, nv in zip(UNetCondition._fields, cond, null, strict=True):
            if v is None:
                if nv is not None:
                    raise ValueError(f"null_cond has {k!r} but cond does not; give both or neither.")
                continue
            if len(v) != n:
                raise ValueError(f"Condition {k!r} has {len(v)} rows for {n} samples.")
            if nv is None:
                raise ValueError(f"Condition {k!r} has no null value in null_cond (needed for CFG dropout).")

    def __len__(self) -> int:
        return len(self.x)

    def rows(self, idx: np.ndarray) -> tuple[np.ndarray, UNetCondition]:
        """Samples and their conditions at integer indices `idx` of any shape (e.g. (A, B) micro-batches)."""
        return self.x[idx], jax.tree_util.tree_map(lambda v: v[idx], self.cond)


def load_image_folder(path: str, image_size: int | None = None, channels: int = 1) -> tuple[np.ndarray, list[str]]:
    """Images listed in ``<path>/metadata.jsonl`` (lines ``{"file_name": ..., "text": ...}``) as
    ((N, channels, H, W) float32 in [-1, 1], captions). A bad line or image is a ValueError naming it."""
    from PIL import Image

    meta = os.path.join(path, "metadata.jsonl")
    if not os.path.isfile(meta):
        raise ValueError(f"data.path={path!r} needs a metadata.jsonl with file_name and text per line.")
    images, captions = [], []
    with open(meta, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                name, text = row["file_name"], row["text"]
                with Image.open(os.path.join(path, name)) as im:
                    img = im.convert("L" if channels == 1 else "RGB")
            except (ValueError, TypeError, KeyError, OSError) as e:
                raise ValueError(f"{meta}:{n}: not a usable {{\"file_name\": ..., \"text\": ...}} line with a "
                                 f"readable image ({type(e).__name__}: {e}).") from e
            if image_size:
                img = img.resize((image_size, image_size), Image.BICUBIC)
            a = np.asarray(img, np.float32) / 127.5 - 1.0
            images.append(a[None] if channels == 1 else a.transpose(2, 0, 1))
            captions.append(str(text))
    if not images:
        raise ValueError(f"{meta} lists no images.")
    try:
        return np.stack(images), captions
    except ValueError as e:
        raise ValueError(f"The images in {path!r} differ in size; set data.image_size to resize them.") from e


def _load_npz_dataset(path: str) -> ArrayDataset:
    """An ``.npz`` dataset (no pickles), checked on load: a float ``x`` of finite values."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data.path={path!r} does not exist (data.kind=npz needs an .npz file).")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"data.path={path!r} is not an .npz file (a zip of .npy arrays, from np.savez).")
    try:
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, AttributeError) as e:
        raise ValueError(f"data.path={path!r} is not a readable .npz of numeric arrays ({e}).") from e
    if "x" not in arrays:
        raise ValueError(f"data.path={path!r} has no array 'x' (the samples); it has {sorted(arrays)}.")
    x = arrays["x"]
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"data.path={path!r}: x must be floating point, got {x.dtype}.")
    if not np.isfinite(x).all():
        raise ValueError(f"data.path={path!r}: x holds NaN or inf values.")
    cond = {k[5:]: v for k, v in arrays.items() if k.startswith("cond/")}
    null = {k[5:]: v for k, v in arrays.items() if k.startswith("null/")}
    for k, v in [*cond.items(), *null.items()]:
        if v.dtype.kind not in "iuf" or (v.dtype.kind == "f" and not np.isfinite(v).all()):
            raise ValueError(f"data.path={path!r}: condition {k!r} must hold finite numbers, got {v.dtype}.")
    try:
        return ArrayDataset(x, cond, null)
    except ValueError as e:
        raise ValueError(f"data.path={path!r}: {e}") from e


def load_dataset(cfg: dict[str, Any], encode_fn: Callable[[np.ndarray, list[str]], ArrayDataset] | None = None
                 ) -> ArrayDataset:
    """The dataset named by ``cfg["data"]``: the built-in digits, an ``.npz`` (``x``, ``cond/<name>``,
    ``null/<name>``), or an image folder with captions (encoded by `encode_fn`, or class-label captions)."""
    d = cfg["data"]
    if d["kind"] == "digits":
        from perflow_jax.pipelines import digits

        x, y = digits.load_digits_data("train")
        return ArrayDataset(x, UNetCondition(class_labels=y), UNetCondition(class_labels=np.int32(digits.NULL_CLASS)))
    if d["kind"] == "npz":
        return _load_npz_dataset(d["path"])
    images, captions = load_image_folder(d["path"], d["image_size"])
    if encode_fn is not None:
        return encode_fn(images, captions)
    try:
        labels = np.asarray([int(c) for c in captions], np.int32)
    except ValueError as e:
        raise ValueError("An image folder with text captions needs an encode_fn (e.g. VAE + text encoder); "
                         "without one, captions must be integer class labels.") from e
    from perflow_jax.pipelines import digits

    return ArrayDataset(images, UNetCondition(class_labels=labels),
                        UNetCondition(class_labels=np.int32(digits.NULL_CLASS)))


def batch_indices(n: int, seed: int, step: int, batch: int) -> np.ndarray:
    """Sample indices of step `step`: consecutive slices of per-epoch permutations (a function of seed and
    step only, so resumed runs see the same data order)."""
    start = step * batch
    out = []
    while len(out) < batch:
        epoch, pos = divmod(start + len(out), n)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        out.extend(perm[pos:pos + batch - len(out)].tolist())
    return np.asarray(out, np.int64)



__all__ = ["ArrayDataset", "batch_indices", "load_dataset", "load_image_folder"]
