"""Tiny image–caption data sets for the prepare/training tests: an image folder (metadata.jsonl or NAME.txt
captions) and a webdataset .tar in img2dataset's layout, optionally with corrupt images."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
from PIL import Image


def png_bytes(rng: np.random.Generator, height: int, width: int) -> bytes:
    """A random RGB PNG of (height, width)."""
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def write_image_folder(folder: str, n: int, *, metadata: bool = True, seed: int = 0,
                       size: tuple[int, int] = (20, 24)) -> list[str]:
    """`n` images of `size` (non-square: the crop matters) with captions; returns the captions in order."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    captions = [f"a red cat number {i}" for i in range(n)]
    rows = []
    for i, caption in enumerate(captions):
        name = f"img_{i:03d}.png"
        with open(os.path.join(folder, name), "wb") as f:
            f.write(png_bytes(rng, *size))
        if metadata:
            rows.append(json.dumps({"file_name": name, "text": caption}))
        else:
            with open(os.path.join(folder, f"img_{i:03d}.txt"), "w", encoding="utf-8") as f:
                f.write(caption + "\n")
    if metadata:
        with open(os.path.join(folder, "metadata.jsonl"), "w", encoding="utf-8") as f:
            f.write("\n".join(rows) + "\n")
    return captions


def write_webdataset(path: str, n: int, *, corrupt: tuple[int, ...] = (), seed: int = 1,
                     size: tuple[int, int] = (24, 16)) -> list[str]:
    """A .tar of `n` samples (KEY.jpg, KEY.txt, KEY.json); those in `corrupt` hold bytes that are no image."""
    rng = np.random.default_rng(seed)
    captions = [f"the dog {i} on a mat" for i in range(n)]
    with tarfile.open(path, "w") as tar:
        for i, caption in enumerate(captions):
            if i in corrupt:
                image = b"\xff\xd8\xff\xe0 this is not a jpeg"
            else:
                buf = io.BytesIO()
                Image.open(io.BytesIO(png_bytes(rng, *size))).save(buf, "JPEG", quality=95)
                image = buf.getvalue()
            for ext, data in (("jpg", image), ("txt", caption.encode()), ("json", json.dumps({"key": i}).encode())):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return captions
