"""DPM-Solver++ multistep (Lu et al. 2022, arXiv:2211.01095) as pure JAX functions, matching diffusers'
``DPMSolverMultistepScheduler`` with ``algorithm_type="dpmsolver++"`` (the "DPM++ 2M" sampler) or
``"sde-dpmsolver++"``.

Design: every multistep update is linear in the sample, the current and previous data predictions x̂₀ and
(SDE variant) the injected noise, with coefficients that depend only on the σ schedule. :func:`set_timesteps`
therefore precomputes, per step k and per order p, the weights of ``[x, x̂₀_k, x̂₀_{k−1}, …]`` in float64
(``weights``); :func:`step` selects the order from the state's ``lower_order_nums`` counter and takes a
weighted sum. The previous x̂₀ live in a fixed-shape ``history`` array, so the state is a ``lax.scan``
carry; it is sized by ``set_timesteps(n, sample_shape=latents.shape)``.

Kept diffusers behaviour (the contract here):

* Order warm-up: step k uses order min(lower_order_nums + 1, solver_order). ``lower_order_final`` drops to
  first order on the last step and second order on the one before when there are fewer than 15 steps;
  ``final_sigmas_type="zero"`` (the default) or ``euler_at_final`` always make the last step first order.
* Karras σ map back to timesteps by log-σ interpolation, rounded unless the beta schedule is
  "squaredcos_cap_v2" (then truncated by the integer cast).
* ``solver_type`` "logrho"/"bh1"/"bh2" mean "midpoint" and ``algorithm_type`` "deis" means
  "dpmsolver++", as in diffusers.
* ``add_noise`` looks each timestep up in the schedule (the second match if it repeats, the last step if
  absent) and returns α_t·x₀ + σ_t·ε for that step's σ.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from perflow_jax.schedulers import base, common

ALGORITHM_TYPES = ("dpmsolver++", "sde-dpmsolver++")
SOLVER_TYPES = ("midpoint", "heun")


@dataclasses.dataclass(frozen=True)
class DPMSolverConfig(base.ConfigMixin):
    """diffusers ``DPMSolverMultistepScheduler`` settings (same names and defaults); options this port does
    not implement must keep their defaults."""

    class_name = "DPMSolverMultistepScheduler"

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    solver_order: int = 2
    prediction_type: str = "epsilon"
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    use_lu_lambdas: bool = False
    use_flow_sigmas: bool = False
    flow_shift: float = 1.0
    final_sigmas_type: str = "zero"
    lambda_min_clipped: float = -math.inf
    variance_type: str | None = None
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False
    use_dynamic_shifting: bool = False
    time_shift_type: str = "exponential"

    def __post_init__(self) -> None:
        common.check_vp_schedule(self)
        if self.algorithm_type == "deis":
            object.__setattr__(self, "algorithm_type", "dpmsolver++")
        if self.solver_type in ("logrho", "bh1", "bh2"):
            object.__setattr__(self, "solver_type", "midpoint")
        common.check_choice("solver_order", self.solver_order, (1, 2, 3))
        common.check_choice("prediction_type", self.prediction_type, common.PREDICTION_TYPES)
        common.check_choice("algorithm_type", self.algorithm_type, ALGORITHM_TYPES)
        common.check_choice("solver_type", self.solver_type, SOLVER_TYPES)
        common.check_choice("final_sigmas_type", self.final_sigmas_type, common.FINAL_SIGMAS_TYPES)
        common.check_choice("timestep_spacing", self.timestep_spacing, common.TIMESTEP_SPACINGS)
        common.check_non_negative_int("steps_offset", self.steps_offset)
        common.check_thresholding(self)
        common.sigma_spacing(self)
        common.check_unsupported(self, use_lu_lambdas=False, use_flow_sigmas=False, use_dynamic_shifting=False,
                                 variance_type=None)


@struct.dataclass
class DPMSolverState:
    """The schedule (per-step arrays, n steps) and the multistep history.

    Attributes:
      timesteps: integer model timesteps, exactly diffusers', (n,) int32.
      sigmas: σ at each step and after the last, (n + 1,) float32.
      alpha_t, sigma_t: VP coefficients of each step's σ, for x̂₀ and ``add_noise``, (n,).
      weights: (n, solver_order, 1 + solver_order): for step k and c = min(lower_order_nums, order − 1),
        the weights of [x, x̂₀_k, x̂₀_{k−1}, …] in the update (the order-warm-up rules are baked in).
      noise_weight: (n, solver_order), the std of the injected noise (SDE variant; 0 otherwise).
      history: (solver_order − 1, *sample_shape) float32, the previous x̂₀, newest first.
      lower_order_nums: () int32, the number of steps taken, capped at solver_order.
    """

    timesteps: jax.Array
    sigmas: jax.Array
    alpha_t: jax.Array
    sigma_t: jax.Array
    weights: jax.Array
    noise_weight: jax.Array
    history: jax.Array
    lower_order_nums: jax.Array


def _schedule(config: DPMSolverConfig, n: int) -> tuple[np.ndarray, np.ndarray]:
    """diffusers' (integer timesteps, σ with the final σ appended) for `n` steps."""
    T = config.num_train_timesteps
    ac = common.diffusers_alphas_cumprod(config, zero_snr_floor=True)
    table = common.vp_sigmas(ac)
    with np.errstate(divide="ignore"):
        lambdas = np.log(np.sqrt(ac)) - np.log(np.sqrt(np.float32(1.0) - ac))
    clipped = int(np.searchsorted(lambdas[::-1], config.lambda_min_clipped))
    timesteps = common.spaced_timesteps(config.timestep_spacing, T, n, config.steps_offset, solver_grid=True,
                                        last_timestep=T - clipped)
    kind = common.sigma_spacing(config)
    if kind is None:
        sigmas = np.interp(timesteps, np.arange(T), table)
    else:
        sigmas = common.convert_sigmas(kind, table[::-1], n)
        timesteps = common.sigma_to_t(sigmas, np.log(table))
        if kind == "karras" and config.beta_schedule != "squaredcos_cap_v2":
            timesteps = timesteps.round()
    last = float(table[0]) if config.final_sigmas_type == "sigma_min" else 0.0
    return timesteps.astype(np.int64), np.append(sigmas, last).astype(np.float32)


def _update(config: DPMSolverConfig, lam: list[float], alpha: list[float], sigma: list[float], k: int, p: int
            ) -> tuple[list[float], float]:
    """Weights of [x, x̂₀_k, …, x̂₀_{k−p+1}] and the noise std for an order-`p` update from step k to k + 1.

    diffusers writes the update as w_x·x + b0·D0 + b1·D1 + b2·D2 (+ noise) with divided differences D of
    the x̂₀ history; this expands the D into weights of the x̂₀ themselves.
    """
    h = lam[k + 1] - lam[k]
    if h == 0:  # σ does not move (Karras σ ending at σ_min with final_sigmas_type="sigma_min"): identity
        return [1.0] + [0.0] * p, 0.0
    a_t = alpha[k + 1]
    sde = config.algorithm_type == "sde-dpmsolver++"
    if sde:
        em = -math.expm1(-2.0 * h)  # 1 − e^{−2h}
        w_x, b0, noise = sigma[k + 1] / sigma[k] * math.exp(-h), a_t * em, sigma[k + 1] * math.sqrt(em)
    else:
        em = math.expm1(-h)  # e^{−h} − 1
        w_x, b0, noise = sigma[k + 1] / sigma[k], -a_t * em, 0.0
    if p == 1:
        return [w_x, b0], noise
    if config.solver_type == "midpoint" and p == 2:
        b1 = 0.5 * a_t * em if sde else -0.5 * a_t * em
    else:  # heun, and the third-order update
        b1 = a_t * (em / (-2.0 * h) + 1.0) if sde else a_t * (em / h + 1.0)
    r0 = (lam[k] - lam[k - 1]) / h
    if p == 2:  # D1 = (m0 − m1)/r0
        return [w_x, b0 + b1 / r0, -b1 / r0], noise
    b2 = a_t * ((em - 2.0 * h) / (2.0 * h) ** 2 - 0.5) if sde else -a_t * ((em + h) / h**2 - 0.5)
    r1 = (lam[k - 1] - lam[k - 2]) / h  # D1 = (1 + q)·D1_0 − q·D1_1, D2 = (D1_0 − D1_1)/(r0 + r1)
    q = r0 / (r0 + r1)
    e0 = b1 * (1 + q) + b2 / (r0 + r1)  # weight of D1_0 = (m0 − m1)/r0
    e1 = -b1 * q - b2 / (r0 + r1)  # weight of D1_1 = (m1 − m2)/r1
    return [w_x, b0 + e0 / r0, -e0 / r0 + e1 / r1, -e1 / r1], noise


def set_timesteps(config: DPMSolverConfig, num_inference_steps: int, *,
                  sample_shape: tuple[int, ...] | None = None) -> DPMSolverState:
    """Precompute the schedule and update weights (host-side) and an empty history shaped like the samples.

    `sample_shape` (the latents' shape) sizes the multistep history; without it, ``step`` raises.
    """
    common.check_num_inference_steps(num_inference_steps, config.num_train_timesteps)
    timesteps, sigmas = _schedule(config, num_inference_steps)
    n, order = timesteps.shape[0], config.solver_order
    alpha, sigma = common.alpha_sigma_from_sigma(sigmas)
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma)  # λ = log(α/σ); +inf at a final σ of 0
    coefs = (lam.tolist(), alpha.tolist(), sigma.tolist())  # Python floats: inf arithmetic without warnings
    weights = np.zeros((n, order, 1 + order))
    noise_weight = np.zeros((n, order))
    for k in range(n):
        last = k == n - 1 and (config.euler_at_final or (config.lower_order_final and n < 15)
                               or config.final_sigmas_type == "zero")
        second_last = k == n - 2 and config.lower_order_final and n < 15
        cap = 1 if last else 2 if second_last else order
        for c in range(order):
            p = min(c + 1, cap, k + 1)
            w, noise_weight[k, c] = _update(config, *coefs, k, p)
            weights[k, c, : len(w)] = w
    shape = (0,) if sample_shape is None else tuple(sample_shape)
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    return DPMSolverState(
        timesteps=jnp.asarray(timesteps, jnp.int32),
        sigmas=jnp.asarray(sigmas),
        alpha_t=f32(alpha[:-1]),
        sigma_t=f32(sigma[:-1]),
        weights=f32(weights),
        noise_weight=f32(noise_weight),
        history=jnp.zeros((order - 1, *shape), jnp.float32),
        lower_order_nums=jnp.zeros((), jnp.int32),
    )


def step(config: DPMSolverConfig, state: DPMSolverState, model_output: jax.Array, step_index: Any,
         sample: jax.Array, key: jax.Array | None = None) -> tuple[jax.Array, DPMSolverState]:
    """One multistep update; returns the next sample (`sample`'s dtype) and the state with updated history.

    The SDE variant draws its noise from `key` (required there).
    """
    common.check_same_shape(model_output, sample)
    common.check_step_index(state.timesteps.shape[0], step_index)
    common.check_history(state.history, sample, "DPM-Solver++")
    order = config.solver_order
    x, out = sample.astype(jnp.float32), model_output.astype(jnp.float32)
    x0 = common.predict_x0(config.prediction_type, out, x, state.alpha_t[step_index], state.sigma_t[step_index])
    x0 = common.clip_or_threshold(config, x0)
    c = jnp.minimum(state.lower_order_nums, order - 1)
    w = state.weights[step_index, c]
    outputs = [x0, *(state.history[j] for j in range(order - 1))]
    prev = w[0] * x + sum(w[1 + j] * m for j, m in enumerate(outputs))
    if config.algorithm_type == "sde-dpmsolver++":
        noise = common.step_noise(key, sample.shape, "SDE-DPM-Solver++")
        prev = prev + state.noise_weight[step_index, c] * noise
    state = state.replace(history=jnp.stack(outputs[: order - 1]) if order > 1 else state.history,
                          lower_order_nums=jnp.minimum(state.lower_order_nums + 1, order))
    return prev.astype(sample.dtype), state


def add_noise(config: Any, original: jax.Array, noise: jax.Array, timesteps: jax.typing.ArrayLike,
              state: Any = None) -> jax.Array:
    """α_t·x₀ + σ_t·ε at the σ of each timestep's step in the schedule (absent timesteps: the last step).

    Works for any state with ``timesteps`` and ``sigmas`` (UniPC's too); `config` is unused.
    """
    del config
    if state is None:
        raise ValueError("add_noise needs the state from set_timesteps to map timesteps to sigmas.")
    idx = common.timestep_index(state.timesteps, timesteps)
    sigma = state.sigmas[jnp.where(idx < 0, state.timesteps.shape[0] - 1, idx)]
    alpha = 1 / jnp.sqrt(sigma**2 + 1)
    return common.add_noise_vp(original, noise, alpha, sigma * alpha)


scale_model_input = base.unscaled_model_input  # the model sees the sample as is
init_noise_sigma = base.unit_noise_sigma  # the initial noise is N(0, 1)


def make(config: DPMSolverConfig) -> base.Scheduler:
    """The registry bundle: this module's functions bound to `config`."""
    return base.bundle("dpmpp_2m", config, sys.modules[__name__])
