"""The PF-ODE window solver: the frozen teacher's DDIM trajectory from a window's start to its end.

PeRFlow's training pairs are (x_s, x_e): x_s is a noised image at the window start t_s and x_e is where the
teacher's probability-flow ODE takes it at the window end t_e. The ODE is solved with ``num_steps`` DDIM
steps on the reference solver's time grid (magic-research/piecewise-rectified-flow, ``PFODESolver``):

* time points t_s + i·(t_e − t_s)/n for i = 0..n−1, UNet timestep round(T·t − 1);
* each step targets timestep t − T // (K·n) (K = number of windows), with ᾱ_prev = ``final_alpha_cumprod``
  below 0 (ᾱ[0] unless ``set_alpha_to_one``);
* deterministic DDIM update x_prev = √ᾱ_prev·x̂₀ + √(1 − ᾱ_prev)·ε̂ with no clipping.

Every sample carries its own window (t_s, t_e are (B,) arrays), so one batch mixes windows with no Python
loop over samples. The teacher is any ``teacher_fn(x, timesteps (B,), cond) -> output`` with ``cond`` a
pytree batched like ``x``; for a Flax UNet that is :func:`perflow_jax.models.adapter.unet_fn` with a
:class:`~perflow_jax.models.adapter.UNetCondition`. Classifier-free guidance is
:func:`perflow_jax.sampling.guided`, the same combiner the samplers use.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from perflow_jax import sampling
from perflow_jax.schedulers import common

TeacherFn = sampling.ModelFn  # (x, timesteps (B,), cond) -> output
TEACHER_PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclasses.dataclass(frozen=True)
class SolverConfig:
    """The teacher's noise schedule and the solver's settings.

    Attributes:
      num_steps: DDIM steps per window (the reference's ``solving_steps``).
      num_windows: K, the number of PeRFlow windows (sets the DDIM step size T // (K·n)).
      prediction_type: the teacher's output, ``"epsilon"`` or ``"v_prediction"``.
      set_alpha_to_one: ᾱ past the last step is 1 if set, else ᾱ[0] (the teacher scheduler's setting).
      num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas: the teacher's schedule.
    """

    num_steps: int = 8
    num_windows: int = 4
    prediction_type: str = "epsilon"
    set_alpha_to_one: bool = False
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    trained_betas: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        common.check_vp_schedule(self)
        common.check_choice("prediction_type", self.prediction_type, TEACHER_PREDICTION_TYPES)
        common.check_positive_int("num_steps", self.num_steps)
        common.check_positive_int("num_windows", self.num_windows)
        if self.num_train_timesteps // (self.num_windows * self.num_steps) < 1:
            raise ValueError(f"num_windows·num_steps = {self.num_windows * self.num_steps} exceeds "
                             f"num_train_timesteps = {self.num_train_timesteps}: the DDIM step would be 0.")

    @classmethod
    def from_perflow(cls, perflow_config: Any, **fields: Any) -> SolverConfig:
        """Solver settings sharing a :class:`PeRFlowConfig`'s noise schedule and window count."""
        c = perflow_config
        return cls(num_windows=c.num_time_windows, num_train_timesteps=c.num_train_timesteps,
                   beta_start=c.beta_start, beta_end=c.beta_end, beta_schedule=c.beta_schedule,
                   trained_betas=c.trained_betas, **fields)


@functools.lru_cache(maxsize=32)
def _tables(config: SolverConfig) -> tuple[np.ndarray, np.float32]:
    betas = common.make_betas(config.num_train_timesteps, config.beta_start, config.beta_end,
                              config.beta_schedule, config.trained_betas)
    ac = common.alphas_cumprod(betas).astype(np.float32)
    final = np.float32(1.0) if config.set_alpha_to_one else ac[0]
    return ac, final


def solver_timesteps(config: SolverConfig, t_start: jax.Array, t_end: jax.Array) -> jax.Array:
    """The teacher's integer timesteps, (B, num_steps) int32: round(T·(t_s + i·(t_e − t_s)/n) − 1)."""
    n = config.num_steps
    t_start = jnp.asarray(t_start, jnp.float32)[:, None]
    t_end = jnp.asarray(t_end, jnp.float32)[:, None]
    points = t_start + (t_end - t_start) / np.float32(n) * jnp.arange(n, dtype=jnp.float32)
    step_size = np.float32(1.0 / config.num_train_timesteps)
    return jnp.round((config.num_train_timesteps - 1) + (points - 1.0) / step_size).astype(jnp.int32)


def ddim_update(prediction_type: str, output: jax.Array, x: jax.Array, alpha_prod: jax.Array,
                alpha_prod_prev: jax.Array) -> jax.Array:
    """Deterministic DDIM x_t → x_prev from an ε or v output (per-sample ᾱ broadcast over x; float32).

    x̂₀ and ε̂ come from :func:`perflow_jax.schedulers.common.predict_x0` / ``predict_epsilon`` in the VP form
    α = √ᾱ, σ = √(1 − ᾱ); then x_prev = √ᾱ_prev·x̂₀ + √(1 − ᾱ_prev)·ε̂.
    """
    a = common.broadcast_to_sample(alpha_prod, x)
    a_prev = common.broadcast_to_sample(alpha_prod_prev, x)
    alpha, sigma = jnp.sqrt(a), jnp.sqrt(1 - a)
    x0 = common.predict_x0(prediction_type, output, x, alpha, sigma)
    eps = common.predict_epsilon(prediction_type, output, x, alpha, sigma)
    return jnp.sqrt(a_prev) * x0 + jnp.sqrt(1 - a_prev) * eps


def solve(config: SolverConfig, teacher_fn: TeacherFn, x: jax.Array, t_start: jax.Array, t_end: jax.Array,
          cond: Any, *, uncond: Any = None, guidance_scale: jax.typing.ArrayLike = 1.0) -> jax.Array:
    """Solve the teacher's PF-ODE from x at t_start to t_end, each sample in its own window.

    Args:
      config: the solver settings and the teacher's noise schedule.
      teacher_fn: ``(x, timesteps (B,) int32, cond) -> output`` (ε or v, per ``config.prediction_type``).
      x: (B, ...) samples at their window starts.
      t_start, t_end: (B,) window bounds in [0, 1], t_start > t_end.
      cond: the condition pytree (leaves batched like x).
      uncond: the null condition; when given, the teacher runs with classifier-free guidance
        (:func:`perflow_jax.sampling.guided`: one batched call on [uncond; cond] per step). Without it no
        guidance is applied (the reference's guidance 1).
      guidance_scale: scalar or (B,) (traced).

    Returns:
      x at t_end, float32.
    """
    b = x.shape[0]
    chex.assert_shape([t_start, t_end], [(b,), (b,)])
    if uncond is not None:
        teacher_fn = sampling.guided(teacher_fn, uncond, guidance_scale)
    ac_np, final = _tables(config)
    ac = jnp.asarray(ac_np)
    timesteps = solver_timesteps(config, t_start, t_end)
    stride = config.num_train_timesteps // (config.num_windows * config.num_steps)
    x_dtype = x.dtype

    def body(i: jax.Array, x: jax.Array) -> jax.Array:
        t = timesteps[:, i]
        prev = t - stride
        a = ac[jnp.clip(t, 0, config.num_train_timesteps - 1)]
        a_prev = jnp.where(prev >= 0, ac[jnp.clip(prev, 0, config.num_train_timesteps - 1)], final)
        out = teacher_fn(x.astype(x_dtype), t, cond).astype(jnp.float32)
        return ddim_update(config.prediction_type, out, x, a, a_prev)

    return jax.lax.fori_loop(0, config.num_steps, body, x.astype(jnp.float32))
