"""The PeRFlow scheduler (piecewise rectified flow) as pure JAX functions.

PeRFlow splits the time axis [t_clean, t_noise] into K windows and treats the model as a velocity field that
is straight inside each window: from t_c the sample moves along ``v`` to the next time point. For the
ε-parameterised models the velocity comes from the predicted window end
``x_e = λ_t·x_t + η_t·ε`` as ``v = (x_e − x_t)/(t_e − t_c)``.

Numerics follow the PyTorch reference (magic-research/piecewise-rectified-flow, ``src/scheduler_perflow.py``)
exactly, including its quirks, which are the contract here:

* **Windows.** Window starts are ``i/K`` for i = K..1 and the ends are the next start and ``t_clean``
  last. The reference ignores ``t_noise`` here, so ``t_noise`` must be 1.0 (other values are rejected
  rather than silently ignored).
* **Timesteps.** Steps are spread over windows with the extra ``n mod K`` steps going to the noisiest
  windows; inside a window ``np.linspace(t_s, t_e, m, endpoint=False)`` in float64, then ``t·T`` is
  truncated to an integer. ``num_inference_steps < K`` is raised to K with a warning.
* **Window lookup.** A time point belongs to the first window whose end is below ``t − 0.1/T`` (so a
  point exactly on a window start belongs to the window that starts there), compared in float32.
  The reference fails with an IndexError at exactly ``t_clean``; here ``t_clean`` maps to the last window.
* **ᾱ at the bounds.** ᾱ_s = ᾱ[trunc(t_s·T − 1)] and ᾱ_e = ᾱ[max(trunc(t_e·T − 1), 0)], so the last window
  ends at ᾱ[0], not at 1.
* **dt** is (next timestep − timestep)/T, and (0 − timestep)/T after the last step.
* **add_noise** indexes ᾱ one-based: ᾱ[t − 1] for integer t in [1, T].

ᾱ is the reference's own float32 table (bit-for-bit); all math is float32 whatever the sample dtype, and
outputs come back in the sample's dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from perflow_jax import values
from perflow_jax.schedulers import base, common

PREDICTION_TYPES = ("ddim_eps", "diff_eps", "velocity")
# The reference's name for diff_eps before it was renamed (same formula); its model card and demos still pass it.
PREDICTION_TYPE_ALIASES = {"epsilon": "diff_eps"}


@dataclasses.dataclass(frozen=True)
class PeRFlowConfig(base.ConfigMixin):
    """PeRFlow settings, field for field the reference ``PeRFlowScheduler``'s (same defaults)."""

    class_name = "PeRFlowScheduler"

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    trained_betas: tuple[float, ...] | None = None
    set_alpha_to_one: bool = False
    prediction_type: str = "ddim_eps"
    t_noise: float = 1.0
    t_clean: float = 0.0
    num_time_windows: int = 4

    def __post_init__(self) -> None:
        common.check_vp_schedule(self)
        if isinstance(self.prediction_type, str) and self.prediction_type in PREDICTION_TYPE_ALIASES:
            new = PREDICTION_TYPE_ALIASES[self.prediction_type]
            warnings.warn(f"PeRFlow prediction_type={self.prediction_type!r} is the reference's old name for "
                          f"{new!r} (same formula); using {new!r}.", stacklevel=3)
            object.__setattr__(self, "prediction_type", new)
        common.check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        common.check_positive_int("num_time_windows", self.num_time_windows)
        if self.t_noise != 1.0:
            raise ValueError(
                f"t_noise={self.t_noise} is not supported: the reference PeRFlow scheduler builds its windows "
                "from i/K and ignores t_noise, so any value but 1.0 would silently not mean what it says."
            )
        if not 0.0 <= self.t_clean < self.t_noise:
            raise ValueError(f"Need 0 <= t_clean < t_noise, got t_clean={self.t_clean}, t_noise={self.t_noise}.")
        if self.t_clean >= 1.0 / self.num_time_windows:
            raise ValueError(
                f"t_clean={self.t_clean} must lie below the last window start 1/K = {1 / self.num_time_windows}."
            )
        if max_inference_steps(self) < self.num_time_windows:
            raise ValueError(
                f"num_time_windows={self.num_time_windows} is too many for num_train_timesteps="
                f"{self.num_train_timesteps} and t_clean={self.t_clean}: even one step per window puts a time "
                "point at or below t_clean, where PeRFlow's velocity divides by zero."
            )

    @property
    def window_starts(self) -> tuple[float, ...]:
        k = self.num_time_windows
        return tuple(1.0 * i / k for i in range(k, 0, -1))

    @property
    def window_ends(self) -> tuple[float, ...]:
        return self.window_starts[1:] + (float(self.t_clean),)


def _alphas_cumprod(config: PeRFlowConfig) -> np.ndarray:
    """ᾱ bit-for-bit as the reference builds it (float32 torch betas, cumprod accumulated in double)."""
    return common.diffusers_alphas_cumprod(config)


@functools.lru_cache(maxsize=64)
def _noise_tables(config: PeRFlowConfig) -> tuple[np.ndarray, np.ndarray]:
    """sqrt(ᾱ) and sqrt(1 − ᾱ) of the float32 ᾱ, evaluated in float64 and rounded once."""
    ac = _alphas_cumprod(config).astype(np.float64)
    return np.sqrt(ac).astype(np.float32), np.sqrt(1.0 - ac).astype(np.float32)


@struct.dataclass
class PeRFlowState:
    """Precomputed per-step arrays for one ``num_inference_steps`` (all shape (n,) but ``alphas_cumprod``).

    Attributes:
      alphas_cumprod: ᾱ table, (T,) float32.
      timesteps: integer model timesteps, exactly the reference's, (n,) int32.
      timepoints: t_c = timestep / T (float32).
      next_timepoints: the next step's time point, 0 after the last.
      dt: (next timestep − timestep) / T (negative: time runs from noise to clean).
      window_start, window_end: t_s and t_e of each step's window.
      lambda_t, eta_t: window coefficients with predicted window end x_e = λ_t·x + η_t·ε.
    """

    alphas_cumprod: jax.Array
    timesteps: jax.Array
    timepoints: jax.Array
    next_timepoints: jax.Array
    dt: jax.Array
    window_start: jax.Array
    window_end: jax.Array
    lambda_t: jax.Array
    eta_t: jax.Array

    @property
    def num_inference_steps(self) -> int:
        return int(self.timesteps.shape[0])


class Window(NamedTuple):
    """A time point's window: bounds, ᾱ at the bounds and γ = sqrt(ᾱ_s / ᾱ_e) (arrays shaped like t)."""

    start: jax.Array
    end: jax.Array
    alpha_cumprod_start: jax.Array
    alpha_cumprod_end: jax.Array
    gamma: jax.Array


# ----------------------------------------------------------------------------------------------------------
# Windows
# ----------------------------------------------------------------------------------------------------------


def window_bounds(config: PeRFlowConfig, t: jax.typing.ArrayLike) -> tuple[jax.Array, jax.Array]:
    """(t_s, t_e) of the window holding each time point in `t` (any shape, float32, vectorised).

    Time points outside [t_clean, t_noise] raise ValueError when `t` is concrete; under ``jit`` they
    give NaN bounds.
    """
    if common.is_concrete(t):
        _check_in_range(config, np.asarray(t, np.float32))
    t = jnp.asarray(t, jnp.float32)
    tol = np.float32(0.1 / config.num_train_timesteps)
    in_range = (t >= np.float32(config.t_clean)) & (t <= np.float32(config.t_noise) + tol)
    starts = jnp.asarray(config.window_starts, jnp.float32)
    ends = jnp.asarray(config.window_ends, jnp.float32)
    # Ends decrease, so the reference's `while t - tol <= ends[idx]: idx += 1` stops at this count.
    idx = jnp.sum((t[..., None] - tol) <= ends, axis=-1)
    idx = jnp.minimum(idx, config.num_time_windows - 1)
    nan = jnp.float32(jnp.nan)
    return jnp.where(in_range, starts[idx], nan), jnp.where(in_range, ends[idx], nan)


def _check_in_range(config: PeRFlowConfig, t: np.ndarray) -> None:
    """ValueError naming the time points outside [t_clean, t_noise] (NumPy: no device programs)."""
    tol = np.float32(0.1 / config.num_train_timesteps)
    in_range = (t >= np.float32(config.t_clean)) & (t <= np.float32(config.t_noise) + tol)
    if not in_range.all():
        raise ValueError(
            f"Time points must lie in [t_clean, t_noise] = [{config.t_clean}, {config.t_noise}]; "
            f"got {t[~in_range][:8].tolist()}."
        )


def window_alpha(config: PeRFlowConfig, t: jax.typing.ArrayLike) -> Window:
    """The window of each time point with ᾱ at its bounds (the reference's ``get_window_alpha``)."""
    t_s, t_e = window_bounds(config, t)
    ac = jnp.asarray(_alphas_cumprod(config))
    n_train = np.float32(config.num_train_timesteps)
    last = config.num_train_timesteps - 1
    idx_s = jnp.clip(jnp.trunc(t_s * n_train - 1), 0, last).astype(jnp.int32)
    idx_e = jnp.clip(jnp.trunc(t_e * n_train - 1), 0, last).astype(jnp.int32)
    ac_s, ac_e = ac[idx_s], ac[idx_e]
    return Window(t_s, t_e, ac_s, ac_e, jnp.sqrt(ac_s / ac_e))


def window_end_coefficients(config: PeRFlowConfig, t: jax.typing.ArrayLike) -> tuple[jax.Array, jax.Array]:
    """(λ_t, η_t) with the predicted window end x_e = λ_t·x_t + η_t·ε, for the ε prediction types.

    At t = t_s they are the window's (λ_s, η_s); training targets use them as ε = (x_e − λ_s·x_s)/η_s.
    """
    if config.prediction_type == "velocity":
        raise ValueError("window_end_coefficients is defined for ddim_eps and diff_eps, not velocity.")
    t_c = jnp.asarray(t, jnp.float32)
    w = window_alpha(config, t_c)
    if config.prediction_type == "ddim_eps":
        lambda_s = jnp.sqrt(w.alpha_cumprod_end / w.alpha_cumprod_start)
        eta_s = jnp.sqrt(1 - w.alpha_cumprod_end) - jnp.sqrt(
            w.alpha_cumprod_end / w.alpha_cumprod_start * (1 - w.alpha_cumprod_start))
    else:  # diff_eps
        lambda_s = 1 / w.gamma
        eta_s = -jnp.sqrt(1 - w.gamma**2) / w.gamma
    denom = lambda_s * (t_c - w.start) + (w.end - t_c)
    return lambda_s * (w.end - w.start) / denom, eta_s * (w.end - t_c) / denom


def _velocity(prediction_type: str, model_output: jax.Array, sample: jax.Array, t_c: jax.Array,
              t_s: jax.Array, t_e: jax.Array, lambda_t: jax.Array, eta_t: jax.Array) -> jax.Array:
    """Velocity from a model output, all float32; coefficients already broadcast to the sample."""
    if prediction_type == "velocity":
        return model_output
    pred_window_end = lambda_t * sample + eta_t * model_output
    return (pred_window_end - sample) / (t_e - (t_s + (t_c - t_s)))


def model_output_to_velocity(config: PeRFlowConfig, model_output: jax.Array, sample: jax.Array,
                             t: jax.typing.ArrayLike) -> jax.Array:
    """Velocity of the straight window path, for each sample at its own time point `t` (scalar or (B,)).

    Float32 math; returns float32. Training and previews use this; ``step`` uses the same formula with
    precomputed coefficients.
    """
    common.check_same_shape(model_output, sample)
    t_c = jnp.asarray(t, jnp.float32)
    x = sample.astype(jnp.float32)
    out = model_output.astype(jnp.float32)
    if config.prediction_type == "velocity":
        return out
    t_s, t_e = window_bounds(config, t_c)
    lam, eta = window_end_coefficients(config, t_c)
    b = functools.partial(common.broadcast_to_sample, sample=x)
    return _velocity(config.prediction_type, out, x, b(t_c), b(t_s), b(t_e), b(lam), b(eta))


# ----------------------------------------------------------------------------------------------------------
# Timesteps and stepping
# ----------------------------------------------------------------------------------------------------------


def reference_timesteps(config: PeRFlowConfig, num_inference_steps: int) -> np.ndarray:
    """The reference's integer timesteps (int64 NumPy) for `num_inference_steps`."""
    num_inference_steps = values.check_int("num_inference_steps", num_inference_steps, min_value=1)
    k = config.num_time_windows
    if num_inference_steps < k:
        warnings.warn(
            f"num_inference_steps={num_inference_steps} is below num_time_windows={k}; using {k} steps "
            "(one per window), as the reference does.",
            stacklevel=3,
        )
        num_inference_steps = k
    per_window = [num_inference_steps // k + (1 if i < num_inference_steps % k else 0) for i in range(k)]
    points = np.concatenate([
        np.linspace(s, e, num=m, endpoint=False)
        for s, e, m in zip(config.window_starts, config.window_ends, per_window, strict=True)
    ])
    return (points * config.num_train_timesteps).astype(np.int64)


def _bad_timepoints(config: PeRFlowConfig, timesteps: np.ndarray) -> np.ndarray:
    """Which timesteps give a time point at or below t_clean (float32, as ``set_timesteps`` computes them).

    There the window is the last one and t_c ≤ t_e, so the velocity (x_e − x)/(t_e − t_c) divides by zero
    (timestep 0 with t_clean = 0) or the point lies outside [t_clean, t_noise]. Every other time point lies
    strictly inside its window; repeated timesteps (more steps than integer timesteps in a window) are harmless
    no-op steps (dt = 0), as in the reference.
    """
    points = np.asarray(timesteps).astype(np.float32) / np.float32(config.num_train_timesteps)
    return points <= np.float32(config.t_clean)


def _window_ok(config: PeRFlowConfig, window: int, m: int) -> bool:
    """Whether `m` steps in `window` (the reference's linspace and truncation) keep every time point valid."""
    s, e = config.window_starts[window], config.window_ends[window]
    points = np.linspace(s, e, num=m, endpoint=False)
    return not _bad_timepoints(config, (points * config.num_train_timesteps).astype(np.int64)).any()


_SEARCH_CAP = 2**22  # steps per window beyond which no limit is looked for (a schedule that long is never useful)


def _window_limit(config: PeRFlowConfig, window: int) -> int:
    """The most steps `window` can hold (0 if not even one; ``_SEARCH_CAP`` if at least that many)."""
    t_end = config.window_ends[window]
    # Points lie at or above the window end, so truncation loses less than one timestep (plus rounding).
    if np.floor(t_end * config.num_train_timesteps) - 1 >= config.t_clean * config.num_train_timesteps + 1:
        return _SEARCH_CAP
    if not _window_ok(config, window, 1):
        return 0
    lo, hi = 1, 2  # invariant: lo is ok; find a bad hi by doubling, then bisect
    while _window_ok(config, window, hi):
        lo, hi = hi, hi * 2
        if hi > _SEARCH_CAP:
            return _SEARCH_CAP
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _window_ok(config, window, mid) else (lo, mid)
    return lo


@functools.lru_cache(maxsize=64)
def max_inference_steps(config: PeRFlowConfig) -> int:
    """The largest ``num_inference_steps`` whose reference timesteps all lie strictly above t_clean.

    With more steps, a window holds more points than it has integer timesteps and the last window's last
    point truncates to timestep 0 (t_clean = 0), where the velocity divides by zero. With n steps the last
    window gets ⌊n/K⌋ points and the first ``n mod K`` windows one more, so the limit is K·m + r with m the
    fewest points any window can hold and r the leading windows that hold one more. For t_clean = 0 and
    K ≤ T that is K·⌊T/K⌋ + K − 1 up to the float64 rounding of the reference's linspace, which is computed
    exactly here (T = 1000: 1000 for K = 1, 1003 for K = 4). Returns 0 if not even one step per window works.
    """
    k = config.num_time_windows
    limits = [_window_limit(config, w) for w in range(k)]
    m = min(limits)
    if m == 0:
        return 0
    r = 0
    while r < k - 1 and limits[r] > m:
        r += 1
    return k * m + r


def check_num_inference_steps(config: PeRFlowConfig, num_inference_steps: Any) -> int:
    """`num_inference_steps` as an int, refused if it is not a positive int or exceeds
    :func:`max_inference_steps` (which would put a time point at t_clean and divide by zero)."""
    n = values.check_int("num_inference_steps", num_inference_steps, min_value=1)
    limit = max_inference_steps(config)
    if n > limit:
        raise ValueError(
            f"num_inference_steps={n} is too many for this PeRFlow schedule: at most {limit} steps fit "
            f"num_train_timesteps={config.num_train_timesteps} in num_time_windows={config.num_time_windows} "
            "windows; more would truncate the last window's last time point to t_clean (timestep 0), where "
            "PeRFlow's velocity divides by zero."
        )
    return n


def set_timesteps(config: PeRFlowConfig, num_inference_steps: int, *,
                  sample_shape: tuple[int, ...] | None = None) -> PeRFlowState:
    """Precompute every per-step quantity ``step`` needs (host-side; call once per step count).

    `sample_shape` is unused: PeRFlow keeps no history. Raises ValueError for more steps than
    :func:`max_inference_steps` (they would divide by zero in the last window).
    """
    del sample_shape
    check_num_inference_steps(config, num_inference_steps)
    timesteps = reference_timesteps(config, num_inference_steps)
    if _bad_timepoints(config, timesteps).any():  # the limit is exact; this guards its monotonicity assumption
        raise ValueError(f"num_inference_steps={num_inference_steps} puts a PeRFlow time point at or below "
                         f"t_clean={config.t_clean}, where the velocity divides by zero; use fewer steps.")
    n_train = np.float32(config.num_train_timesteps)
    timepoints = timesteps.astype(np.float32) / n_train
    next_steps = np.append(timesteps[1:], 0)
    dt = (next_steps - timesteps).astype(np.float32) / n_train
    _check_in_range(config, timepoints)
    t_s, t_e, lam, eta = _window_table(config, timepoints)
    return PeRFlowState(
        alphas_cumprod=jnp.asarray(_alphas_cumprod(config)),
        timesteps=jnp.asarray(timesteps, jnp.int32),
        timepoints=jnp.asarray(timepoints),
        next_timepoints=jnp.asarray(next_steps.astype(np.float32) / n_train),
        dt=jnp.asarray(dt),
        window_start=t_s,
        window_end=t_e,
        lambda_t=lam,
        eta_t=eta,
    )


@functools.partial(jax.jit, static_argnums=0)
def _window_table(config: PeRFlowConfig, timepoints: jax.Array) -> tuple[jax.Array, ...]:
    """(t_s, t_e, λ_t, η_t) of each time point as one program: run eagerly, these few dozen element-wise ops
    each compiled a program of their own (seconds of a pipeline's first call on CPU)."""
    t_s, t_e = window_bounds(config, timepoints)
    if config.prediction_type == "velocity":
        return t_s, t_e, jnp.ones_like(t_s), jnp.zeros_like(t_s)
    return (t_s, t_e, *window_end_coefficients(config, timepoints))


def velocity(config: PeRFlowConfig, state: PeRFlowState, model_output: jax.Array, step_index: Any,
             sample: jax.Array) -> jax.Array:
    """The velocity at step `step_index` (float32); `step_index` may be traced."""
    common.check_same_shape(model_output, sample)
    common.check_step_index(state.timesteps.shape[0], step_index)
    x = sample.astype(jnp.float32)
    take = lambda a: a[step_index]  # noqa: E731
    return _velocity(config.prediction_type, model_output.astype(jnp.float32), x, take(state.timepoints),
                     take(state.window_start), take(state.window_end), take(state.lambda_t),
                     take(state.eta_t))


def step(config: PeRFlowConfig, state: PeRFlowState, model_output: jax.Array, step_index: Any,
         sample: jax.Array, key: jax.Array | None = None) -> tuple[jax.Array, PeRFlowState]:
    """One PeRFlow step: x_next = x + dt·v, in `sample`'s dtype; the state comes back unchanged and `key`
    is unused (deterministic)."""
    del key
    v = velocity(config, state, model_output, step_index, sample)
    return (sample.astype(jnp.float32) + state.dt[step_index] * v).astype(sample.dtype), state


def predict_window_end(config: PeRFlowConfig, state: PeRFlowState, model_output: jax.Array,
                       step_index: Any, sample: jax.Array) -> jax.Array:
    """The predicted end of the current window, x + (t_e − t_c)·v, for previews (sample's dtype)."""
    v = velocity(config, state, model_output, step_index, sample)
    span = state.window_end[step_index] - state.timepoints[step_index]
    return (sample.astype(jnp.float32) + span * v).astype(sample.dtype)


def add_noise(config: PeRFlowConfig, original: jax.Array, noise: jax.Array, timesteps: jax.typing.ArrayLike,
              state: PeRFlowState | None = None) -> jax.Array:
    """Forward diffusion at integer timesteps t ∈ [1, T] (scalar or per sample), one-based: ᾱ[t − 1].

    `state` is unused (the ᾱ table comes from the config)."""
    del state
    common.check_same_shape(noise, original)
    timesteps = jnp.asarray(timesteps)
    if common.is_concrete(timesteps):
        ts = np.asarray(timesteps)
        if ts.size and (ts.min() < 1 or ts.max() > config.num_train_timesteps):
            raise ValueError(
                f"add_noise takes integer timesteps in [1, {config.num_train_timesteps}] (one-based, like the "
                f"reference); got values in [{ts.min()}, {ts.max()}]."
            )
    idx = jnp.clip(timesteps.astype(jnp.int32) - 1, 0, config.num_train_timesteps - 1)
    sqrt_ac, sqrt_one_minus_ac = (common.broadcast_to_sample(jnp.asarray(tab)[idx], original)
                                  for tab in _noise_tables(config))
    noisy = sqrt_ac * original.astype(jnp.float32) + sqrt_one_minus_ac * noise.astype(jnp.float32)
    return noisy.astype(original.dtype)


# ----------------------------------------------------------------------------------------------------------
# The rest of the contract and the registry bundle
# ----------------------------------------------------------------------------------------------------------

scale_model_input = base.unscaled_model_input  # the model sees the sample as is
init_noise_sigma = base.unit_noise_sigma  # the initial noise is N(0, 1)


def make(config: PeRFlowConfig) -> base.Scheduler:
    """The registry bundle: this module's functions bound to `config`."""
    return base.bundle("perflow", config, sys.modules[__name__])
