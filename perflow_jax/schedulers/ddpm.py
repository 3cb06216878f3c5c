"""DDPM ancestral sampling (Ho et al. 2020, arXiv:2006.11239) as pure JAX functions, matching diffusers'
``DDPMScheduler``.

The posterior mean coefficients and the noise std of every step are precomputed on the host by
:func:`set_timesteps`; :func:`step` draws its N(0, 1) noise from the PRNG key it is given. Kept diffusers
behaviour (the contract here):

* The previous timestep is the next entry of the schedule (−1, i.e. ᾱ = 1, after the last).
* Noise is added at every step whose timestep is above 0, so a "trailing" schedule (ending at t > 0) adds
  noise on its last step too; the key is required whatever the timestep (the step index may be traced).
* ``variance_type``: "fixed_small" (σ² = β̃_t, clamped at 1e-20), "fixed_small_log" (the same through a
  log) and "fixed_large" (σ² = β_t). diffusers' "fixed_large_log" takes the square root of a log
  (NaN), and "learned"/"learned_range" need a model predicting its variance; these are rejected.
* **add_noise** takes zero-based integer timesteps: ᾱ[t].
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from perflow_jax.schedulers import base, common

VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large")


@dataclasses.dataclass(frozen=True)
class DDPMConfig(base.ConfigMixin):
    """diffusers ``DDPMScheduler`` settings (same names and defaults) for the supported options."""

    class_name = "DDPMScheduler"

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    variance_type: str = "fixed_small"
    clip_sample: bool = True
    prediction_type: str = "epsilon"
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    clip_sample_range: float = 1.0
    sample_max_value: float = 1.0
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False

    def __post_init__(self) -> None:
        common.check_vp_schedule(self)
        common.check_choice("variance_type", self.variance_type, VARIANCE_TYPES)
        common.check_choice("prediction_type", self.prediction_type, common.PREDICTION_TYPES)
        common.check_choice("timestep_spacing", self.timestep_spacing, common.TIMESTEP_SPACINGS)
        common.check_non_negative_int("steps_offset", self.steps_offset)
        common.check_thresholding(self)


@struct.dataclass
class DDPMState:
    """Per-step arrays for one ``num_inference_steps`` (shape (n,) but ``alphas_cumprod``, (T,)).

    Attributes:
      alphas_cumprod: ᾱ table (float32), for ``add_noise``.
      timesteps: integer model timesteps, exactly diffusers' (int32).
      alpha_prod: ᾱ_t at each step.
      x0_coef, sample_coef: the posterior mean μ = x0_coef·x̂₀ + sample_coef·x_t.
      std: the std of the injected noise (0 at t = 0).
    """

    alphas_cumprod: jax.Array
    timesteps: jax.Array
    alpha_prod: jax.Array
    x0_coef: jax.Array
    sample_coef: jax.Array
    std: jax.Array


def set_timesteps(config: DDPMConfig, num_inference_steps: int, *, sample_shape: Any = None) -> DDPMState:
    """Precompute the schedule (host-side; call once per step count). `sample_shape` is unused (single-step)."""
    del sample_shape
    T = config.num_train_timesteps
    n = common.check_num_inference_steps(num_inference_steps, T)
    timesteps = common.spaced_timesteps(config.timestep_spacing, T, n, config.steps_offset).astype(np.int64)
    ac = common.diffusers_alphas_cumprod(config)
    ac_t = ac[timesteps].astype(np.float64)
    ac_prev = np.append(ac[timesteps[1:]].astype(np.float64), 1.0)
    beta_t = 1 - ac_t / ac_prev
    if config.variance_type == "fixed_large":
        variance = beta_t
    else:  # fixed_small and fixed_small_log: the posterior variance β̃_t
        variance = np.maximum((1 - ac_prev) / (1 - ac_t) * beta_t, 1e-20)
    std = np.where(timesteps > 0, np.sqrt(variance), 0.0)
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    return DDPMState(
        alphas_cumprod=f32(ac),
        timesteps=jnp.asarray(timesteps, jnp.int32),
        alpha_prod=f32(ac_t),
        x0_coef=f32(np.sqrt(ac_prev) * beta_t / (1 - ac_t)),
        sample_coef=f32(np.sqrt(1 - beta_t) * (1 - ac_prev) / (1 - ac_t)),
        std=f32(std),
    )


def step(config: DDPMConfig, state: DDPMState, model_output: jax.Array, step_index: Any, sample: jax.Array,
         key: jax.Array | None = None) -> tuple[jax.Array, DDPMState]:
    """One ancestral step: x_prev = μ(x̂₀, x_t) + σ·z with z ~ N(0, 1) from `key` (required)."""
    common.check_same_shape(model_output, sample)
    common.check_step_index(state.timesteps.shape[0], step_index)
    noise = common.step_noise(key, sample.shape, "DDPM")
    x, out = sample.astype(jnp.float32), model_output.astype(jnp.float32)
    ac_t = state.alpha_prod[step_index]
    x0 = common.predict_x0(config.prediction_type, out, x, jnp.sqrt(ac_t), jnp.sqrt(1 - ac_t))
    x0 = common.clip_or_threshold(config, x0)
    mean = state.x0_coef[step_index] * x0 + state.sample_coef[step_index] * x
    return (mean + state.std[step_index] * noise).astype(sample.dtype), state


def add_noise(config: DDPMConfig, original: jax.Array, noise: jax.Array, timesteps: jax.typing.ArrayLike,
              state: DDPMState | None = None) -> jax.Array:
    """Forward diffusion sqrt(ᾱ_t)·x₀ + sqrt(1 − ᾱ_t)·ε at zero-based integer timesteps (scalar or (B,))."""
    del state
    return common.add_noise_discrete(config, original, noise, timesteps)


scale_model_input = base.unscaled_model_input  # the model sees the sample as is
init_noise_sigma = base.unit_noise_sigma  # the initial noise is N(0, 1)


def make(config: DDPMConfig) -> base.Scheduler:
    """The registry bundle: this module's functions bound to `config`."""
    return base.bundle("ddpm", config, sys.modules[__name__])
