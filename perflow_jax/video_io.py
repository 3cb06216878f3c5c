"""Writing generated videos: MP4 (imageio-ffmpeg, the ``[video]`` extra), GIF or APNG (Pillow), and a contact
sheet PNG of all frames. Every file is written to a temp name beside its destination and renamed, so no
half-written video remains.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np

from perflow_jax.images import make_grid, save_png
from perflow_jax.io import atomic_file

__all__ = ["VIDEO_FORMATS", "has_mp4_writer", "to_uint8", "write_contact_sheet", "write_video"]

VIDEO_FORMATS = (".mp4", ".gif", ".png", ".apng")


def has_mp4_writer() -> bool:
    """Whether the ``[video]`` extra (imageio-ffmpeg, which ships an ffmpeg binary) is installed."""
    return importlib.util.find_spec("imageio_ffmpeg") is not None


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """``(F, H, W, 3)`` float frames in [0, 1] → uint8 (rounded, clipped), as diffusers' ``numpy_to_pil``."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"Video frames must be (F, H, W, 3) with F ≥ 1, got shape {frames.shape}.")
    if frames.dtype == np.uint8:
        return frames
    return (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)


def write_video(frames: np.ndarray, path: str | os.PathLike, fps: float) -> str:
    """Write `frames` (uint8 or [0, 1] floats, ``(F, H, W, 3)``) to `path` at `fps` frames per second; the format
    follows the extension: ``.mp4`` (H.264 yuv420p, needs the ``[video]`` extra and even sides), ``.gif``, or
    ``.png``/``.apng`` (animated PNG). Returns the path."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in VIDEO_FORMATS:
        raise ValueError(f"Unsupported video file {path!r}: use one of {', '.join(VIDEO_FORMATS)}.")
    if not fps > 0 or not np.isfinite(fps):
        raise ValueError(f"fps must be a positive number, got {fps!r}.")
    frames = to_uint8(frames)
    if ext == ".mp4":
        _write_mp4(frames, path, fps)
    else:
        _write_pillow(frames, path, fps, "GIF" if ext == ".gif" else "PNG")
    return path


def _write_mp4(frames: np.ndarray, path: str, fps: float) -> None:
    if not has_mp4_writer():
        raise ValueError(f"Writing {path!r} needs the [video] extra (pip install 'perflow-jax[video]'); or write a "
                         ".gif or .png (animated) instead.")
    import imageio_ffmpeg

    _, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"MP4 (yuv420p) needs even frame sides, got {w}×{h}; write a .gif or .png instead.")
    with atomic_file(path) as tmp:
        writer = imageio_ffmpeg.write_frames(tmp, (w, h), fps=fps, codec="libx264", macro_block_size=1,
                                             output_params=["-f", "mp4"])
        writer.send(None)  # start ffmpeg
        try:
            for frame in frames:
                writer.send(np.ascontiguousarray(frame))
        finally:
            writer.close()


def _write_pillow(frames: np.ndarray, path: str, fps: float, fmt: str) -> None:
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    duration = int(round(1000 / fps))  # ms per frame
    with atomic_file(path) as tmp:
        images[0].save(tmp, format=fmt, save_all=True, append_images=images[1:], duration=duration, loop=0)


def write_contact_sheet(frames: np.ndarray, path: str | os.PathLike, ncols: int | None = None) -> str:
    """All frames tiled into one PNG (:func:`perflow_jax.images.make_grid`), written atomically."""
    return save_png(make_grid(to_uint8(frames), ncols), path)
