"""Pieces every scheduler shares: beta schedules, ᾱ tables, config validation and the traced step helpers.

Tables are built once on the host. :func:`diffusers_alphas_cumprod` rebuilds diffusers' (and the PeRFlow
reference's) float32 ᾱ bit for bit; a float64 table would differ from it by up to ~1e-6 relative (1.3e-5
for the cosine schedule), which is why schedulers use the float32 rebuild.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from perflow_jax import values

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def betas_for_alpha_bar(num_steps: int, max_beta: float = 0.999) -> np.ndarray:
    """Glide's cosine schedule: β_i = min(1 − ᾱ(t_{i+1})/ᾱ(t_i), max_beta)."""

    def alpha_bar(t: np.ndarray) -> np.ndarray:
        return np.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    i = np.arange(num_steps, dtype=np.float64)
    betas = 1.0 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps)
    return np.minimum(betas, max_beta)


def make_betas(
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    beta_schedule: str,
    trained_betas: Sequence[float] | None = None,
) -> np.ndarray:
    """The β table (float64) for a diffusers-style beta schedule."""
    if trained_betas is not None:
        betas = np.asarray(trained_betas, dtype=np.float64)
        if betas.shape != (num_train_timesteps,):
            raise ValueError(
                f"trained_betas has {betas.size} values but num_train_timesteps is {num_train_timesteps}; "
                "pass one beta per training timestep."
            )
        return betas
    if beta_schedule == "linear":
        return np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)
    if beta_schedule == "scaled_linear":
        return np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        return betas_for_alpha_bar(num_train_timesteps)
    raise ValueError(f"Unknown beta_schedule {beta_schedule!r}; expected one of {BETA_SCHEDULES}.")


def alphas_cumprod(betas: np.ndarray) -> np.ndarray:
    """ᾱ_t = ∏_{s≤t} (1 − β_s), float64."""
    return np.cumprod(1.0 - betas)


def broadcast_to_sample(coef: jnp.ndarray, sample: jnp.ndarray) -> jnp.ndarray:
    """Right-pad a per-sample (or scalar) coefficient with singleton axes so it broadcasts over `sample`."""
    coef = jnp.asarray(coef)
    return coef.reshape(coef.shape + (1,) * (sample.ndim - coef.ndim))


# ----------------------------------------------------------------------------------------------------------
# Validation for every scheduler's frozen Config dataclass (``__post_init__``).
# ----------------------------------------------------------------------------------------------------------


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ValueError(f"Unknown {name} {value!r}; expected one of {tuple(choices)}.")


def check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def check_beta_config(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str,
                      trained_betas: Sequence[float] | None) -> None:
    """Validate the beta fields every DDPM-family config has."""
    check_positive_int("num_train_timesteps", num_train_timesteps)
    if trained_betas is None:
        check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
        beta_start = values.check_float("beta_start", beta_start)
        beta_end = values.check_float("beta_end", beta_end)
        if not (0.0 < beta_start < 1.0 and 0.0 < beta_end < 1.0):
            raise ValueError(f"beta_start and beta_end must lie in (0, 1), got {beta_start} and {beta_end}.")
        if beta_schedule != "squaredcos_cap_v2" and beta_start > beta_end:
            raise ValueError(f"beta_start={beta_start} exceeds beta_end={beta_end}: noise must grow with the "
                             "timestep (swap them?).")
    else:
        try:
            b = np.asarray(trained_betas, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise ValueError(f"trained_betas must be {num_train_timesteps} numbers in (0, 1): {e}") from e
        if b.shape != (num_train_timesteps,) or not np.all((b > 0) & (b < 1)):
            raise ValueError(
                f"trained_betas must be {num_train_timesteps} values in (0, 1); got shape {b.shape}."
            )


def check_vp_schedule(cfg: Any) -> None:
    """In a VP config's ``__post_init__``: freeze ``trained_betas`` (a list from JSON) into a hashable tuple
    of floats and validate the beta fields (``num_train_timesteps``, ``beta_*``, ``trained_betas``)."""
    try:
        freeze_sequence(cfg, "trained_betas")
    except (TypeError, ValueError) as e:
        raise ValueError(f"trained_betas must be a list of numbers or null, got {cfg.trained_betas!r:.80}.") from e
    check_beta_config(cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end, cfg.beta_schedule, cfg.trained_betas)
    check_float_fields(cfg)


def check_float_fields(cfg: Any) -> None:
    """Every ``float`` field of a config dataclass must hold a real number that is not NaN; ±inf only where the
    field's default is infinite (diffusers' "no limit", e.g. ``s_tmax``, ``lambda_min_clipped``). ``None`` is
    allowed where the field is ``float | None``. A value from a JSON file ("0.1", null, NaN) is refused here."""
    for f in dataclasses.fields(cfg):
        kind = str(f.type).replace(" ", "")
        if kind not in ("float", "float|None"):
            continue
        value = getattr(cfg, f.name)
        if value is None and kind == "float|None":
            continue
        default_inf = isinstance(f.default, float) and math.isinf(f.default)
        values.check_float(f"{type(cfg).__name__}.{f.name}", value, allow_inf=default_inf)


def freeze_sequence(cfg: Any, name: str, cast: Callable[[Any], Any] = float) -> None:
    """In a frozen dataclass's ``__post_init__``: turn a list field (from JSON) into a hashable tuple."""
    value = getattr(cfg, name)
    if value is not None and not isinstance(value, tuple):
        object.__setattr__(cfg, name, tuple(cast(v) for v in value))


def check_thresholding(cfg: Any) -> None:
    """Validate the clip_sample / thresholding fields where a config has them."""
    if getattr(cfg, "thresholding", False):
        if not 0.0 < cfg.dynamic_thresholding_ratio < 1.0:
            raise ValueError(
                f"dynamic_thresholding_ratio must lie in (0, 1), got {cfg.dynamic_thresholding_ratio}.")
        if cfg.sample_max_value < 1.0:
            raise ValueError(f"sample_max_value must be >= 1, got {cfg.sample_max_value}.")
    if getattr(cfg, "clip_sample", False) and cfg.clip_sample_range <= 0:
        raise ValueError(f"clip_sample_range must be positive, got {cfg.clip_sample_range}.")


def check_non_negative_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}.")


def check_unsupported(cfg: Any, **unsupported: Any) -> None:
    """Reject diffusers options this port does not implement: ``field=default`` pairs that must hold."""
    for name, default in unsupported.items():
        value = getattr(cfg, name)
        if value != default:
            raise ValueError(
                f"{type(cfg).__name__}: {name}={value!r} is not supported by this JAX port "
                f"(only {name}={default!r})."
            )


def check_num_inference_steps(num_inference_steps: Any, num_train_timesteps: int) -> int:
    num_inference_steps = values.check_int("num_inference_steps", num_inference_steps)
    if not 0 < num_inference_steps <= num_train_timesteps:
        raise ValueError(
            f"num_inference_steps must lie in [1, num_train_timesteps={num_train_timesteps}], "
            f"got {num_inference_steps}."
        )
    return int(num_inference_steps)


# ----------------------------------------------------------------------------------------------------------
# The diffusers scheduler family (DDIM, DDPM, Euler, Euler ancestral, DPM-Solver++, UniPC, LCM).
#
# diffusers builds its tables in float32 PyTorch. Where a table feeds trajectories whose values reach
# σ_max ≈ 15 (Euler) or 1/α ≈ 15 (x0 predictions), the float64 ᾱ above differs from diffusers' by up to
# 1e-6 relative, which is visible at float32 scale; so the family rebuilds diffusers' float32 rounding
# exactly (β and α = 1 − β rounded to float32, the product accumulated in float64 as PyTorch's CPU
# cumprod does). Everything after ᾱ is computed in float64 NumPy and stored as float32.
# ----------------------------------------------------------------------------------------------------------

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")


def _torch_linspace_f32(start: float, end: float, num: int) -> np.ndarray:
    """``torch.linspace(start, end, num, dtype=float32)`` bit for bit: float32 step, fused multiply-add,
    the first half counted up from `start` and the second half down from `end`."""
    s, e = np.float32(start), np.float32(end)
    if num == 1:
        return np.array([s], np.float32)
    step = np.float64(np.float32((e - s) / np.float32(num - 1)))
    i = np.arange(num, dtype=np.float64)
    up = np.float64(s) + step * i
    down = np.float64(e) - step * (num - 1 - i)
    return np.where(i < num // 2, up, down).astype(np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """β rescaled so the last timestep has zero SNR (Lin et al. 2023, arXiv:2305.08891, Algorithm 1).

    Float32 arithmetic step for step as diffusers (the cumulative product accumulated in float64)."""
    one = np.float32(1.0)
    ac = np.cumprod((one - np.asarray(betas, np.float32)).astype(np.float64)).astype(np.float32)
    sqrt_ac = np.sqrt(ac)
    first, last = sqrt_ac[0], sqrt_ac[-1]
    sqrt_ac = (sqrt_ac - last) * (first / (first - last))
    ac = sqrt_ac**2
    alphas = np.concatenate([ac[:1], ac[1:] / ac[:-1]])
    return one - alphas


def diffusers_alphas_cumprod(cfg: Any, *, zero_snr_floor: bool = False) -> np.ndarray:
    """ᾱ (float32) exactly as diffusers builds it from `cfg`'s beta fields.

    `zero_snr_floor`: with ``rescale_betas_zero_snr`` the σ-based schedulers (Euler, DPM-Solver, UniPC) set
    the last ᾱ to 2⁻²⁴ so σ_max stays finite; DDIM, DDPM and LCM keep the exact 0.
    """
    return _diffusers_alphas_cumprod(cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end, cfg.beta_schedule,
                                     cfg.trained_betas, getattr(cfg, "rescale_betas_zero_snr", False),
                                     zero_snr_floor)


@functools.lru_cache(maxsize=64)
def _diffusers_alphas_cumprod(num_train_timesteps: int, beta_start: float, beta_end: float,
                              beta_schedule: str, trained_betas: tuple[float, ...] | None, rescale: bool,
                              floor: bool) -> np.ndarray:
    if trained_betas is not None:
        betas = np.asarray(trained_betas, np.float32)
    elif beta_schedule == "linear":
        betas = _torch_linspace_f32(beta_start, beta_end, num_train_timesteps)
    elif beta_schedule == "scaled_linear":
        betas = _torch_linspace_f32(beta_start**0.5, beta_end**0.5, num_train_timesteps) ** 2
    else:
        betas = make_betas(num_train_timesteps, beta_start, beta_end, beta_schedule).astype(np.float32)
    if rescale:
        betas = rescale_zero_terminal_snr(betas).astype(np.float32)
    alphas = np.float32(1.0) - betas.astype(np.float32)
    ac = np.cumprod(alphas.astype(np.float64)).astype(np.float32)
    if rescale and floor:
        ac[-1] = np.float32(2.0**-24)
    ac.setflags(write=False)
    return ac


def vp_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """σ_t = sqrt((1 − ᾱ_t)/ᾱ_t) per training timestep, in float32 arithmetic like diffusers."""
    ac = np.asarray(alphas_cumprod, np.float32)
    return np.sqrt((np.float32(1.0) - ac) / ac)


def spaced_timesteps(spacing: str, num_train_timesteps: int, num_inference_steps: int, steps_offset: int = 0,
                     *, round_linspace: bool = True, solver_grid: bool = False,
                     last_timestep: int | None = None) -> np.ndarray:
    """Descending inference timesteps (float64) for diffusers' ``timestep_spacing``.

    The three spacings are those of arXiv:2305.08891, Table 2.

    Args:
      round_linspace: round "linspace" points to integers (Euler keeps them fractional).
      solver_grid: the multistep solvers' grid (DPM-Solver, UniPC): n + 1 "linspace"/"leading" points
        with the final one (t = 0) dropped.
      last_timestep: the top of the range for the solver grid (DPM-Solver's ``lambda_min_clipped``).
    """
    T, n = num_train_timesteps, num_inference_steps
    top = T if last_timestep is None else last_timestep
    m = n + 1 if solver_grid else n
    if spacing == "linspace":
        t = np.linspace(0, top - 1, m)
        t = (t.round() if round_linspace else t)[::-1]
    elif spacing == "leading":
        t = (np.arange(m) * (top // m)).astype(np.float64)[::-1] + steps_offset
    elif spacing == "trailing":
        return np.round(np.arange(top, 0, -T / n)) - 1.0
    else:
        raise ValueError(f"Unknown timestep_spacing {spacing!r}; expected one of {TIMESTEP_SPACINGS}.")
    return t[:-1] if solver_grid else t


def karras_sigmas(sigma_min: float, sigma_max: float, num: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) σ schedule: ρ-th-root spacing from σ_max down to σ_min (float64)."""
    ramp = np.linspace(0, 1, num)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, num: int) -> np.ndarray:
    """σ spaced evenly in log σ from σ_max down to σ_min (float64)."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), num))


def beta_sigmas(sigma_min: float, sigma_max: float, num: int, alpha: float = 0.6, beta: float = 0.6
                ) -> np.ndarray:
    """σ at the Beta(0.6, 0.6) quantiles from σ_max down to σ_min (arXiv:2407.12173), float64."""
    import scipy.stats

    ppf = scipy.stats.beta.ppf(1 - np.linspace(0, 1, num), alpha, beta)
    return sigma_min + ppf * (sigma_max - sigma_min)


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each σ by linear interpolation in log σ (diffusers' ``_sigma_to_t``).

    `log_sigmas` is the ascending log σ table per training timestep; σ outside the table clamps to its ends.
    """
    log_sigma = np.log(np.maximum(np.asarray(sigmas, np.float64), 1e-10))
    count = np.sum(log_sigmas[:, None] <= log_sigma[None, :], axis=0)
    low_idx = np.clip(count - 1, 0, log_sigmas.shape[0] - 2)
    low, high = log_sigmas[low_idx], log_sigmas[low_idx + 1]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return (1 - w) * low_idx + w * (low_idx + 1)


def convert_sigmas(kind: str, sigmas: np.ndarray, num: int, sigma_min: float | None = None,
                   sigma_max: float | None = None) -> np.ndarray:
    """Re-space a descending σ array as ``"karras"``, ``"exponential"`` or ``"beta"`` sigmas (float64).

    The range defaults to the ends of `sigmas`; a config's ``sigma_min``/``sigma_max`` override it.
    """
    lo = float(sigmas[-1]) if sigma_min is None else sigma_min
    hi = float(sigmas[0]) if sigma_max is None else sigma_max
    make = {"karras": karras_sigmas, "exponential": exponential_sigmas, "beta": beta_sigmas}[kind]
    return make(lo, hi, num)


def sigma_spacing(cfg: Any) -> str | None:
    """Which of use_karras_sigmas / use_exponential_sigmas / use_beta_sigmas a config sets (at most one)."""
    kinds = [k for k in ("karras", "exponential", "beta") if getattr(cfg, f"use_{k}_sigmas", False)]
    if len(kinds) > 1:
        raise ValueError(
            "Only one of use_karras_sigmas, use_exponential_sigmas and use_beta_sigmas can be set.")
    return kinds[0] if kinds else None


def alpha_sigma_from_sigma(sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """VP coefficients (α_t, σ_t) of a VE σ: α_t = 1/sqrt(σ² + 1), σ_t = σ·α_t (float64)."""
    alpha = 1.0 / np.sqrt(np.asarray(sigma, np.float64) ** 2 + 1.0)
    return alpha, np.asarray(sigma, np.float64) * alpha


# ----------------------------------------------------------------------------------------------------------
# Traced helpers for ``step`` (float32; coefficients are scalars or per-sample).
# ----------------------------------------------------------------------------------------------------------


def predict_x0(prediction_type: str, model_output: jax.Array, sample: jax.Array, alpha: jax.Array,
               sigma: jax.Array) -> jax.Array:
    """x̂₀ from a model output, for x_t = α·x₀ + σ·ε (VP form)."""
    if prediction_type == "epsilon":
        return (sample - sigma * model_output) / alpha
    if prediction_type == "v_prediction":
        return alpha * sample - sigma * model_output
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"Unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}.")


def predict_epsilon(prediction_type: str, model_output: jax.Array, sample: jax.Array, alpha: jax.Array,
                    sigma: jax.Array) -> jax.Array:
    """ε̂ from a model output, for x_t = α·x₀ + σ·ε (VP form)."""
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return alpha * model_output + sigma * sample
    if prediction_type == "sample":
        return (sample - alpha * model_output) / sigma
    raise ValueError(f"Unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}.")


def predict_x0_ve(prediction_type: str, model_output: jax.Array, sample: jax.Array, sigma: jax.Array,
                  sigma_hat: jax.Array | None = None) -> jax.Array:
    """x̂₀ for the VE form x = x₀ + σ·ε used by the Euler samplers (`sample` is the unscaled x).

    `sigma_hat` (the churned σ) replaces σ in the ε formula, as in diffusers.
    """
    if prediction_type == "epsilon":
        return sample - (sigma if sigma_hat is None else sigma_hat) * model_output
    if prediction_type == "v_prediction":
        return model_output * (-sigma / jnp.sqrt(sigma**2 + 1)) + sample / (sigma**2 + 1)
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"Unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}.")


def threshold_sample(x0: jax.Array, ratio: float, max_value: float) -> jax.Array:
    """Dynamic thresholding (Imagen, arXiv:2205.11487): per sample, s = clip(quantile(|x̂₀|, ratio), 1, max);
    x̂₀ is clipped to [−s, s] and divided by s."""
    flat = x0.reshape(x0.shape[0], -1)
    s = jnp.clip(jnp.quantile(jnp.abs(flat), ratio, axis=1, keepdims=True), 1.0, max_value)
    return (jnp.clip(flat, -s, s) / s).reshape(x0.shape)


def clip_or_threshold(cfg: Any, x0: jax.Array) -> jax.Array:
    """Apply a config's ``thresholding`` (first) or ``clip_sample`` to x̂₀, as diffusers does."""
    if getattr(cfg, "thresholding", False):
        return threshold_sample(x0, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
    if getattr(cfg, "clip_sample", False):
        return jnp.clip(x0, -cfg.clip_sample_range, cfg.clip_sample_range)
    return x0


def step_noise(key: jax.Array | None, shape: tuple[int, ...], scheduler: str) -> jax.Array:
    """The standard-normal noise a stochastic step injects: ``jax.random.normal(key, shape, float32)``."""
    if key is None:
        raise ValueError(
            f"The {scheduler} step injects fresh noise and needs a PRNG key: pass key= to step "
            "(sampling.sample(..., key=...) splits one per step)."
        )
    return jax.random.normal(key, shape, jnp.float32)


def is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_same_shape(model_output: jax.Array, sample: jax.Array) -> None:
    if model_output.shape != sample.shape:
        raise ValueError(
            f"model_output has shape {model_output.shape} but sample has shape {sample.shape}; "
            "the model must predict one value per sample element."
        )


def check_step_index(num_steps: int, step_index: Any) -> None:
    """Range-check a concrete step index (a traced one is used as is)."""
    if is_concrete(step_index):
        i = int(np.asarray(step_index))
        if not 0 <= i < num_steps:
            raise IndexError(f"step_index {i} is outside 0..{num_steps - 1} for a {num_steps}-step schedule.")


def check_history(history: jax.Array, sample: jax.Array, scheduler: str) -> None:
    """Multistep history must be shaped like the sample; ``set_timesteps(sample_shape=)`` builds it."""
    if history.shape[1:] != sample.shape:
        raise ValueError(
            f"The {scheduler} state keeps previous model outputs shaped like the sample, but its history has "
            f"sample shape {history.shape[1:]} and the sample is {sample.shape}: build the state with "
            "set_timesteps(num_inference_steps, sample_shape=latents.shape)."
        )


def train_alphas_cumprod(alphas_cumprod: jax.Array, timesteps: jax.typing.ArrayLike,
                         num_train_timesteps: int) -> jax.Array:
    """ᾱ[t] at integer training timesteps (zero-based, scalar or per sample), range-checked when concrete."""
    t = jnp.asarray(timesteps)
    if is_concrete(t):
        ts = np.asarray(t)
        if ts.size and (ts.min() < 0 or ts.max() >= num_train_timesteps):
            raise ValueError(
                f"add_noise takes integer timesteps in [0, {num_train_timesteps - 1}]; got values in "
                f"[{ts.min()}, {ts.max()}]."
            )
    return alphas_cumprod[t.astype(jnp.int32)]


def timestep_index(schedule: jax.Array, timesteps: jax.typing.ArrayLike) -> jax.Array:
    """Index of each timestep in `schedule` as diffusers' ``index_for_timestep`` picks it: the second
    match when a timestep repeats, the only match otherwise, −1 when absent. Shape of `timesteps`."""
    t = jnp.asarray(timesteps, schedule.dtype)
    match = schedule == t.reshape(-1, 1)
    positions = jnp.arange(schedule.shape[0])
    first = jnp.argmax(match, axis=1)
    second = jnp.argmax(match & (positions > first[:, None]), axis=1)
    count = match.sum(axis=1)
    idx = jnp.where(count > 1, second, jnp.where(count == 1, first, -1))
    return idx.reshape(t.shape)


def add_noise_discrete(cfg: Any, original: jax.Array, noise: jax.Array, timesteps: jax.typing.ArrayLike) -> jax.Array:
    """diffusers' DDPM-family ``add_noise``: sqrt(ᾱ_t)·x₀ + sqrt(1 − ᾱ_t)·ε at zero-based integer timesteps."""
    ac = train_alphas_cumprod(jnp.asarray(diffusers_alphas_cumprod(cfg)), timesteps, cfg.num_train_timesteps)
    return add_noise_vp(original, noise, jnp.sqrt(ac), jnp.sqrt(1 - ac))


def add_noise_vp(original: jax.Array, noise: jax.Array, alpha: jax.Array, sigma: jax.Array) -> jax.Array:
    """α·x₀ + σ·ε in float32 with per-sample (or scalar) α, σ; returned in `original`'s dtype."""
    check_same_shape(noise, original)
    alpha = broadcast_to_sample(jnp.asarray(alpha, jnp.float32).reshape(-1) if jnp.ndim(alpha) else alpha,
                                original)
    sigma = broadcast_to_sample(jnp.asarray(sigma, jnp.float32).reshape(-1) if jnp.ndim(sigma) else sigma,
                                original)
    noisy = alpha * original.astype(jnp.float32) + sigma * noise.astype(jnp.float32)
    return noisy.astype(original.dtype)
