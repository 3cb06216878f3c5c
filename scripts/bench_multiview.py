"""Multi-view UNet throughput: views/s for N views of one sample against N × the plain UNet on one view.

Both run the same weights (a plain SD UNet of `--preset`'s architecture with random weights, plus fresh camera
and reference layers from ``init_multiview_from_unet``), jitted, float32 unless ``--dtype``. The multi-view call
is one ``(N, 4, h, w)`` batch with cameras and cross-view attention over N·h·w tokens per ``attn1``; the
baseline is the plain UNet on ``(1, 4, h, w)``, timed alone and multiplied by N. ``ratio = t_multiview(N) /
(N · t_unet(1))``: the cost of joint attention and camera conditioning over running the views independently,
one at a time (below 1 where batching the views pays more than the joint attention costs).

Usage: python scripts/bench_multiview.py --preset tiny --resolution 64 --views 1 2 4 8 [--repeats 5]
       python scripts/bench_multiview.py --preset sd21 --resolution 256 --views 4 --dtype bf16   (GPU)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from perflow_jax.models.multiview_unet import (  # noqa: E402
    CAMERA_DIM,
    MultiViewConfig,
    init_multiview_from_unet,
    multiview_apply,
)
from perflow_jax.models.unet import UNet2DConditionModel, UNetConfig, init_unet_params  # noqa: E402
from perflow_jax.pipelines.multiview import orbit_cameras  # noqa: E402

DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}


def _unet_config(preset: str) -> UNetConfig:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", preset, "unet.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return UNetConfig.from_dict(json.load(f))
    from perflow_jax.models.single_file import family_config

    return UNetConfig.from_dict(family_config(preset, "unet"))


def _median(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_views(plain_cfg: UNetConfig, plain: dict, resolution: int, views: list[int], dtype: Any = jnp.float32,
                  repeats: int = 5, attention: str | None = None) -> list[dict[str, Any]]:
    """Rows ``{views, multiview_s, unet_1view_s, views_per_s, ratio_vs_n_unet}`` for a plain UNet config and its
    params: the multi-view model is that UNet plus fresh camera layers (:func:`init_multiview_from_unet`)."""
    mv_cfg = MultiViewConfig(dataclasses.replace(plain_cfg, class_embed_type="projection",
                                                 projection_class_embeddings_input_dim=CAMERA_DIM, sample_size=None))
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype), init_multiview_from_unet(mv_cfg, plain, jax.random.key(1)))
    plain = jax.tree.map(lambda a: jnp.asarray(a, dtype), plain)
    lat = resolution // 8
    text_len, dim = 77, plain_cfg.encoder_dim
    key = jax.random.key(2)

    unet = UNet2DConditionModel(plain_cfg, dtype=dtype, attention_implementation=attention)
    one = jax.jit(lambda p, x, t, c: unet.apply({"params": p}, x, t, c))
    x1 = jax.random.normal(key, (1, plain_cfg.in_channels, lat, lat))
    c1 = jax.random.normal(key, (1, text_len, dim))
    t_one = _median(one, plain, x1, jnp.array([500]), c1, repeats=repeats)

    mv = jax.jit(multiview_apply, static_argnums=0,
                 static_argnames=("num_views", "dtype", "attention_implementation"))
    rows = []
    for n in views:
        x = jax.random.normal(key, (n, plain_cfg.in_channels, lat, lat))
        c = jnp.broadcast_to(c1, (n, text_len, dim))
        cams = orbit_cameras(15.0, [360.0 * i / n for i in range(n)])
        t_mv = _median(lambda p, x, c, cams, n=n: mv(mv_cfg, p, x, jnp.array([500]), c, num_views=n, cameras=cams,
                                                       dtype=dtype, attention_implementation=attention),
                       params, x, c, cams, repeats=repeats)
        rows.append({"views": n, "multiview_s": t_mv, "unet_1view_s": t_one, "views_per_s": n / t_mv,
                     "ratio_vs_n_unet": t_mv / (n * t_one)})
    return rows


def table(rows: list[dict[str, Any]]) -> list[str]:
    """The rows as a Markdown table."""
    lines = ["| N | multi-view (s) | views/s | plain UNet, 1 view (s) | multi-view / (N × UNet) |",
             "| ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['views']} | {r['multiview_s']:.4f} | {r['views_per_s']:.2f} | {r['unet_1view_s']:.4f} | "
                     f"{r['ratio_vs_n_unet']:.2f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", help="scripts/configs/<preset> or a shipped family (sd15, sd21)")
    ap.add_argument("--resolution", type=int, default=64, help="image size in pixels (latents: /8)")
    ap.add_argument("--views", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--attention", choices=("xla", "cudnn"), default=None,
                    help="attention_implementation for both models (default: JAX chooses; cudnn needs bf16/fp16)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)

    plain_cfg = _unet_config(args.preset)
    plain = init_unet_params(plain_cfg, jax.random.key(0))
    rows = measure_views(plain_cfg, plain, args.resolution, args.views, DTYPES[args.dtype], args.repeats,
                         args.attention)
    print(f"# multi-view UNet, preset {args.preset}, {args.resolution}px ({args.resolution // 8}² latents), "
          f"{args.dtype}, {jax.devices()[0].platform} ({platform.processor() or platform.machine()}), median of "
          f"{args.repeats}")
    print("\n".join(table(rows)))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)
    return 0 if all(np.isfinite(r["multiview_s"]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
