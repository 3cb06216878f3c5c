"""Ancestral Euler sampling (k-diffusion's ``sample_euler_ancestral``) as pure JAX functions, matching
diffusers' ``EulerAncestralDiscreteScheduler``.

Each step takes an Euler step from σ down to σ_down and adds fresh noise of std σ_up, with
σ_up = sqrt(σ_next²(σ² − σ_next²)/σ²) and σ_down = sqrt(σ_next² − σ_up²), so the marginal at σ_next is right.
The schedule, model input scaling and ``add_noise`` are Euler's (:mod:`perflow_jax.schedulers.euler`).
Kept diffusers behaviour: the key is required on every step (the last one adds σ_up = 0 noise), and the
"sample" prediction type is not supported (diffusers raises too).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from perflow_jax.schedulers import base, common, euler


@dataclasses.dataclass(frozen=True)
class EulerAncestralConfig(base.ConfigMixin):
    """diffusers ``EulerAncestralDiscreteScheduler`` settings (same names and defaults)."""

    class_name = "EulerAncestralDiscreteScheduler"

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False

    def __post_init__(self) -> None:
        common.check_vp_schedule(self)
        common.check_choice("prediction_type", self.prediction_type, ("epsilon", "v_prediction"))
        common.check_choice("timestep_spacing", self.timestep_spacing, common.TIMESTEP_SPACINGS)
        common.check_non_negative_int("steps_offset", self.steps_offset)


@struct.dataclass
class EulerAncestralState:
    """Per-step arrays for one ``num_inference_steps``.

    Attributes:
      timesteps: the model's float timestep at each step, (n,) float32.
      sigmas: σ at each step and 0 after the last, (n + 1,) float32.
      sigma_up, sigma_down: the noise std and the deterministic target σ of each step, (n,).
      init_noise_sigma: the std of the initial noise, () float32.
    """

    timesteps: jax.Array
    sigmas: jax.Array
    sigma_up: jax.Array
    sigma_down: jax.Array
    init_noise_sigma: jax.Array


def set_timesteps(config: EulerAncestralConfig, num_inference_steps: int, *, sample_shape: Any = None
                  ) -> EulerAncestralState:
    """Precompute the schedule (host-side; call once per step count). `sample_shape` is unused (single-step)."""
    del sample_shape
    timesteps, sigmas = euler.euler_sigmas(config, num_inference_steps)
    s_from, s_to = sigmas[:-1].astype(np.float64), sigmas[1:].astype(np.float64)
    sigma_up = np.sqrt(s_to**2 * (s_from**2 - s_to**2) / s_from**2)
    sigma_down = np.sqrt(s_to**2 - sigma_up**2)
    return EulerAncestralState(
        timesteps=jnp.asarray(timesteps),
        sigmas=jnp.asarray(sigmas),
        sigma_up=jnp.asarray(sigma_up, jnp.float32),
        sigma_down=jnp.asarray(sigma_down, jnp.float32),
        init_noise_sigma=jnp.asarray(euler.init_noise_sigma_for(config.timestep_spacing, sigmas)),
    )


def step(config: EulerAncestralConfig, state: EulerAncestralState, model_output: jax.Array, step_index: Any,
         sample: jax.Array, key: jax.Array | None = None) -> tuple[jax.Array, EulerAncestralState]:
    """Euler step to σ_down plus σ_up·z with z ~ N(0, 1) from `key` (required); `sample`'s dtype out."""
    common.check_same_shape(model_output, sample)
    common.check_step_index(state.timesteps.shape[0], step_index)
    noise = common.step_noise(key, sample.shape, "Euler ancestral")
    x, out = sample.astype(jnp.float32), model_output.astype(jnp.float32)
    sigma = state.sigmas[step_index]
    x0 = common.predict_x0_ve(config.prediction_type, out, x, sigma)
    derivative = (x - x0) / sigma
    prev = x + derivative * (state.sigma_down[step_index] - sigma)
    return (prev + noise * state.sigma_up[step_index]).astype(sample.dtype), state


# Euler's: σ looked up from the schedule, x/sqrt(σ² + 1) and the precomputed σ_init.
add_noise = euler.add_noise
scale_model_input = euler.scale_model_input
init_noise_sigma = euler.init_noise_sigma


def make(config: EulerAncestralConfig) -> base.Scheduler:
    """The registry bundle: this module's functions bound to `config`."""
    return base.bundle("euler_ancestral", config, sys.modules[__name__])
