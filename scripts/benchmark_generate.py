"""Benchmark: ``perflow_jax.generate.run`` (PNG encoding and shard writing included) against the pipeline's own
``__call__`` (images to host memory, nothing written) on the same batches, same machine, one run.

The ratio generate / ``__call__`` in images/s shows how much of the encoding and writing the background thread
pool hides behind the device work (goal ≥ 0.97). Both sides run the same pipeline object, model, batches and
step count; every round times both, interleaved, and the medians are reported. Compilation is outside the
timings (both programs are compiled before the first round; generate's own compile time is excluded by
:func:`perflow_jax.generate.run`). Models come from ``scripts/benchmark.py``'s presets (random weights, built with
PyTorch diffusers once and cached in ``--model-cache``).

Usage:  python scripts/benchmark_generate.py --preset tiny --resolution 64 --batch 8 --num-batches 8
        python scripts/benchmark_generate.py --preset sd15 --resolution 128 --batch 4 --num-batches 4 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark as bench  # noqa: E402  scripts/benchmark.py: presets, pipeline loading, environment


def _prompts(n: int) -> list[str]:
    return [f"a red cat {i}" for i in range(n)]  # short: the tiny preset's tokenizer has 16 positions


def time_call(pipe: Any, prompts: Sequence[str], batch: int, steps: int, res: int, guidance: float) -> float:
    """Seconds for the pipeline's ``__call__`` over `prompts` in batches of `batch` (images fetched to host)."""
    t0 = time.perf_counter()
    for start in range(0, len(prompts), batch):
        images = pipe(list(prompts[start:start + batch]), num_inference_steps=steps, guidance_scale=guidance,
                      seed=0, height=res, width=res, first_index=start)
        assert images.shape[0] == min(batch, len(prompts) - start)
    return time.perf_counter() - t0


def time_generate(pipe: Any, prompt_file: str, out: str, batch: int, steps: int, res: int, guidance: float,
                  workers: int | None, shard_size: int, fmt: str) -> tuple[float, float]:
    """(run seconds, compile seconds) of a fresh generate job into `out`."""
    from perflow_jax import generate

    if os.path.exists(out):
        shutil.rmtree(out)
    r = generate.run(pipe, prompt_file, out, num_inference_steps=steps, guidance_scale=guidance, height=res,
                     width=res, global_batch=batch, shard_size=shard_size, fmt=fmt, num_workers=workers,
                     progress=False)
    return r.run_seconds, r.compile_seconds


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=bench.PRESETS, default="tiny")
    p.add_argument("--model", default=None, help="a diffusers SD1.x/2.x folder instead of a preset")
    p.add_argument("--model-cache", default=None, help="where the preset model is built (default: a temp folder)")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--guidance", type=float, default=4.5)
    p.add_argument("--batch", type=int, default=4, help="global batch (a multiple of the device count)")
    p.add_argument("--num-batches", type=int, default=4, help="batches per timed run")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (median reported)")
    p.add_argument("--dtype", choices=sorted(bench.DTYPES), default="fp32")
    p.add_argument("--workers", type=int, default=None, help="generate's PNG threads (default: its own)")
    p.add_argument("--shard-size", type=int, default=None, help="images per shard (default: one batch)")
    p.add_argument("--format", choices=("tar", "folder"), default="tar")
    p.add_argument("--cache-dir", default=None, help="JAX persistent compilation cache (default: off)")
    p.add_argument("--json", default=None, help="write the results here as JSON")
    args = p.parse_args(argv)

    tmp = tempfile.mkdtemp(prefix="bench-generate-")
    try:
        folder = args.model or bench.build_preset(args.preset, args.model_cache or os.path.join(tmp, "model"))
        pipe = bench.load_jax_pipeline(folder, args.dtype, args.cache_dir)
        n = args.batch * args.num_batches
        prompt_file = os.path.join(tmp, "prompts.txt")
        with open(prompt_file, "w", encoding="utf-8") as f:
            f.write("\n".join(_prompts(n)) + "\n")
        common = dict(batch=args.batch, steps=args.steps, res=args.resolution, guidance=args.guidance)
        gen = dict(workers=args.workers, shard_size=args.shard_size or args.batch, fmt=args.format)
        # Compile and warm both sides once (not timed).
        time_call(pipe, _prompts(args.batch), **common)
        _, compile_s = time_generate(pipe, prompt_file, os.path.join(tmp, "warm"), **common, **gen)
        call_s, gen_s = [], []
        for _ in range(args.repeats):
            call_s.append(time_call(pipe, _prompts(n), **common))
            gen_s.append(time_generate(pipe, prompt_file, os.path.join(tmp, "out"), **common, **gen)[0])
        call_ips, gen_ips = n / statistics.median(call_s), n / statistics.median(gen_s)
        res = {"preset": None if args.model else args.preset, "model": args.model, "resolution": args.resolution,
               "steps": args.steps, "batch": args.batch, "images": n, "dtype": args.dtype, "format": args.format,
               "workers": args.workers, "shard_size": gen["shard_size"], "repeats": args.repeats,
               "call_seconds": call_s, "generate_seconds": gen_s, "call_images_per_s": round(call_ips, 4),
               "generate_images_per_s": round(gen_ips, 4), "ratio": round(gen_ips / call_ips, 4),
               "generate_compile_seconds": round(compile_s, 2),
               "environment": bench.environment(argparse.Namespace(no_torch=True), argv or sys.argv[1:])}
        res["environment"]["command"] = "python scripts/benchmark_generate.py " + " ".join(argv or sys.argv[1:])
        print(f"{res['preset'] or args.model} {args.resolution}x{args.resolution}, {args.steps} steps, batch "
              f"{args.batch} x {args.num_batches}: __call__ {call_ips:.3f} images/s, generate {gen_ips:.3f} "
              f"images/s, ratio {gen_ips / call_ips:.3f} (medians of {args.repeats})")
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(res, f, indent=2, default=str)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
