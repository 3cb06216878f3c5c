"""Data benchmark: ``perflow-jax prepare`` throughput against its encoders alone, and the Grain loader's
throughput against what the training step consumes. Same machine, one run.

1. prepare: images/s of :func:`perflow_jax.training.prepare.prepare` on N synthetic JPEGs with captions (decode,
   resize + crop, VAE + text encoders, ArrayRecord writes), after a warm-up run that compiles; against the
   jitted VAE + text encoder(s) alone on the same batch size (pixels and captions already in memory).
2. loader: samples/s of :class:`perflow_jax.training.data.Stream` (Grain reads, decode, batching, global arrays,
   latent sampling) against samples/s of training steps (``train()`` with the same prepared data; its logged
   steps/s, after the first logged interval that holds the compile).

Models are scripts/benchmark.py's presets (random weights, built with diffusers; nothing is downloaded).

Usage:  python scripts/bench_data.py --preset tiny --images 256 --resolution 64
        python scripts/bench_data.py --preset sd15 --images 64 --resolution 512 --batch-size 8   (GPU/TPU)
"""

from __future__ import annotations

import argparse
import io
import json
import os
import runpy
import sys
import tempfile
import time
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def write_images(folder: str, n: int, res: int, seed: int = 0) -> None:
    """`n` random JPEGs (a little larger than `res` and not square, so resize and crop run) with captions."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    rows = []
    for i in range(n):
        img = rng.integers(0, 256, (res + res // 4, res + res // 2, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=90)
        with open(os.path.join(folder, f"{i:06d}.jpg"), "wb") as f:
            f.write(buf.getvalue())
        rows.append(json.dumps({"file_name": f"{i:06d}.jpg", "text": f"a red cat on the mat {i}"}))
    with open(os.path.join(folder, "metadata.jsonl"), "w", encoding="utf-8") as f:
        f.write("\n".join(rows) + "\n")


def bench_prepare(model: str, comps: Any, work: str, args: argparse.Namespace) -> dict[str, Any]:
    from perflow_jax.training import prepare as prep

    write_images(os.path.join(work, "warm"), args.batch_size, args.resolution, seed=1)
    write_images(os.path.join(work, "images"), args.images, args.resolution)
    enc = prep.Encoders(comps)
    kw = dict(resolution=args.resolution, batch_size=args.batch_size, progress=False, encoders=enc)
    prep.prepare(model, [os.path.join(work, "warm")], os.path.join(work, "prep_warm"), **kw)  # compiles
    t0 = time.perf_counter()
    report = prep.prepare(model, [os.path.join(work, "images")], os.path.join(work, "prep"), **kw)
    prepare_s = time.perf_counter() - t0

    rng = np.random.default_rng(0)
    pixels = rng.uniform(-1, 1, (args.batch_size, 3, args.resolution, args.resolution)).astype(np.float32)
    captions = [f"a red cat on the mat {i}" for i in range(args.batch_size)]
    enc.images(pixels), enc.texts(captions, args.resolution)  # compile
    rounds = max(1, args.images // args.batch_size)
    t0 = time.perf_counter()
    for _ in range(rounds):
        enc.images(pixels, args.batch_size)
        enc.texts(captions, args.resolution, args.batch_size)
    encoders_s = time.perf_counter() - t0
    prep_ips = report["records"] / prepare_s
    enc_ips = rounds * args.batch_size / encoders_s
    return {"images": report["records"], "prepare_images_per_s": prep_ips, "encoders_alone_images_per_s": enc_ips,
            "prepare_vs_encoders": prep_ips / enc_ips}


def bench_loader(model: str, work: str, args: argparse.Namespace) -> dict[str, Any]:
    from perflow_jax import sharding
    from perflow_jax.training import train as train_lib
    from perflow_jax.training.data import Stream

    data = os.path.join(work, "prep")
    base = [f"model.unet_config={model}/unet/config.json", "model.dtype=float32",
            f"teacher.weights={model}/unet/diffusion_pytorch_model.safetensors", f"data.path={data}",
            f"train.batch_size={args.train_batch}", "train.grad_accum=1", "train.progress=false",
            f"solver.num_steps={args.solver_steps}", f"data.workers={args.workers}"]
    cfg = train_lib.load_config(os.path.join(ROOT, "configs", "sd15_perflow.yaml"),
                                [f"output_dir={work}/run", *base, f"train.steps={2 * args.train_steps}",
                                 f"train.log_every={args.train_steps}", f"train.checkpoint_every={10**6}"])
    stream = Stream(cfg, sharding.data_mesh())
    x, _, _ = stream.next(0)  # compiles the latent sampler
    x.block_until_ready()
    n = args.loader_batches
    t0 = time.perf_counter()
    for s in range(1, n + 1):
        x, cond, _ = stream.next(s)
    x.block_until_ready()
    loader_sps = n * args.train_batch / (time.perf_counter() - t0)
    res = train_lib.train(cfg)
    step_sps = res["history"][-1]["steps_per_sec"] * args.train_batch  # second interval: compile excluded
    return {"train_batch": args.train_batch, "loader_samples_per_s": loader_sps, "train_samples_per_s": step_sps,
            "loader_vs_train": loader_sps / step_sps}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=("tiny", "sd15"), default="tiny")
    p.add_argument("--model-cache", default=os.path.join(tempfile.gettempdir(), "perflow-jax-bench-models"))
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16, help="prepare's encoder batch")
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--train-steps", type=int, default=5, help="timed training steps (after as many for compile)")
    p.add_argument("--solver-steps", type=int, default=1)
    p.add_argument("--loader-batches", type=int, default=50)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--only", choices=("prepare", "loader"), default=None, help="run one half (the loader needs "
                                                                                 "the prepared data: runs prepare)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)

    import jax

    from perflow_jax.models.components import load_pipeline_components

    bench = runpy.run_path(os.path.join(ROOT, "scripts", "benchmark.py"))
    os.makedirs(args.model_cache, exist_ok=True)
    model = bench["build_preset"](args.preset, os.path.join(args.model_cache, args.preset))
    comps = load_pipeline_components(model)
    with tempfile.TemporaryDirectory() as work:
        out = {"preset": args.preset, "resolution": args.resolution, "devices": str(jax.devices()),
               "prepare": bench_prepare(model, comps, work, args)}
        if args.only != "prepare":
            out["loader"] = bench_loader(model, work, args)
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
