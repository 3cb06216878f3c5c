"""Scheduler cost per step inside a jitted PeRFlow loop, next to one matmul-heavy reference op.

The loop runs on an (8, 4, 64, 64) latent batch with a cheap denoiser (one multiply-add), so its time is
the scheduler's step plus loop overhead. The reference op is one SD-UNet-sized dense layer on the same
batch's spatial positions: (8·64·64, 320) @ (320, 1280), about 13 GFLOP, a small fraction of one UNet call.

Usage: python scripts/bench_scheduler.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax
import jax.numpy as jnp

from perflow_jax import sampling, schedulers


def _median_time(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()

    shape = (8, 4, 64, 64)
    x = jax.random.normal(jax.random.key(0), shape)
    sched = schedulers.get("perflow", prediction_type="diff_eps")
    cheap = lambda s, t, i: 0.9 * s + 0.01  # noqa: E731

    a = jax.random.normal(jax.random.key(1), (8 * 64 * 64, 320))
    w = jax.random.normal(jax.random.key(2), (320, 1280))
    matmul = jax.jit(lambda a, w: jnp.dot(a, w))
    t_matmul = _median_time(matmul, a, w, repeats=args.repeats)

    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
          f"{platform.processor() or platform.machine()}")
    print(f"reference op (8*64*64,320)@(320,1280): {t_matmul * 1e3:.3f} ms")
    for steps in (4, 8):
        state = sched.set_timesteps(steps)
        loop = jax.jit(lambda st, x: sampling.sample(sched, st, cheap, x))
        t_loop = _median_time(loop, state, x, repeats=args.repeats)
        per_step = t_loop / steps
        print(f"{steps}-step jitted loop on {shape}: {t_loop * 1e3:.3f} ms total, {per_step * 1e3:.3f} ms/step "
              f"= {per_step / t_matmul:.2e} x the reference op")


if __name__ == "__main__":
    main()
