"""UniPC (Zhao et al. 2023, arXiv:2302.04867) as pure JAX functions, matching diffusers'
``UniPCMultistepScheduler``: a multistep predictor (UniP) and, from the second step on, a corrector (UniC)
that refines the previous prediction with the new model output before predicting again.

Design as in :mod:`perflow_jax.schedulers.dpmpp_2m`: predictor and corrector are linear in the samples and
model outputs with coefficients (including the small ρ linear solves) that depend only on the σ schedule, so
:func:`set_timesteps` precomputes them per step and order in float64, and :func:`step` takes weighted sums.
The state carries fixed-shape history — the last ``solver_order`` converted outputs, the sample the last
prediction started from and that prediction's order — sized by ``set_timesteps(n, sample_shape=...)``.

Kept diffusers behaviour (the contract here):

* The model output of step k is converted with the *uncorrected* sample; the corrector then rewrites the
  sample, which the predictor starts from and the next corrector refers to.
* Order: min(solver_order, lower_order_nums + 1), and with ``lower_order_final`` at most n − k on step k
  (whatever n). The corrector on step k uses the previous prediction's order; ``disable_corrector`` lists
  the step indices k − 1 whose prediction is not corrected.
* Karras σ map back to rounded timesteps; with Karras σ ``final_sigmas_type="sigma_min"`` ends at the last
  Karras σ, otherwise at σ of ᾱ[0].
* ``add_noise`` is DPM-Solver's: the σ of each timestep's step (the last step if absent).
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

from perflow_jax.schedulers import base, common, dpmpp_2m

SOLVER_TYPES = ("bh1", "bh2")


@dataclasses.dataclass(frozen=True)
class UniPCConfig(base.ConfigMixin):
    """diffusers ``UniPCMultistepScheduler`` settings (same names and defaults; ``disable_corrector`` is a
    tuple); options this port does not implement must keep their defaults."""

    class_name = "UniPCMultistepScheduler"

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
    predict_x0: bool = True
    solver_type: str = "bh2"
    lower_order_final: bool = True
    disable_corrector: tuple[int, ...] = ()
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    use_flow_sigmas: bool = False
    flow_shift: float = 1.0
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    final_sigmas_type: str = "zero"
    rescale_betas_zero_snr: bool = False
    use_dynamic_shifting: bool = False
    time_shift_type: str = "exponential"
    sigma_min: float | None = None
    sigma_max: float | None = None
    shift_terminal: float | None = None

    def __post_init__(self) -> None:
        common.check_vp_schedule(self)
        common.freeze_sequence(self, "disable_corrector", int)
        if self.solver_type in ("midpoint", "heun", "logrho"):
            object.__setattr__(self, "solver_type", "bh2")
        common.check_choice("solver_order", self.solver_order, (1, 2, 3))
        common.check_choice("prediction_type", self.prediction_type, common.PREDICTION_TYPES)
        common.check_choice("solver_type", self.solver_type, SOLVER_TYPES)
        common.check_choice("final_sigmas_type", self.final_sigmas_type, common.FINAL_SIGMAS_TYPES)
        common.check_choice("timestep_spacing", self.timestep_spacing, common.TIMESTEP_SPACINGS)
        common.check_non_negative_int("steps_offset", self.steps_offset)
        common.check_thresholding(self)
        common.sigma_spacing(self)
        common.check_unsupported(self, use_flow_sigmas=False, use_dynamic_shifting=False, shift_terminal=None)
        if self.final_sigmas_type == "zero" and (
                not self.predict_x0 or (self.solver_order > 1 and not self.lower_order_final)):
            raise ValueError(
                "With final_sigmas_type='zero' the last step has an infinite log-SNR step, which predict_x0=False "
                "or a multistep last step (lower_order_final=False) turn into inf/NaN (as in diffusers); use "
                "final_sigmas_type='sigma_min' for those."
            )


@struct.dataclass
class UniPCState:
    """The schedule (per-step arrays, n steps) and the multistep history.

    Attributes:
      timesteps: integer model timesteps, exactly diffusers', (n,) int32.
      sigmas: σ at each step and after the last, (n + 1,) float32.
      alpha_t, sigma_t: VP coefficients of each step's σ, for converting model outputs, (n,).
      predictor: (n, solver_order, 1 + solver_order): for step k and c = min(lower_order_nums, order − 1),
        weights of [x, m_k, m_{k−1}, …] (m: converted outputs) in the prediction of x_{k+1}.
      predictor_order: (n, solver_order) int32, the order those weights have.
      corrector: (n, solver_order, 2 + solver_order): for step k and the previous order q (index q − 1),
        weights of [x_{k−1}, m_{k−1}, …, m_{k−order}, m_k] in the corrected x_k.
      corrector_on: (n,) bool, whether step k corrects (k > 0 and k − 1 not in ``disable_corrector``).
      history: (solver_order, *sample_shape) float32, the previous converted outputs, newest first.
      last_sample: (*sample_shape) float32, the sample the previous prediction started from.
      last_order: () int32, that prediction's order.
      lower_order_nums: () int32, the number of steps taken, capped at solver_order.
    """

    timesteps: jax.Array
    sigmas: jax.Array
    alpha_t: jax.Array
    sigma_t: jax.Array
    predictor: jax.Array
    predictor_order: jax.Array
    corrector: jax.Array
    corrector_on: jax.Array
    history: jax.Array
    last_sample: jax.Array
    last_order: jax.Array
    lower_order_nums: jax.Array


def _schedule(config: UniPCConfig, n: int) -> tuple[np.ndarray, np.ndarray]:
    """diffusers' (integer timesteps, σ with the final σ appended) for `n` steps."""
    T = config.num_train_timesteps
    table = common.vp_sigmas(common.diffusers_alphas_cumprod(config, zero_snr_floor=True))
    timesteps = common.spaced_timesteps(config.timestep_spacing, T, n, config.steps_offset, solver_grid=True)
    kind = common.sigma_spacing(config)
    if kind is None:
        sigmas = np.interp(timesteps, np.arange(T), table)
        last = float(table[0])
    else:
        sigmas = common.convert_sigmas(kind, table[::-1], n, config.sigma_min, config.sigma_max)
        timesteps = common.sigma_to_t(sigmas, np.log(table))
        timesteps = timesteps.round() if kind == "karras" else timesteps
        last = float(sigmas[-1])
    last = last if config.final_sigmas_type == "sigma_min" else 0.0
    return timesteps.astype(np.int64), np.append(sigmas, last).astype(np.float32)


def _rhs(config: UniPCConfig, hh: float, size: int) -> tuple[float, float, list[float]]:
    """(h·φ₁, B(h), b): the exponential-integrator terms and the first `size` entries of the ρ system's
    right-hand side, b_i = i!·hφ_{i+1}(h)/B(h)."""
    h_phi_1 = math.expm1(hh)
    b_h = math.expm1(hh) if config.solver_type == "bh2" else hh
    b: list[float] = []
    h_phi_k, factorial = (h_phi_1 / hh - 1 if size else 0.0), 1  # first-order updates never need b (h may be 0)
    for i in range(1, size + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return h_phi_1, b_h, b


def _update(config: UniPCConfig, lam: list[float], alpha: list[float], sigma: list[float], s0: int, t: int,
            others: list[int]) -> tuple[float, float, list[float]]:
    """One UniP/UniC update from step s0 to t as (weight of x_{s0}, weight of m_{s0}, weights of m_s, s in
    `others`).

    The update is x_t = w·x_{s0} − c·hφ₁·m_{s0} − c·B(h)·Σ ρ_s (m_s − m_{s0})/r_s with r_s the log-SNR
    offset of s in units of h. The predictor's `others` are earlier steps; the corrector's also end with t
    itself (r = 1, the new output). A single difference takes ρ = 1/2, more solve the Vandermonde system.
    """
    h = lam[t] - lam[s0]
    if h == 0:  # σ does not move (Karras σ ending at σ_min with final_sigmas_type="sigma_min"): identity
        return 1.0, 0.0, [0.0] * len(others)
    hh = -h if config.predict_x0 else h
    r = [1.0 if s == t else (lam[s] - lam[s0]) / h for s in others]
    h_phi_1, b_h, b = _rhs(config, hh, len(r))
    if len(r) <= 1:
        rhos = [0.5] * len(r)
    else:
        rhos = np.linalg.solve(np.vander(r, increasing=True).T, b).tolist()
    scale = alpha[t] if config.predict_x0 else sigma[t]
    w_x = sigma[t] / sigma[s0] if config.predict_x0 else alpha[t] / alpha[s0]
    w_others = [-scale * b_h * rho / r_s for rho, r_s in zip(rhos, r, strict=True)]
    return w_x, -scale * h_phi_1 - sum(w_others), w_others


def set_timesteps(config: UniPCConfig, num_inference_steps: int, *,
                  sample_shape: tuple[int, ...] | None = None) -> UniPCState:
    """Precompute the schedule and predictor/corrector weights (host-side) and an empty history shaped
    like the samples. `sample_shape` (the latents' shape) sizes the history; without it, ``step`` raises."""
    common.check_num_inference_steps(num_inference_steps, config.num_train_timesteps)
    timesteps, sigmas = _schedule(config, num_inference_steps)
    n, order = timesteps.shape[0], config.solver_order
    alpha, sigma = common.alpha_sigma_from_sigma(sigmas)
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma)  # λ = log(α/σ); +inf at a final σ of 0
    coefs = (lam.tolist(), alpha.tolist(), sigma.tolist())  # Python floats: inf arithmetic without warnings
    predictor = np.zeros((n, order, 1 + order))
    predictor_order = np.zeros((n, order), np.int32)
    corrector = np.zeros((n, order, 2 + order))
    for k in range(n):
        cap = min(order, n - k) if config.lower_order_final else order
        for c in range(order):
            p = min(c + 1, cap, k + 1)
            w_x, w_m0, w_prev = _update(config, *coefs, k, k + 1, list(range(k - 1, k - p, -1)))
            predictor[k, c, : 1 + p] = [w_x, w_m0, *w_prev]
            predictor_order[k, c] = p
            q = c + 1  # the previous prediction's order
            if q <= k:
                w_x, w_m0, w_prev = _update(config, *coefs, k - 1, k, [*range(k - 2, k - 1 - q, -1), k])
                corrector[k, c, : 1 + q] = [w_x, w_m0, *w_prev[:-1]]
                corrector[k, c, -1] = w_prev[-1]
    corrector_on = np.array([k > 0 and k - 1 not in config.disable_corrector for k in range(n)])
    shape = (0,) if sample_shape is None else tuple(sample_shape)
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    return UniPCState(
        timesteps=jnp.asarray(timesteps, jnp.int32),
        sigmas=jnp.asarray(sigmas),
        alpha_t=f32(alpha[:-1]),
        sigma_t=f32(sigma[:-1]),
        predictor=f32(predictor),
        predictor_order=jnp.asarray(predictor_order),
        corrector=f32(corrector),
        corrector_on=jnp.asarray(corrector_on),
        history=jnp.zeros((order, *shape), jnp.float32),
        last_sample=jnp.zeros(shape, jnp.float32),
        last_order=jnp.ones((), jnp.int32),
        lower_order_nums=jnp.zeros((), jnp.int32),
    )


def _convert(config: UniPCConfig, state: UniPCState, model_output: jax.Array, step_index: Any,
             sample: jax.Array) -> jax.Array:
    """The model output as a data prediction x̂₀ (``predict_x0``) or a noise prediction ε̂."""
    alpha, sigma = state.alpha_t[step_index], state.sigma_t[step_index]
    if config.predict_x0:
        x0 = common.predict_x0(config.prediction_type, model_output, sample, alpha, sigma)
        return common.clip_or_threshold(config, x0)
    return common.predict_epsilon(config.prediction_type, model_output, sample, alpha, sigma)


def step(config: UniPCConfig, state: UniPCState, model_output: jax.Array, step_index: Any, sample: jax.Array,
         key: jax.Array | None = None) -> tuple[jax.Array, UniPCState]:
    """Correct the current sample with the new output (UniC), then predict the next one (UniP).

    Returns the next sample (`sample`'s dtype) and the state with updated history; `key` is unused.
    """
    del key
    common.check_same_shape(model_output, sample)
    common.check_step_index(state.timesteps.shape[0], step_index)
    common.check_history(state.history, sample, "UniPC")
    order = config.solver_order
    x = sample.astype(jnp.float32)
    m_t = _convert(config, state, model_output.astype(jnp.float32), step_index, x)
    wc = state.corrector[step_index, state.last_order - 1]
    corrected = wc[0] * state.last_sample + sum(wc[1 + j] * state.history[j] for j in range(order))
    corrected = corrected + wc[-1] * m_t
    x = jnp.where(state.corrector_on[step_index] & (state.lower_order_nums > 0), corrected, x)
    c = jnp.minimum(state.lower_order_nums, order - 1)
    wp = state.predictor[step_index, c]
    outputs = [m_t, *(state.history[j] for j in range(order - 1))]
    prev = wp[0] * x + sum(wp[1 + j] * m for j, m in enumerate(outputs))
    state = state.replace(history=jnp.stack(outputs), last_sample=x,
                          last_order=state.predictor_order[step_index, c],
                          lower_order_nums=jnp.minimum(state.lower_order_nums + 1, order))
    return prev.astype(sample.dtype), state


add_noise = dpmpp_2m.add_noise  # σ of each timestep's step in the schedule, as DPM-Solver++
scale_model_input = base.unscaled_model_input  # the model sees the sample as is
init_noise_sigma = base.unit_noise_sigma  # the initial noise is N(0, 1)


def make(config: UniPCConfig) -> base.Scheduler:
    """The registry bundle: this module's functions bound to `config`."""
    return base.bundle("unipc", config, sys.modules[__name__])
