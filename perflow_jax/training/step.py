"""The training step: the UNet as student/teacher function, AdamW, the train state, EMA, and one jitted step
(teacher solve, reflow loss, gradients accumulated over micro-batches, optimizer update, EMA update)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from perflow_jax import delta as delta_lib
from perflow_jax.models.adapter import UNetCondition, unet_apply
from perflow_jax.models.unet import UNet2DConditionModel, UNetConfig, unet_param_shapes
from perflow_jax.training import reflow

# ----------------------------------------------------------------------------------------------------------
# Model functions
# ----------------------------------------------------------------------------------------------------------


def unet_config(cfg: dict[str, Any]) -> UNetConfig:
    if cfg["model"]["kind"] == "digits":
        from perflow_jax.pipelines import digits

        return digits.UNET_CONFIG
    path = cfg["model"]["unet_config"]
    try:
        return UNetConfig.from_json(path)
    except FileNotFoundError:
        raise
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"model.unet_config={path!r} is not a usable UNet config.json: {e}") from e


def make_apply_fn(config: UNetConfig, dtype: Any, remat: str | None = None) -> reflow.StudentFn:
    """The student (and teacher) function ``(params, x, timesteps, cond) -> output`` (float32) over a UNet
    in `dtype`: :func:`~perflow_jax.models.adapter.unet_apply` with the params as an argument. `remat` names a
    per-block rematerialization policy (:data:`perflow_jax.models.unet.REMAT_POLICIES`; None: none)."""
    module = UNet2DConditionModel(config, dtype=dtype, remat=remat)

    def apply(params: Any, x: jax.Array, timesteps: jax.Array, cond: UNetCondition) -> jax.Array:
        return unet_apply(module, params, x, timesteps, cond)

    return apply


def load_teacher_params(cfg: dict[str, Any], config: UNetConfig) -> dict:
    path = cfg["teacher"]["weights"]
    if not path:
        if cfg["model"]["kind"] != "digits":
            raise ValueError("teacher.weights is required for model.kind=unet.")
        from perflow_jax.pipelines import digits

        path = os.path.join(digits.ASSETS, "teacher.safetensors")
    if not os.path.exists(path):
        raise FileNotFoundError(f"teacher.weights={path!r} does not exist.")
    # Full weights in PyTorch layout read exactly like a ΔW file (same keys and shapes).
    try:
        return delta_lib.load_delta(path, unet_param_shapes(config))
    except ValueError as e:
        raise ValueError(f"teacher.weights={path!r}: {e}") from e



# ----------------------------------------------------------------------------------------------------------
# Train state and step
# ----------------------------------------------------------------------------------------------------------


def make_optimizer(t: Mapping[str, Any]) -> optax.GradientTransformation:
    """AdamW with linear warmup (then constant or cosine decay) and global-norm gradient clipping."""
    lr, warm = t["learning_rate"], t["warmup_steps"]
    if t["lr_schedule"] == "cosine":
        sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(warm, 1), max(t["steps"], warm + 1), 0.1 * lr)
    else:
        sched = optax.join_schedules([optax.linear_schedule(0.0, lr, max(warm, 1)), optax.constant_schedule(lr)],
                                     [max(warm, 1)])
    return optax.chain(optax.clip_by_global_norm(t["grad_clip"]),
                       optax.adamw(sched, b1=t["adam_b1"], b2=t["adam_b2"], weight_decay=t["weight_decay"]))


def init_state(params: Any, tx: optax.GradientTransformation, ema: bool) -> dict[str, Any]:
    """The train state: step, params, optimizer state and EMA params (a copy of params, or None)."""
    copy = lambda tree: jax.tree_util.tree_map(jnp.copy, tree)  # noqa: E731  (own buffers: the state is donated)
    return {"step": jnp.zeros((), jnp.int32), "params": copy(params), "opt_state": tx.init(params),
            "ema": copy(params) if ema else None}


def ema_decay_at(step: jax.Array, decay: float, warmup: bool) -> jax.Array:
    """The EMA decay of 0-based step `step`: `decay`, or with `warmup` ``min((1 + step) / (10 + step), decay)``
    (the reference's diffusers ``EMAModel`` schedule, which also uses 0 at step 0: the first update copies the
    params; 2/11 at step 1, reaching 0.9999 near step 90000)."""
    d = jnp.float32(decay)
    if not warmup:
        return d
    s = jnp.asarray(step).astype(jnp.float32)
    return jnp.where(s > 0, jnp.minimum((1.0 + s) / (10.0 + s), d), 0.0)


def make_train_step(rcfg: reflow.ReflowConfig, apply_fn: reflow.StudentFn, tx: optax.GradientTransformation,
                    ema_decay: float, base_key: jax.Array, ema_warmup: bool = False,
                    merge_fn: Callable[[Any, Any], Any] | None = None) -> Callable[..., tuple[dict, jax.Array]]:
    """``step(state, teacher_params, x (A, b, ...), cond (A, b, ...), null_cond) -> (state, loss)`` over A
    micro-batches (the teacher is an argument, not a closure, so it is never baked into the executable).

    The EMA decay is `ema_decay`, or with `ema_warmup` the reference's (diffusers' EMAModel) warm-up
    ``min((1 + s) / (10 + s), ema_decay)`` at the step's 0-based index s.

    With `merge_fn`, the trained params are not the UNet's but e.g. LoRA factors: the student runs on
    ``merge_fn(teacher, params)`` (:func:`perflow_jax.training.lora_factors.merge`)."""

    def micro(params: Any, teacher: Any, key: jax.Array, x: jax.Array, cond: Any, null: Any
              ) -> tuple[jax.Array, Any]:
        def teacher_fn(xt: jax.Array, t: jax.Array, c: Any) -> jax.Array:
            return apply_fn(jax.lax.stop_gradient(teacher), xt, t, c)

        batch = reflow.make_batch(rcfg, teacher_fn, x, cond, null, key)
        student = apply_fn if merge_fn is None else (lambda p, *a: apply_fn(merge_fn(teacher, p), *a))
        return jax.value_and_grad(lambda p: reflow.loss(rcfg, student, p, batch))(params)

    def step(state: dict, teacher: Any, x: jax.Array, cond: Any, null: Any) -> tuple[dict, jax.Array]:
        key = jax.random.fold_in(base_key, state["step"])
        a = x.shape[0]

        def body(acc: tuple[jax.Array, Any], i: jax.Array) -> tuple[tuple[jax.Array, Any], None]:
            xi = x[i]
            ci = jax.tree_util.tree_map(lambda c: c[i], cond)
            loss, g = micro(state["params"], teacher, jax.random.fold_in(key, i), xi, ci, null)
            return (acc[0] + loss / a, jax.tree_util.tree_map(lambda s, gi: s + gi / a, acc[1], g)), None

        acc = (jnp.zeros((), jnp.float32), jax.tree_util.tree_map(jnp.zeros_like, state["params"]))
        if a == 1 or jax.default_backend() == "cpu":
            # A Python loop, no while op: XLA:CPU runs a backward pass ~10x slower inside a loop body (digits
            # UNet, batch 128: 1.08 s vs 0.12 s per step). Accelerators keep the scan (one body to compile).
            for i in range(a):
                acc, _ = body(acc, i)
            loss, grads = acc
        else:
            (loss, grads), _ = jax.lax.scan(body, acc, jnp.arange(a))
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        ema = state["ema"]
        if ema is not None:
            ema = optax.incremental_update(params, ema, 1.0 - ema_decay_at(state["step"], ema_decay, ema_warmup))
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state, "ema": ema}, loss

    return step



__all__ = ["ema_decay_at", "init_state", "load_teacher_params", "make_apply_fn", "make_optimizer", "make_train_step",
           "unet_config"]
