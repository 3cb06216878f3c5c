"""Training benchmark: the jitted PeRFlow step against its parts measured alone, and its peak memory per
device with remat on/off and FSDP on/off. Same machine, one run.

1. time: the whole step (teacher window solve + student forward/backward + AdamW + EMA, one jitted program)
   against (a) the teacher solve alone (``reflow.make_batch`` jitted) plus (b) the student forward/backward alone
   (``jax.value_and_grad`` of the reflow loss on a prepared batch). Goal: step ≤ 1.1 × (a + b).
2. memory: XLA's own accounting of the compiled step per device (``compiled.memory_analysis()``: arguments +
   outputs + temporaries − aliased donated buffers) for train.remat none/full/dots and train.sharding
   replicated/fsdp over ``--devices`` devices (forced host devices on CPU).

Models (random weights, nothing downloaded): ``digits`` (the built-in 8×8 model's UNet, class labels),
``tiny`` (scripts/configs/tiny/unet.json), ``sd15-small`` (SD1.5's
UNet layout with channels 128-256-512-512, the issue's CPU model), ``sd15`` (the real SD1.5 UNet; GPU/TPU).

Usage:  python scripts/bench_train.py --preset digits --latent 8 --batch 128 --solver-steps 4 --remat none
        python scripts/bench_train.py --preset tiny --latent 16 --batch 2 --devices 4
        python scripts/bench_train.py --preset sd15-small --latent 32 --batch 1 --devices 4
        python scripts/bench_train.py --preset sd15 --latent 64 --batch 8 --dtype bfloat16      (GPU/TPU)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def unet_config(preset: str) -> Any:
    from perflow_jax.models.single_file import family_config
    from perflow_jax.models.unet import UNetConfig

    if preset == "digits":
        from perflow_jax.pipelines import digits

        return digits.UNET_CONFIG
    if preset == "tiny":
        with open(os.path.join(ROOT, "scripts", "configs", "tiny", "unet.json"), encoding="utf-8") as f:
            return UNetConfig.from_dict(json.load(f))
    cfg = dict(family_config("sd15", "unet"))
    if preset == "sd15-small":
        cfg["block_out_channels"] = [128, 256, 512, 512]
    return UNetConfig.from_dict(cfg)


def timed(fn: Any, *args: Any, repeats: int) -> float:
    """Median seconds of `fn(*args)` (already compiled; outputs blocked on)."""
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def memory(compiled: Any) -> dict[str, float]:
    """Per-device MiB of a compiled program, from XLA's memory analysis."""
    m = compiled.memory_analysis()
    mib = 1 / 2**20
    peak = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    return {"peak_mib": peak * mib, "temp_mib": m.temp_size_in_bytes * mib, "args_mib": m.argument_size_in_bytes * mib}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=("digits", "tiny", "sd15-small", "sd15"), default="tiny")
    p.add_argument("--latent", type=int, default=16, help="latent height = width")
    p.add_argument("--batch", type=int, default=2, help="global batch (split over the devices)")
    p.add_argument("--solver-steps", type=int, default=8, help="teacher DDIM steps per window (solver.num_steps)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--devices", type=int, default=1, help="forced host devices on CPU (set before JAX starts)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--skip-time", action="store_true", help="memory figures only")
    p.add_argument("--remat", default="none,full,dots", help="train.remat values whose memory to measure")
    p.add_argument("--sharding", default="replicated,fsdp", help="train.sharding values whose memory to measure "
                   "(fsdp only with several devices)")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    args = p.parse_args(argv)
    if args.devices > 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.devices}").strip()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from perflow_jax import sharding
    from perflow_jax.models.adapter import UNetCondition
    from perflow_jax.models.unet import init_unet_params
    from perflow_jax.training import reflow
    from perflow_jax.training import train as train_lib

    ucfg = unet_config(args.preset)
    cfg = train_lib.load_config(None, ["output_dir=/tmp/unused", f"solver.num_steps={args.solver_steps}",
                                       f"model.dtype={args.dtype}"])
    rcfg = train_lib.reflow_config(cfg)
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    teacher = jax.jit(lambda k: init_unet_params(ucfg, k))(jax.random.key(0))
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(teacher))
    rng = np.random.default_rng(0)
    b, lat = args.batch, args.latent
    x = rng.standard_normal((1, b, ucfg.in_channels, lat, lat)).astype(np.float32)  # one micro-batch
    if args.preset == "digits":  # class labels (10 = null) instead of text embeddings
        cond = UNetCondition(class_labels=rng.integers(0, 10, (1, b)).astype(np.int32))
        null = UNetCondition(class_labels=np.int32(10))
    else:
        ctx = rng.standard_normal((1, b, 77, ucfg.encoder_dim)).astype(np.float32)
        cond = UNetCondition(encoder_hidden_states=ctx)
        null = UNetCondition(encoder_hidden_states=np.zeros((77, ucfg.encoder_dim), np.float32))
    tx = train_lib.make_optimizer(cfg["train"])
    key = jax.random.key(0)
    report: dict[str, Any] = {"preset": args.preset, "params_m": n_params / 1e6, "latent": lat, "batch": b,
                              "dtype": args.dtype, "solver_steps": args.solver_steps,
                              "devices": jax.device_count(), "backend": jax.default_backend()}

    def compiled_step(remat: str, mode: str) -> tuple[Any, Any]:
        mesh = sharding.train_mesh(mode)
        apply_fn = train_lib.make_apply_fn(ucfg, dtype, None if remat == "none" else remat)
        state = train_lib.init_state(teacher, tx, ema=True)
        st_sh = sharding.param_sharding(mesh, state, mode)
        te_sh = sharding.param_sharding(mesh, teacher, mode)
        b_sh = sharding.batch_sharded(mesh, axis=1)
        step = train_lib.make_train_step(rcfg, apply_fn, tx, 0.999, key)
        jitted = jax.jit(step, in_shardings=(st_sh, te_sh, b_sh, b_sh, sharding.replicated(mesh)),
                         out_shardings=(st_sh, None), donate_argnums=(0,))
        inputs = (jax.device_put(state, st_sh), jax.device_put(teacher, te_sh),
                  jax.device_put(x, b_sh), jax.device_put(cond, b_sh), jax.device_put(null, sharding.replicated(mesh)))
        return jitted.lower(*inputs).compile(), inputs

    mem = {}
    modes = [m for m in args.sharding.split(",") if m and (m != "fsdp" or jax.device_count() > 1)]
    for mode in modes:
        for remat in [r for r in args.remat.split(",") if r]:
            compiled, _ = compiled_step(remat, mode)
            mem[f"{mode}/remat={remat}"] = memory(compiled)
            print(f"memory {mode:10s} remat={remat:5s}: " + json.dumps({k: round(v, 1) for k, v in
                                                                     mem[f"{mode}/remat={remat}"].items()}),
                  flush=True)
    report["memory_per_device"] = mem

    if not args.skip_time:
        compiled, inputs = compiled_step("none", "replicated")
        state, teacher_d, xd, cd, nd = inputs

        def run_step(state: Any) -> Any:
            return compiled(state, teacher_d, xd, cd, nd)

        # the step donates its state: feed each call the previous call's output
        holder = {"state": state}

        def step_once() -> Any:
            holder["state"], loss = run_step(holder["state"])
            return loss

        t_step = timed(step_once, repeats=args.repeats)
        apply_fn = train_lib.make_apply_fn(ucfg, dtype)
        # the teacher is an argument here too (as in the step), not constants baked into the program
        solve = jax.jit(lambda p, x0, c, n, k: reflow.make_batch(
            rcfg, lambda xt, t, cc: apply_fn(p, xt, t, cc), x0, c, n, k))
        xc = jax.tree_util.tree_map(lambda a: a[0], (xd, cd))
        k1 = jax.random.fold_in(key, 1)
        t_solve = timed(solve, teacher_d, xc[0], xc[1], nd, k1, repeats=args.repeats)
        batch = solve(teacher_d, xc[0], xc[1], nd, k1)
        fwd_bwd = jax.jit(jax.value_and_grad(lambda p, bt: reflow.loss(rcfg, apply_fn, p, bt)))
        t_fb = timed(fwd_bwd, teacher_d, batch, repeats=args.repeats)
        report["time_s"] = {"step": t_step, "teacher_solve": t_solve, "student_fwd_bwd": t_fb,
                            "step_over_parts": t_step / (t_solve + t_fb)}
        print("time: " + json.dumps({k: round(v, 4) for k, v in report["time_s"].items()}), flush=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
