"""DDIM (Song et al. 2020, arXiv:2010.02502) as pure JAX functions, matching diffusers' ``DDIMScheduler``.

Every per-step scalar (ᾱ at the step and the previous step, the η noise scale) is precomputed on the host
by :func:`set_timesteps`, so :func:`step` is a handful of float32 array ops that work with a traced
step index. Kept diffusers behaviour (the contract here):

* **Previous timestep** is ``t − T // n`` whatever the ``timestep_spacing``, so with "linspace" and
  "trailing" the DDIM update targets a timestep that is not the next one in the schedule, exactly as
  diffusers does; below 0 it uses the final ᾱ (1 with ``set_alpha_to_one``, else ᾱ[0]).
* **η** is a config field here (diffusers takes it per ``step`` call); η > 0 draws N(0, 1) noise from the
  step's PRNG key. ``use_clipped_model_output`` likewise.
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


@dataclasses.dataclass(frozen=True)
class DDIMConfig(base.ConfigMixin):
    """diffusers ``DDIMScheduler`` settings (same names and defaults), plus the per-call ``eta`` and
    ``use_clipped_model_output`` of its ``step``."""

    class_name = "DDIMScheduler"

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    clip_sample: bool = True
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    prediction_type: str = "epsilon"
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    clip_sample_range: float = 1.0
    sample_max_value: float = 1.0
    timestep_spacing: str = "leading"
    rescale_betas_zero_snr: bool = False
    eta: float = 0.0
    use_clipped_model_output: bool = False

    def __post_init__(self) -> None:
        common.check_vp_schedule(self)
        common.check_choice("prediction_type", self.prediction_type, common.PREDICTION_TYPES)
        common.check_choice("timestep_spacing", self.timestep_spacing, common.TIMESTEP_SPACINGS)
        common.check_non_negative_int("steps_offset", self.steps_offset)
        common.check_thresholding(self)
        if not self.eta >= 0.0:
            raise ValueError(f"eta must be >= 0 (0 is deterministic DDIM, 1 is DDPM-like), got {self.eta}.")


@struct.dataclass
class DDIMState:
    """Per-step arrays for one ``num_inference_steps`` (shape (n,) but ``alphas_cumprod``, (T,)).

    Attributes:
      alphas_cumprod: ᾱ table (float32), for ``add_noise``.
      timesteps: integer model timesteps, exactly diffusers' (int32).
      alpha_prod: ᾱ_t at each step; alpha_prod_prev: ᾱ at the DDIM target timestep.
      std: η·σ_t, the std of the injected noise (0 when η = 0).
    """

    alphas_cumprod: jax.Array
    timesteps: jax.Array
    alpha_prod: jax.Array
    alpha_prod_prev: jax.Array
    std: jax.Array


def set_timesteps(config: DDIMConfig, num_inference_steps: int, *, sample_shape: Any = None) -> DDIMState:
    """Precompute the schedule (host-side; call once per step count). `sample_shape` is unused (single-step)."""
    del sample_shape
    T = config.num_train_timesteps
    n = common.check_num_inference_steps(num_inference_steps, T)
    timesteps = common.spaced_timesteps(config.timestep_spacing, T, n, config.steps_offset).astype(np.int64)
    ac = common.diffusers_alphas_cumprod(config)
    final = 1.0 if config.set_alpha_to_one else float(ac[0])
    prev = timesteps - T // n
    ac_t = ac[timesteps].astype(np.float64)
    ac_prev = np.where(prev >= 0, ac[np.clip(prev, 0, T - 1)].astype(np.float64), final)
    variance = (1 - ac_prev) / (1 - ac_t) * (1 - ac_t / ac_prev)
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    return DDIMState(alphas_cumprod=f32(ac), timesteps=jnp.asarray(timesteps, jnp.int32), alpha_prod=f32(ac_t),
                     alpha_prod_prev=f32(ac_prev), std=f32(config.eta * np.sqrt(variance)))


def step(config: DDIMConfig, state: DDIMState, model_output: jax.Array, step_index: Any, sample: jax.Array,
         key: jax.Array | None = None) -> tuple[jax.Array, DDIMState]:
    """One DDIM update x_t → x_prev (formula (12) of the paper); float32 math, `sample`'s dtype out."""
    common.check_same_shape(model_output, sample)
    common.check_step_index(state.timesteps.shape[0], step_index)
    x, out = sample.astype(jnp.float32), model_output.astype(jnp.float32)
    ac_t, ac_prev, std = state.alpha_prod[step_index], state.alpha_prod_prev[step_index], state.std[step_index]
    alpha, sigma = jnp.sqrt(ac_t), jnp.sqrt(1 - ac_t)
    x0 = common.predict_x0(config.prediction_type, out, x, alpha, sigma)
    eps = common.predict_epsilon(config.prediction_type, out, x, alpha, sigma)
    x0 = common.clip_or_threshold(config, x0)
    if config.use_clipped_model_output:
        eps = (x - alpha * x0) / sigma
    prev = jnp.sqrt(ac_prev) * x0 + jnp.sqrt(1 - ac_prev - std**2) * eps
    if config.eta > 0:
        prev = prev + std * common.step_noise(key, sample.shape, "DDIM (eta > 0)")
    return prev.astype(sample.dtype), state


def add_noise(config: DDIMConfig, original: jax.Array, noise: jax.Array, timesteps: jax.typing.ArrayLike,
              state: DDIMState | None = None) -> jax.Array:
    """Forward diffusion sqrt(ᾱ_t)·x₀ + sqrt(1 − ᾱ_t)·ε at zero-based integer timesteps (scalar or (B,))."""
    del state
    return common.add_noise_discrete(config, original, noise, timesteps)


scale_model_input = base.unscaled_model_input  # the model sees the sample as is
init_noise_sigma = base.unit_noise_sigma  # the initial noise is N(0, 1)


def make(config: DDIMConfig) -> base.Scheduler:
    """The registry bundle: this module's functions bound to `config`."""
    return base.bundle("ddim", config, sys.modules[__name__])
