"""The Euler sampler of Karras et al. (2022, arXiv:2206.00364, Algorithm 2) as pure JAX functions, matching
diffusers' ``EulerDiscreteScheduler``.

The sampler works on the VE form x = x₀ + σ·ε of the DDPM chain, σ_t = sqrt((1 − ᾱ_t)/ᾱ_t): the model sees
x/sqrt(σ² + 1) (:func:`scale_model_input`) at a float timestep, and each step moves along dx/dσ = (x − x̂₀)/σ.
σ per step (n + 1 values, the last 0 or σ_min) is precomputed by :func:`set_timesteps`. Kept diffusers
behaviour (the contract here):

* Timesteps are floats: "linspace" points are not rounded, and Karras/exponential/beta σ map back to
  fractional timesteps by interpolation in log σ. With ``timestep_type="continuous"`` and v-prediction
  the model timestep is 0.25·log σ.
* ``init_noise_sigma`` is σ_max for "linspace"/"trailing" spacing and sqrt(σ_max² + 1) for "leading".
* Churn (``s_churn``, ``s_tmin``, ``s_tmax``, ``s_noise``, per-call arguments in diffusers, config fields
  here) raises σ to σ̂ = σ(1 + γ) with fresh noise from the step's key; v-prediction still uses σ, not σ̂.
* ``add_noise`` looks each timestep up in the schedule (the second match if it repeats) and adds σ·ε.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from perflow_jax.schedulers import base, common

TIMESTEP_TYPES = ("discrete", "continuous")


@dataclasses.dataclass(frozen=True)
class EulerConfig(base.ConfigMixin):
    """diffusers ``EulerDiscreteScheduler`` settings (same names and defaults), plus its per-call churn
    arguments."""

    class_name = "EulerDiscreteScheduler"

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    interpolation_type: str = "linear"
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    sigma_min: float | None = None
    sigma_max: float | None = None
    timestep_spacing: str = "linspace"
    timestep_type: str = "discrete"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False
    final_sigmas_type: str = "zero"
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = math.inf
    s_noise: float = 1.0

    def __post_init__(self) -> None:
        common.check_vp_schedule(self)
        common.check_choice("prediction_type", self.prediction_type, common.PREDICTION_TYPES)
        common.check_choice("interpolation_type", self.interpolation_type, ("linear",))
        common.check_choice("timestep_spacing", self.timestep_spacing, common.TIMESTEP_SPACINGS)
        common.check_choice("timestep_type", self.timestep_type, TIMESTEP_TYPES)
        common.check_choice("final_sigmas_type", self.final_sigmas_type, common.FINAL_SIGMAS_TYPES)
        common.check_non_negative_int("steps_offset", self.steps_offset)
        common.sigma_spacing(self)
        if self.s_churn < 0 or self.s_noise < 0:
            raise ValueError(f"s_churn and s_noise must be >= 0, got {self.s_churn} and {self.s_noise}.")


@struct.dataclass
class EulerState:
    """Per-step arrays for one ``num_inference_steps``.

    Attributes:
      timesteps: the model's (float) timestep at each step, exactly diffusers', (n,) float32.
      sigmas: σ at each step and after the last, (n + 1,) float32.
      gamma: the churn factor γ of each step (0 without churn), (n,).
      init_noise_sigma: the std of the initial noise, () float32.
    """

    timesteps: jax.Array
    sigmas: jax.Array
    gamma: jax.Array
    init_noise_sigma: jax.Array


def euler_sigmas(config: Any, num_inference_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """diffusers' Euler schedule: (float timesteps (n,), σ (n + 1,)), both float32.

    Shared with Euler ancestral; the σ re-spacings and ``final_sigmas_type`` apply where `config` has them.
    """
    T = config.num_train_timesteps
    n = common.check_num_inference_steps(num_inference_steps, T)
    timesteps = common.spaced_timesteps(config.timestep_spacing, T, n, config.steps_offset,
                                        round_linspace=False).astype(np.float32)
    table = common.vp_sigmas(common.diffusers_alphas_cumprod(config, zero_snr_floor=True))
    sigmas = np.interp(timesteps, np.arange(T), table)
    kind = common.sigma_spacing(config)
    if kind is not None:
        sigmas = common.convert_sigmas(kind, sigmas, n, config.sigma_min, config.sigma_max)
        timesteps = common.sigma_to_t(sigmas, np.log(table)).astype(np.float32)
    last = float(table[0]) if getattr(config, "final_sigmas_type", "zero") == "sigma_min" else 0.0
    return timesteps, np.append(sigmas, last).astype(np.float32)


def init_noise_sigma_for(spacing: str, sigmas: np.ndarray) -> np.ndarray:
    """σ_max for "linspace"/"trailing" spacing, sqrt(σ_max² + 1) for "leading" (float32, like diffusers)."""
    s = np.float32(sigmas.max())
    return s if spacing in ("linspace", "trailing") else np.sqrt(s * s + np.float32(1.0))


def set_timesteps(config: EulerConfig, num_inference_steps: int, *, sample_shape: Any = None) -> EulerState:
    """Precompute the schedule (host-side; call once per step count). `sample_shape` is unused (single-step)."""
    del sample_shape
    timesteps, sigmas = euler_sigmas(config, num_inference_steps)
    if config.timestep_type == "continuous" and config.prediction_type == "v_prediction":
        timesteps = (0.25 * np.log(sigmas[:-1])).astype(np.float32)
    n = timesteps.shape[0]
    in_range = (config.s_tmin <= sigmas[:-1]) & (sigmas[:-1] <= config.s_tmax)
    gamma = np.where(in_range, min(config.s_churn / n, 2**0.5 - 1), 0.0)
    return EulerState(timesteps=jnp.asarray(timesteps), sigmas=jnp.asarray(sigmas),
                      gamma=jnp.asarray(gamma, jnp.float32),
                      init_noise_sigma=jnp.asarray(init_noise_sigma_for(config.timestep_spacing, sigmas)))


def scale_model_input(config: Any, state: Any, sample: jax.Array, step_index: Any) -> jax.Array:
    """x/sqrt(σ² + 1): the model input at σ (any state with ``sigmas``; `config` is unused); `sample`'s dtype
    out."""
    del config
    sigma = state.sigmas[step_index]
    return (sample.astype(jnp.float32) / jnp.sqrt(sigma**2 + 1)).astype(sample.dtype)


def karras_preconditioning(sigma: jax.typing.ArrayLike, sigma_data: float = 1.0
                           ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Karras et al. (2022) Table 1 preconditioning of a denoiser D(x; σ) = c_skip·x + c_out·F(c_in·x; c_noise)
    in the VE form this sampler uses, float32: ``(c_skip, c_out, c_in, c_noise)`` with c_skip = σd²/(σ² + σd²),
    c_out = σ·σd/sqrt(σ² + σd²), c_in = 1/sqrt(σ² + σd²), c_noise = log(σ)/4.

    With σd = 1 (SD latents), c_in·x is :func:`scale_model_input`; the SD ×2 latent upscaler
    (:mod:`perflow_jax.pipelines.upscale`) wraps its UNet F this way, so D returns x̂₀ (``prediction_type="sample"``).
    """
    sigma = jnp.asarray(sigma, jnp.float32)
    sd2 = jnp.float32(sigma_data) ** 2
    denom = sigma**2 + sd2
    return sd2 / denom, sigma * jnp.float32(sigma_data) / jnp.sqrt(denom), 1 / jnp.sqrt(denom), jnp.log(sigma) / 4


def step(config: EulerConfig, state: EulerState, model_output: jax.Array, step_index: Any, sample: jax.Array,
         key: jax.Array | None = None) -> tuple[jax.Array, EulerState]:
    """One Euler step from σ (churned to σ̂) to the next σ; float32 math, `sample`'s dtype out.

    A key is needed only with ``s_churn > 0``.
    """
    common.check_same_shape(model_output, sample)
    common.check_step_index(state.timesteps.shape[0], step_index)
    x, out = sample.astype(jnp.float32), model_output.astype(jnp.float32)
    sigma = state.sigmas[step_index]
    sigma_hat = sigma * (state.gamma[step_index] + 1)
    if config.s_churn > 0:
        eps = common.step_noise(key, sample.shape, "Euler (s_churn > 0)") * config.s_noise
        x = x + eps * jnp.sqrt(sigma_hat**2 - sigma**2)
    x0 = common.predict_x0_ve(config.prediction_type, out, x, sigma, sigma_hat)
    derivative = (x - x0) / sigma_hat
    prev = x + derivative * (state.sigmas[step_index + 1] - sigma_hat)
    return prev.astype(sample.dtype), state


def add_noise(config: Any, original: jax.Array, noise: jax.Array, timesteps: jax.typing.ArrayLike,
              state: Any = None) -> jax.Array:
    """x₀ + σ·ε with σ looked up from the schedule's timesteps (any state with ``timesteps``/``sigmas``;
    `config` is unused).

    A timestep not in the schedule raises when concrete; under ``jit`` it gets the final σ."""
    del config
    if state is None:
        raise ValueError("Euler add_noise needs the state from set_timesteps to map timesteps to sigmas.")
    common.check_same_shape(noise, original)
    idx = common.timestep_index(state.timesteps, timesteps)
    if common.is_concrete(idx) and bool(jnp.any(idx < 0)):
        raise ValueError(f"add_noise timesteps {np.asarray(timesteps).tolist()} are not all in the schedule "
                         f"{np.asarray(state.timesteps).tolist()}.")
    sigma = common.broadcast_to_sample(state.sigmas[idx].reshape(-1) if idx.ndim else state.sigmas[idx], original)
    return (original.astype(jnp.float32) + noise.astype(jnp.float32) * sigma).astype(original.dtype)


def init_noise_sigma(config: Any, state: Any) -> jax.Array:
    """The std of the initial noise, precomputed by ``set_timesteps`` (any state with ``init_noise_sigma``)."""
    del config
    return state.init_noise_sigma


def make(config: EulerConfig) -> base.Scheduler:
    """The registry bundle: this module's functions bound to `config`."""
    return base.bundle("euler", config, sys.modules[__name__])
