"""Train the built-in digits models: the ε-prediction teacher, then PeRFlow students over it.

    python scripts/train_digits.py teacher --steps 3000 --out /tmp/digits/teacher          # ~9 min on 2 CPU cores
    # the shipped default student (--model digits): K = 4 windows, 8 teacher steps per window, t on the
    # window starts and midpoints only (D = 8), ~36 min on 2 shared CPU cores
    python scripts/train_digits.py student --teacher /tmp/digits/teacher --windows 4 --steps 6000 \
        --out /tmp/digits/k4 solver.num_steps=8 reflow.discrete_timesteps=8 train.learning_rate=5e-4 \
        train.warmup_steps=100 train.ema_decay=0.999 train.ema_warmup=true
    # the shipped CFG-fixed student (--model digits-guided): the same with the teacher at guidance 2
    python scripts/train_digits.py student --teacher /tmp/digits/teacher --windows 4 --steps 6000 \
        --out /tmp/digits/k4g solver.num_steps=8 reflow.discrete_timesteps=8 train.learning_rate=5e-4 \
        train.warmup_steps=100 train.ema_decay=0.999 train.ema_warmup=true reflow.cfg_mode=fixed \
        reflow.guidance_scale=2.0
    # the K = 1 and K = 2 students of the quality table
    python scripts/train_digits.py student --teacher /tmp/digits/teacher --windows 1 --steps 400 --out /tmp/digits/k1
    python scripts/train_digits.py student --teacher /tmp/digits/teacher --windows 2 --steps 1200 \
        --out /tmp/digits/k2 train.warmup_steps=50
    python scripts/train_digits.py ship --teacher /tmp/digits/teacher --student /tmp/digits/k4 \
        --guided /tmp/digits/k4g

``--teacher perflow_jax/assets/digits`` uses the shipped teacher. Everything is seeded: the same command gives
the same weights on the same machine. The teacher is a plain DDPM ε-objective with class dropout (label 10 =
null) and EMA; the students are trained with :mod:`perflow_jax.training` (fresh teacher-solved pairs every
step). ``docs/results.md`` has the quality of each and why the K = 4 recipe trains t on a coarse grid.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import optax

from perflow_jax.compilation_cache import enable_compilation_cache
from perflow_jax.pipelines import digits
from perflow_jax.schedulers import common


def train_teacher(out: str, steps: int, batch: int = 128, lr: float = 1e-3, seed: int = 0, ema_decay: float = 0.999,
                  cond_dropout: float = 0.1, log_every: int = 25) -> dict:
    """DDPM ε-objective on the train split; saves EMA params as PyTorch-layout safetensors in `out`."""
    from perflow_jax import delta
    from perflow_jax.models.unet import init_unet_params

    x_all, y_all = digits.load_digits_data("train")
    x_all, y_all = jnp.asarray(x_all), jnp.asarray(y_all)
    T = digits.SCHEDULE["num_train_timesteps"]
    betas = common.make_betas(T, digits.SCHEDULE["beta_start"], digits.SCHEDULE["beta_end"],
                              digits.SCHEDULE["beta_schedule"], None)
    ac = jnp.asarray(common.alphas_cumprod(betas), jnp.float32)

    key = jax.random.key(seed)
    params = init_unet_params(digits.UNET_CONFIG, jax.random.fold_in(key, 0))
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, min(200, steps // 10), steps, lr * 0.1)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=1e-4))
    opt_state = tx.init(params)
    ema = params

    def loss_fn(p, k):
        k1, k2, k3, k4 = jax.random.split(k, 4)
        idx = jax.random.randint(k1, (batch,), 0, x_all.shape[0])
        x0, y = x_all[idx], y_all[idx]
        t = jax.random.randint(k2, (batch,), 0, T)
        eps = jax.random.normal(k3, x0.shape)
        a = ac[t][:, None, None, None]
        xt = jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * eps
        y = jnp.where(jax.random.uniform(k4, (batch,)) < cond_dropout, digits.NULL_CLASS, y)
        return jnp.mean((digits.model_fn(p, xt, t, y) - eps) ** 2)

    @functools.partial(jax.jit, donate_argnums=(0,))
    def train_step(carry, step):
        p, o, e = carry
        loss, g = jax.value_and_grad(loss_fn)(p, jax.random.fold_in(key, step + 1))
        upd, o = tx.update(g, o, p)
        p = optax.apply_updates(p, upd)
        return (p, o, optax.incremental_update(p, e, 1 - ema_decay)), loss

    carry, t0, losses = (params, opt_state, jax.tree_util.tree_map(jnp.copy, ema)), time.time(), []
    for s in range(steps):
        carry, loss = train_step(carry, s)
        losses.append(loss)
        if (s + 1) % log_every == 0 or s + 1 == steps:
            recent = float(jnp.mean(jnp.stack(losses[-log_every:])))
            print(f"teacher step {s + 1}/{steps} loss {recent:.4f} ({time.time() - t0:.0f}s)", flush=True)
    ema = carry[2]
    os.makedirs(out, exist_ok=True)
    delta.export(ema, os.path.join(out, "teacher.safetensors"), metadata={"what": "digits teacher (full weights)"})
    info = dict(steps=steps, batch=batch, lr=lr, seed=seed, ema_decay=ema_decay, cond_dropout=cond_dropout,
                final_loss=float(losses[-1]), seconds=time.time() - t0)
    with open(os.path.join(out, "teacher_train.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1)
    return info


def train_student(teacher_dir: str, out: str, windows: int, steps: int, overrides: list[str]) -> dict:
    """A PeRFlow student over the digits teacher with :func:`perflow_jax.training.train.train_from_config`."""
    from perflow_jax.training.train import train_from_config

    cfg = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "configs", "digits_perflow.yaml")
    ov = [f"teacher.weights={os.path.join(teacher_dir, 'teacher.safetensors')}", f"output_dir={out}",
          f"perflow.num_time_windows={windows}", f"train.steps={steps}", *overrides]
    return train_from_config(os.path.abspath(cfg), ov)


def ship(teacher_dir: str, student_dir: str, guided_dir: str | None = None, assets: str = digits.ASSETS,
         teacher_guidance: float = 1.0, perflow_guidance: float = 1.0) -> None:
    """Copy the teacher weights, the default student's ΔW and scheduler config and, with `guided_dir`, the
    CFG-fixed student's (sampled without CFG: its guidance is baked in) into the package assets."""
    os.makedirs(assets, exist_ok=True)
    teacher, shipped = os.path.join(teacher_dir, "teacher.safetensors"), os.path.join(assets, "teacher.safetensors")
    if not (os.path.exists(shipped) and os.path.samefile(teacher, shipped)):  # --teacher may be the assets
        shutil.copyfile(teacher, shipped)
    students = {"perflow": student_dir, "guided": guided_dir}
    for which, folder in students.items():
        if folder is None:
            continue
        delta_file, sched_file = digits.STUDENT_ASSETS[which]
        shutil.copyfile(os.path.join(folder, "delta_weights.safetensors"), os.path.join(assets, delta_file))
        shutil.copyfile(os.path.join(folder, "scheduler_config.json"), os.path.join(assets, sched_file))
    with open(os.path.join(assets, "unet_config.json"), "w", encoding="utf-8") as f:
        json.dump(digits.UNET_CONFIG.to_dict(), f, indent=1)
    index = dict(teacher_scheduler=dict(digits.SCHEDULE, _class_name="DDIMScheduler", clip_sample=False,
                                        set_alpha_to_one=False, timestep_spacing="trailing",
                                        prediction_type="epsilon"),
                 teacher_guidance=teacher_guidance, perflow_guidance=perflow_guidance, guided_guidance=1.0)
    with open(os.path.join(assets, "model_index.json"), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("teacher")
    t.add_argument("--steps", type=int, default=3000)
    t.add_argument("--batch", type=int, default=128)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", required=True)
    s = sub.add_parser("student")
    s.add_argument("--teacher", required=True)
    s.add_argument("--windows", type=int, default=1)
    s.add_argument("--steps", type=int, default=400)
    s.add_argument("--out", required=True)
    s.add_argument("overrides", nargs="*", help="key=value config overrides")
    h = sub.add_parser("ship")
    h.add_argument("--teacher", required=True)
    h.add_argument("--student", required=True, help="the default student (--model digits)")
    h.add_argument("--guided", default=None, help="the CFG-fixed student (--model digits-guided)")
    h.add_argument("--teacher-guidance", type=float, default=1.0)
    h.add_argument("--perflow-guidance", type=float, default=1.0)
    a = p.parse_args()
    enable_compilation_cache()
    if a.cmd == "teacher":
        print(train_teacher(a.out, a.steps, a.batch, seed=a.seed))
    elif a.cmd == "student":
        print(train_student(a.teacher, a.out, a.windows, a.steps, a.overrides))
    else:
        ship(a.teacher, a.student, a.guided, teacher_guidance=a.teacher_guidance, perflow_guidance=a.perflow_guidance)


if __name__ == "__main__":
    main()
