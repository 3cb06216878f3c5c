"""The generic jitted sampling loop and batched classifier-free guidance.

The loop is a ``lax.scan`` over precomputed step indices, so one compiled program serves every prompt,
seed and guidance scale; only shapes, the step count and the scheduler config are static.
A *denoiser* is any function ``denoise_fn(x, timestep, step_index) -> model_output`` with ``x`` already
scaled by the scheduler; :func:`classifier_free_guidance` and :func:`conditional` turn a model
``model_fn(x, timesteps, cond)`` into one, and :func:`guided` is the same guidance for callers that pass
per-sample timesteps themselves (the PF-ODE solver).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from perflow_jax import values
from perflow_jax.schedulers import Scheduler

Denoiser = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
ModelFn = Callable[[jax.Array, jax.Array, Any], jax.Array]  # (x, timesteps (B,), cond) -> output


def init_latents(key: jax.Array, shape: tuple[int, ...], scheduler: Scheduler, state: Any,
                 dtype: Any = jnp.float32) -> jax.Array:
    """Initial noise N(0, σ_init²) for the scheduler, deterministic for a given PRNG key."""
    sigma = scheduler.init_noise_sigma(state)
    return (jax.random.normal(key, shape, jnp.float32) * sigma).astype(dtype)


def sample(scheduler: Scheduler, state: Any, denoise_fn: Denoiser, latents: jax.Array, *,
           key: jax.Array | None = None, start_step: int = 0, return_trajectory: bool = False, unroll: int = 1
           ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Run `state`'s steps from `start_step` on and return the final sample (and optionally every step's).

    Works under ``jit`` and ``vmap``. `key` feeds ancestral schedulers one fresh key per step (unused by
    deterministic ones). `start_step` (static) skips the first steps, as img2img does. With
    ``return_trajectory`` the second output stacks the sample after each step run.
    """
    n = state.timesteps.shape[0]
    start_step = values.check_int("start_step", start_step)  # static: it sets the scan's length
    if not 0 <= start_step < n:
        raise ValueError(f"start_step must be in [0, {n}) for a {n}-step schedule, got {start_step}.")
    keys = jax.random.split(key, n - start_step) if key is not None else None

    def body(carry: tuple[jax.Array, Any], xs: tuple[jax.Array, jax.Array | None]):
        x, st = carry
        i, k = xs
        model_in = scheduler.scale_model_input(st, x, i)
        out = denoise_fn(model_in, st.timesteps[i], i)
        x, st = scheduler.step(st, out, i, x, k)
        return (x, st), (x if return_trajectory else None)

    (x, _), traj = jax.lax.scan(body, (latents, state), (jnp.arange(start_step, n), keys), unroll=unroll)
    return (x, traj) if return_trajectory else x


def _mix(model_fn: ModelFn, x: jax.Array, timesteps: jax.typing.ArrayLike, both: Any, scale: jax.Array
         ) -> jax.Array:
    """One batched model call on [x; x] with context `both` = [uncond; cond]; u + w·(c − u) in float32."""
    b = x.shape[0]
    t = jnp.broadcast_to(jnp.asarray(timesteps), (b,))
    out = model_fn(jnp.concatenate([x, x], axis=0), jnp.concatenate([t, t], axis=0), both)
    out_uncond, out_cond = jnp.split(out.astype(jnp.float32), 2, axis=0)
    w = scale.reshape(scale.shape + (1,) * (x.ndim - scale.ndim))
    return out_uncond + w * (out_cond - out_uncond)


def _stack(uncond: Any, cond: Any) -> Any:
    return jax.tree_util.tree_map(lambda u, c: jnp.concatenate([u, c], axis=0), uncond, cond)


def guided(model_fn: ModelFn, uncond: Any, guidance_scale: jax.typing.ArrayLike) -> ModelFn:
    """`model_fn` with classifier-free guidance: ``fn(x, timesteps, cond)`` makes one batched call on
    [uncond; cond] and returns u + w·(c − u) in float32.

    Timesteps may be a scalar or per sample (B,), as the PF-ODE solver needs (each sample in its own window).
    `guidance_scale` is a scalar or (B,) and traced.
    """
    scale = jnp.asarray(guidance_scale, jnp.float32)

    def fn(x: jax.Array, timesteps: jax.Array, cond: Any) -> jax.Array:
        return _mix(model_fn, x, timesteps, _stack(uncond, cond), scale)

    return fn


def classifier_free_guidance(model_fn: ModelFn, cond: Any, uncond: Any, guidance_scale: jax.typing.ArrayLike
                             ) -> Denoiser:
    """A denoiser for :func:`sample` with classifier-free guidance (see :func:`guided`); the
    [uncond; cond] context is stacked once, outside the loop.

    Args:
      model_fn: ``model_fn(x, timesteps, context) -> output`` for a batch; ``timesteps`` has shape (B,).
      cond, uncond: the conditioning pytrees (each leaf batched like ``x``), e.g. text embeddings.
      guidance_scale: scalar or per-sample (B,) array; traced, so changing it never recompiles.
    """
    both = _stack(uncond, cond)
    scale = jnp.asarray(guidance_scale, jnp.float32)

    def denoise(x: jax.Array, timestep: jax.Array, step_index: jax.Array) -> jax.Array:
        del step_index
        return _mix(model_fn, x, timestep, both, scale)

    return denoise


def conditional(model_fn: ModelFn, cond: Any) -> Denoiser:
    """A denoiser for :func:`sample` without guidance: the conditional model alone, float32 out."""

    def denoise(x: jax.Array, timestep: jax.Array, step_index: jax.Array) -> jax.Array:
        del step_index
        t = jnp.broadcast_to(jnp.asarray(timestep), (x.shape[0],))
        return model_fn(x, t, cond).astype(jnp.float32)

    return denoise
