"""The video row of scripts/benchmark.py: Stable Video Diffusion (``VideoPipeline``) against its parts and diffusers.

On the tiny random SVD of the tests (``tests/support/tiny_svd.py``, built with PyTorch diffusers and saved with
``save_pretrained``; a source checkout is needed, as for the benchmark itself) it measures, interleaved per round:

* the whole jitted pipeline (image embedding, conditioning, N steps with CFG, decoding all frames at once);
* its parts alone, each jitted: image embedding + conditioning encode, one UNet call on the CFG batch, decode;
* diffusers' ``StableVideoDiffusionPipeline`` with the same settings and initial latents.

``overhead = pipeline / (encode + N · UNet + decode)`` (goal ≤ 1.05), and frames/s of both pipelines.
Run alone: ``python scripts/benchmark_video.py [--frames 5] [--steps 4] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = (32, 48)  # H, W of the conditioning image and of the frames


def _timed(calls: dict[str, Callable[[], Any]], sync: dict[str, Callable[[Any], Any]], repeats: int, warmup: int
           ) -> dict[str, float]:
    """Median seconds of each call over `repeats` interleaved rounds, after one untimed call and `warmup` rounds."""
    for name, fn in calls.items():
        sync[name](fn())
    times: dict[str, list[float]] = {name: [] for name in calls}
    for r in range(warmup + repeats):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            sync[name](fn())
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


def bench_video(work: str, frames: int = 5, steps: int = 4, repeats: int = 3, warmup: int = 1) -> dict[str, Any]:
    """One row: seconds of the pipeline and its parts, the overhead, and frames/s of both frameworks."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    sys.path.insert(0, ROOT)
    from perflow_jax.pipelines.video import VideoPipeline, added_time_ids
    from tests.support.tiny_svd import make_tiny_svd

    folder = os.path.join(work, "svd")
    tpipe = make_tiny_svd(folder)
    ours = VideoPipeline.from_pretrained(folder)
    h, w = SIZE
    rng = np.random.default_rng(0)
    image = (rng.random((h, w, 3)) * 255).astype(np.uint8)
    f = 2 ** (len(ours.vae_config.block_out_channels) - 1)
    latents = rng.standard_normal((1, frames, 4, h // f, w // f)).astype(np.float32)
    settings = dict(num_frames=frames, num_inference_steps=steps, decode_chunk_size=frames)

    p, pixels = ours.params, jnp.asarray(image, jnp.float32)[None] / 255.0
    aug = jax.random.normal(jax.random.key(1), (1, 3, h, w))
    encode = jax.jit(lambda p, x, n: (ours.encode_image(p, x), ours.encode_condition(p, x, n, 0.02)))
    ctx, cond = encode(p, pixels, aug)
    x2 = jnp.concatenate([jnp.asarray(latents)] * 2)
    sample = jnp.concatenate([x2, jnp.repeat(jnp.concatenate([cond[:, None]] * 2), frames, axis=1)], axis=2)
    ctx2, ids = jnp.concatenate([ctx] * 2), jnp.concatenate([added_time_ids(7, 127, 0.02)] * 2)
    unet = jax.jit(lambda p, s, c, i: ours.unet.apply({"params": p["unet"]}, s, jnp.full((2,), 0.5), c, i))
    decode = jax.jit(lambda p, z: ours.decode(p, z, frames))
    gen = torch.Generator().manual_seed(0)

    def torch_run() -> Any:
        from PIL import Image

        with torch.no_grad():
            return tpipe(Image.fromarray(image), height=h, width=w, latents=torch.from_numpy(latents),
                         generator=gen, output_type="np", **settings).frames

    calls = {"pipeline": lambda: ours(image, latents=latents, **settings),
             "encode": lambda: encode(p, pixels, aug), "unet": lambda: unet(p, sample, ctx2, ids),
             "decode": lambda: decode(p, jnp.asarray(latents)), "diffusers": torch_run}
    sync = {k: (lambda x: x) if k in ("pipeline", "diffusers") else jax.block_until_ready for k in calls}
    t = _timed(calls, sync, repeats, warmup)
    row: dict[str, Any] = {"frames": frames, "steps": steps, "size": f"{w}x{h}", **{f"{k}_s": v for k, v in t.items()}}
    row["limit_s"] = t["encode"] + steps * t["unet"] + t["decode"]
    row["overhead"] = t["pipeline"] / row["limit_s"]
    row["frames_per_s"] = frames / t["pipeline"]
    row["diffusers_frames_per_s"] = frames / t["diffusers"]
    print(f"[video] {frames} frames, {steps} steps: pipeline {t['pipeline']:.3f}s, limit {row['limit_s']:.3f}s, "
          f"overhead {row['overhead']:.3f}; frames/s perflow-jax {row['frames_per_s']:.2f}, diffusers "
          f"{row['diffusers_frames_per_s']:.2f}", flush=True)
    return row


def markdown(row: dict[str, Any], goal: float) -> list[str]:
    """The report's lines for the video row."""
    mark = "" if row["overhead"] <= goal else " ⚠"
    return ["", f"Stable Video Diffusion image → video (tiny random SVD, {row['size']}, CFG, decode all frames at "
            "once) against its parts alone: limit = image embedding + conditioning encode + N x UNet (CFG batch) + "
            "decode; frames/s of both pipelines on this machine.", "",
            "| frames | steps | pipeline s | encode s | N x UNet s | decode s | limit s | overhead | frames/s | "
            "diffusers frames/s |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            f"| {row['frames']} | {row['steps']} | {row['pipeline_s']:.3f} | {row['encode_s']:.3f} | "
            f"{row['steps'] * row['unet_s']:.3f} | {row['decode_s']:.3f} | {row['limit_s']:.3f} | "
            f"**{row['overhead']:.3f}**{mark} | {row['frames_per_s']:.2f} | {row['diffusers_frames_per_s']:.2f} |"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=5)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--torch-threads", type=int, default=None, help="PyTorch CPU threads (default: its own)")
    args = p.parse_args(argv)
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    with tempfile.TemporaryDirectory(prefix="perflow-bench-video-") as work:
        row = bench_video(work, args.frames, args.steps, args.repeats, args.warmup)
    print("\n".join(markdown(row, 1.05)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
