"""The latent consistency model sampler (Luo et al. 2023, arXiv:2310.04378) as pure JAX functions, matching
diffusers' ``LCMScheduler``.

Each step maps the sample to the consistency function's output
``denoised = c_out·x̂₀ + c_skip·x_t`` (boundary-condition scalings with σ_data = 0.5 at t·timestep_scaling)
and, except after the last step, re-noises it to the next timestep with fresh N(0, 1) noise from the step's
key. Kept diffusers behaviour (the contract here):

* Timesteps come from the distillation grid ``(1..original_inference_steps·strength)·(T // original) − 1``,
  reversed, taking ``n`` evenly spaced indices (floored); ``timestep_spacing``/``steps_offset`` are ignored.
* ``step`` returns the next sample; :func:`denoised` gives the step's ``denoised`` output (what diffusers
  pipelines decode after the last step; the two coincide there).
* The key is required whenever the schedule has more than one step (the step index may be traced).
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

from perflow_jax import values
from perflow_jax.schedulers import base, common

SIGMA_DATA = 0.5


@dataclasses.dataclass(frozen=True)
class LCMConfig(base.ConfigMixin):
    """diffusers ``LCMScheduler`` settings (same names and defaults)."""

    class_name = "LCMScheduler"

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    trained_betas: tuple[float, ...] | None = None
    original_inference_steps: int = 50
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    prediction_type: str = "epsilon"
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    timestep_spacing: str = "leading"
    timestep_scaling: float = 10.0
    rescale_betas_zero_snr: bool = False

    def __post_init__(self) -> None:
        common.check_vp_schedule(self)
        common.check_positive_int("original_inference_steps", self.original_inference_steps)
        common.check_choice("prediction_type", self.prediction_type, common.PREDICTION_TYPES)
        common.check_choice("timestep_spacing", self.timestep_spacing, common.TIMESTEP_SPACINGS)
        common.check_non_negative_int("steps_offset", self.steps_offset)
        common.check_thresholding(self)
        if self.original_inference_steps > self.num_train_timesteps:
            raise ValueError(f"original_inference_steps={self.original_inference_steps} exceeds "
                             f"num_train_timesteps={self.num_train_timesteps}.")
        if not self.timestep_scaling > 0:
            raise ValueError(f"timestep_scaling must be positive, got {self.timestep_scaling}.")


@struct.dataclass
class LCMState:
    """Per-step arrays for one ``num_inference_steps`` (shape (n,) but ``alphas_cumprod``, (T,)).

    Attributes:
      alphas_cumprod: ᾱ table (float32), for ``add_noise``.
      timesteps: integer model timesteps, exactly diffusers' (int32).
      alpha_prod: ᾱ_t at each step.
      c_skip, c_out: the consistency boundary-condition scalings.
      denoised_coef, noise_coef: the next sample is denoised_coef·denoised + noise_coef·z
        (sqrt(ᾱ_next) and sqrt(1 − ᾱ_next); 1 and 0 on the last step).
    """

    alphas_cumprod: jax.Array
    timesteps: jax.Array
    alpha_prod: jax.Array
    c_skip: jax.Array
    c_out: jax.Array
    denoised_coef: jax.Array
    noise_coef: jax.Array


def lcm_timesteps(config: LCMConfig, num_inference_steps: int, original_inference_steps: int | None = None,
                  strength: float = 1.0) -> np.ndarray:
    """diffusers' LCM timesteps (int64): `num_inference_steps` of the distillation grid, noisiest first."""
    T = config.num_train_timesteps
    n = common.check_num_inference_steps(num_inference_steps, T)
    original = config.original_inference_steps if original_inference_steps is None else original_inference_steps
    common.check_positive_int("original_inference_steps", original)
    if original > T:
        raise ValueError(f"original_inference_steps={original} exceeds num_train_timesteps={T}.")
    if not 0.0 < values.check_float("strength", strength) <= 1.0:
        raise ValueError(f"strength must lie in (0, 1], got {strength}.")
    grid = np.arange(1, int(original * strength) + 1) * (T // original) - 1
    if n > grid.shape[0] or n > original:
        raise ValueError(
            f"num_inference_steps={n} exceeds the {grid.shape[0]} timesteps of the distillation grid "
            f"(original_inference_steps={original} × strength={strength})."
        )
    idx = np.floor(np.linspace(0, grid.shape[0], num=n, endpoint=False)).astype(np.int64)
    return grid[::-1][idx]


def set_timesteps(config: LCMConfig, num_inference_steps: int, *, original_inference_steps: int | None = None,
                  strength: float = 1.0, sample_shape: Any = None) -> LCMState:
    """Precompute the schedule (host-side). `original_inference_steps` overrides the config's; `strength`
    < 1 keeps the low-noise part of the grid (image-to-image). `sample_shape` is unused (single-step)."""
    del sample_shape
    timesteps = lcm_timesteps(config, num_inference_steps, original_inference_steps, strength)
    ac = common.diffusers_alphas_cumprod(config)
    ac_t = ac[timesteps].astype(np.float64)
    ac_next = np.append(ac[timesteps[1:]].astype(np.float64), 1.0)
    is_last = np.arange(timesteps.shape[0]) == timesteps.shape[0] - 1
    scaled = timesteps * config.timestep_scaling
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    return LCMState(
        alphas_cumprod=f32(ac),
        timesteps=jnp.asarray(timesteps, jnp.int32),
        alpha_prod=f32(ac_t),
        c_skip=f32(SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)),
        c_out=f32(scaled / np.sqrt(scaled**2 + SIGMA_DATA**2)),
        denoised_coef=f32(np.where(is_last, 1.0, np.sqrt(ac_next))),
        noise_coef=f32(np.where(is_last, 0.0, np.sqrt(1 - ac_next))),
    )


def denoised(config: LCMConfig, state: LCMState, model_output: jax.Array, step_index: Any, sample: jax.Array
             ) -> jax.Array:
    """The consistency function's output c_out·x̂₀ + c_skip·x_t at step `step_index` (float32)."""
    common.check_same_shape(model_output, sample)
    common.check_step_index(state.timesteps.shape[0], step_index)
    x, out = sample.astype(jnp.float32), model_output.astype(jnp.float32)
    ac_t = state.alpha_prod[step_index]
    x0 = common.predict_x0(config.prediction_type, out, x, jnp.sqrt(ac_t), jnp.sqrt(1 - ac_t))
    x0 = common.clip_or_threshold(config, x0)
    return state.c_out[step_index] * x0 + state.c_skip[step_index] * x


def step(config: LCMConfig, state: LCMState, model_output: jax.Array, step_index: Any, sample: jax.Array,
         key: jax.Array | None = None) -> tuple[jax.Array, LCMState]:
    """Denoise, then re-noise to the next timestep with z ~ N(0, 1) from `key` (not after the last step)."""
    d = denoised(config, state, model_output, step_index, sample)
    prev = state.denoised_coef[step_index] * d
    if state.timesteps.shape[0] > 1:
        prev = prev + state.noise_coef[step_index] * common.step_noise(key, sample.shape, "LCM")
    return prev.astype(sample.dtype), state


def add_noise(config: LCMConfig, original: jax.Array, noise: jax.Array, timesteps: jax.typing.ArrayLike,
              state: LCMState | None = None) -> jax.Array:
    """Forward diffusion sqrt(ᾱ_t)·x₀ + sqrt(1 − ᾱ_t)·ε at zero-based integer timesteps (scalar or (B,))."""
    del state
    return common.add_noise_discrete(config, original, noise, timesteps)


scale_model_input = base.unscaled_model_input  # the model sees the sample as is
init_noise_sigma = base.unit_noise_sigma  # the initial noise is N(0, 1)


def make(config: LCMConfig) -> base.Scheduler:
    """The registry bundle: this module's functions bound to `config`."""
    return base.bundle("lcm", config, sys.modules[__name__])
