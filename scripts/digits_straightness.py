"""How straight did a digits PeRFlow student learn to be? Per-window endpoint errors against the teacher's flow.

    python scripts/digits_straightness.py --student 4=/tmp/digits/k4 [--teacher DIR] [--solver-steps 4]

For each window [t_s, t_e] of a K-window student: held-out digits x₀ are noised to the window start
(x_s = add_noise(x₀, ε, t_s·T), the training distribution), and the window end is computed four ways:

* ``converged``: the teacher's PF-ODE solved with ``--ref-steps`` DDIM steps in the window (the truth);
* ``solver``: the teacher with the training solver's steps per window (the student's regression target);
* ``DDIM-1``: one teacher DDIM step (what the ``ddim_eps`` student is before training);
* ``student``: one student step (λ_s·x_s + η_s·ε̂ from the student's output at t_s).

It prints the RMS distance of each to ``converged`` (per pixel, data range [-1, 1]); training works when the
student's error falls from DDIM-1's toward the solver's. ``--json`` also writes the numbers. The last lines
compare whole K-step samples from the same initial noise with the converged teacher ODE (DDIM over the whole
range with ``--ref-steps``·K steps): the end-to-end error of a K-step sampler.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from perflow_jax.pipelines import digits
from perflow_jax.schedulers import perflow as pf
from perflow_jax.training import solver as solver_lib


def _rms(a: jax.Array, b: jax.Array) -> float:
    return float(jnp.sqrt(jnp.mean((a - b) ** 2)))


def window_errors(teacher: dict, student: dict, sched: dict, solver_steps: int, ref_steps: int, n: int,
                  seed: int = 0, guidance: float = 1.0, student_guidance: float = 1.0) -> list[dict]:
    """Per-window RMS errors of the solver, DDIM-1 and the student endpoints against the converged ODE of
    the teacher at `guidance` (the student runs at `student_guidance`: 1 for a fixed-CFG student)."""
    cfg = pf.PeRFlowConfig.from_dict(sched)
    k = cfg.num_time_windows
    x_all, y_all = digits.load_digits_data("test")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x_all), n)
    x0, labels = jnp.asarray(x_all[idx]), jnp.asarray(y_all[idx], jnp.int32)
    null = jnp.full_like(labels, digits.NULL_CLASS)
    uncond = None if guidance == 1.0 else null

    def teacher_fn(x, t, c):
        return digits.model_fn(teacher, x, t, c)

    def solve(steps, xs, ts, te):
        sc = solver_lib.SolverConfig.from_perflow(cfg, num_steps=steps)
        return solver_lib.solve(sc, teacher_fn, xs, ts, te, labels, uncond=uncond, guidance_scale=guidance)

    solve = jax.jit(solve, static_argnums=0)
    rows = []
    for w in range(k):
        t_s, t_e = cfg.window_starts[w], cfg.window_ends[w]
        ts, te = jnp.full((n,), t_s, jnp.float32), jnp.full((n,), t_e, jnp.float32)
        noise = jax.random.normal(jax.random.key(seed * 100 + w), x0.shape)
        xs = pf.add_noise(cfg, x0, noise, jnp.full((n,), round(t_s * cfg.num_train_timesteps), jnp.int32))
        ref = solve(ref_steps, xs, ts, te)
        lam, eta = pf.window_end_coefficients(cfg, ts)
        out = digits.model_fn(student, xs, ts * cfg.num_train_timesteps, labels)
        if student_guidance != 1.0:
            u = digits.model_fn(student, xs, ts * cfg.num_train_timesteps, null)
            out = u + student_guidance * (out - u)
        one = lam[:, None, None, None] * xs + eta[:, None, None, None] * out
        rows.append(dict(window=w, t_start=t_s, t_end=t_e, travel=_rms(ref, xs),
                         solver=_rms(solve(solver_steps, xs, ts, te), ref), ddim1=_rms(solve(1, xs, ts, te), ref),
                         student=_rms(one, ref)))
    return rows


def end_to_end(teacher: dict, student: dict, sched: dict, ref_steps: int, n: int, seed: int = 0,
               guidance: float = 1.0, student_guidance: float = 1.0) -> dict:
    """RMS of K-step student and K-step teacher DDIM samples against the converged teacher ODE (same noise;
    teacher at `guidance`, student at `student_guidance`)."""
    cfg = pf.PeRFlowConfig.from_dict(sched)
    k = cfg.num_time_windows
    labels = np.repeat(np.arange(10), -(-n // 10))[:n].astype(np.int32)
    teacher_pipe = digits.DigitsPipeline(teacher, dict(digits.SCHEDULE), "ddim")
    student_pipe = digits.DigitsPipeline(student, sched, "perflow")
    ref = teacher_pipe.sample_float(labels, ref_steps * k, guidance, seed=seed)
    got = student_pipe.sample_float(labels, k, student_guidance, seed=seed)
    ddim = teacher_pipe.sample_float(labels, k, guidance, seed=seed)
    return dict(steps=k, student=float(np.sqrt(np.mean((got - ref) ** 2))),
                ddim=float(np.sqrt(np.mean((ddim - ref) ** 2))))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default=None, help="folder with teacher.safetensors (default: the shipped one)")
    p.add_argument("--student", action="append", required=True, help="NAME=DIR with delta_weights.safetensors")
    p.add_argument("--solver-steps", type=int, default=None, help="default: the student's train_config.json")
    p.add_argument("--ref-steps", type=int, default=50)
    p.add_argument("-n", type=int, default=512)
    p.add_argument("--guidance", type=float, default=None, help="default: fixed-CFG students' training w, else 1")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    from eval_digits import load_student  # scripts/ is on the path when this script runs

    teacher = digits.load_unet_weights(os.path.join(a.teacher or digits.ASSETS, "teacher.safetensors"))
    report = {}
    for spec in a.student:
        name, folder = spec.rsplit("=", 1)
        pipe, tcfg = load_student(teacher, folder)
        sched, student = pipe.scheduler_config, pipe.params
        steps = a.solver_steps or tcfg["solver"]["num_steps"]
        fixed = tcfg["reflow"]["cfg_mode"] == "fixed"
        w = a.guidance if a.guidance is not None else (tcfg["reflow"]["guidance_scale"] if fixed else 1.0)
        sw = 1.0 if fixed else w
        rows = window_errors(teacher, student, sched, steps, a.ref_steps, a.n, guidance=w, student_guidance=sw)
        print(f"{name}: K={len(rows)}, solver {steps} steps/window, w={w}; RMS to the converged window end")
        print("  window  [t_s, t_e]     travel   solver   DDIM-1  student")
        for r in rows:
            print(f"  {r['window']:6d}  [{r['t_start']:.2f}, {r['t_end']:.2f}]  {r['travel']:7.4f}  "
                  f"{r['solver']:7.4f}  {r['ddim1']:7.4f}  {r['student']:7.4f}")
        e2e = end_to_end(teacher, student, sched, a.ref_steps, a.n, guidance=w, student_guidance=sw)
        print(f"  whole sample, {e2e['steps']} steps vs converged ODE: student {e2e['student']:.4f}, "
              f"teacher DDIM {e2e['ddim']:.4f}")
        report[name] = dict(windows=rows, end_to_end=e2e, solver_steps=steps, guidance=w)
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
