"""PeRFlow's reflow objective: make the student straight inside each window of the teacher's flow.

One training example (the reference's ``train_perflow.py``, per sample, vectorised over the batch):

1. t uniform on a discrete grid, t = 1 − floor(u·D)/D, and its window [t_e, t_s] from the scheduler;
2. x_s = add_noise(x₀, ε, t_s·T); x_e = the teacher's PF-ODE solution from x_s to t_e (:mod:`.solver`);
3. x_t on the straight line between them; the student sees (x_t, t·T, condition with dropout);
4. the target: the window's velocity (x_e − x_s)/(t_e − t_s) for ``velocity``, or for the ε types the ε that
   the scheduler maps back onto x_e, (x_e − λ_s·x_s)/η_s, with λ_s, η_s from
   :func:`perflow_jax.schedulers.perflow.window_end_coefficients` (one source of truth with sampling).

CFG modes: ``sync`` solves with the teacher at guidance 1 on the (dropped) condition the student sees, so the
student stays a CFG-able model; ``fixed`` solves with guidance w on the full condition, baking CFG in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from perflow_jax.schedulers import common
from perflow_jax.schedulers import perflow as pf
from perflow_jax.training import solver as solver_lib

StudentFn = Callable[[Any, jax.Array, jax.Array, Any], jax.Array]  # (params, x, timesteps, cond) -> output
LOSS_WEIGHTINGS = ("none", "reciprocal", "huber")
CFG_MODES = ("sync", "fixed")


@dataclasses.dataclass(frozen=True)
class ReflowConfig:
    """The reflow objective's settings.

    Attributes:
      perflow: the student's scheduler; its ``prediction_type`` picks the target and ``num_time_windows`` K.
      solver: the teacher solver (its ``num_windows`` must equal K).
      discrete_timesteps: D, the size of the t grid (default: T).
      loss_weighting: ``none`` (MSE), ``reciprocal`` (per-sample MSE × 1/t, normalised to mean 1 over the grid:
        more weight near the data) or ``huber`` (pseudo-Huber √(d² + c²) − c on the per-sample RMS error).
      huber_c: c of the pseudo-Huber loss.
      cfg_mode: ``sync`` or ``fixed`` (see module docstring).
      guidance_scale: the teacher's guidance w in ``fixed`` mode.
      cond_dropout: probability of replacing a sample's condition by the null condition.
    """

    perflow: pf.PeRFlowConfig = dataclasses.field(default_factory=pf.PeRFlowConfig)
    solver: solver_lib.SolverConfig = dataclasses.field(default_factory=solver_lib.SolverConfig)
    discrete_timesteps: int | None = None
    loss_weighting: str = "none"
    huber_c: float = 0.03
    cfg_mode: str = "sync"
    guidance_scale: float = 7.5
    cond_dropout: float = 0.1

    def __post_init__(self) -> None:
        common.check_choice("loss_weighting", self.loss_weighting, LOSS_WEIGHTINGS)
        common.check_choice("cfg_mode", self.cfg_mode, CFG_MODES)
        if self.solver.num_windows != self.perflow.num_time_windows:
            raise ValueError(f"solver.num_windows={self.solver.num_windows} must equal "
                             f"perflow.num_time_windows={self.perflow.num_time_windows}.")
        if self.solver.num_train_timesteps != self.perflow.num_train_timesteps:
            raise ValueError("solver and perflow must share num_train_timesteps.")
        if self.discrete_timesteps is not None:
            common.check_positive_int("discrete_timesteps", self.discrete_timesteps)
            if self.discrete_timesteps % self.perflow.num_time_windows:
                raise ValueError(f"discrete_timesteps={self.discrete_timesteps} must be a multiple of "
                                 f"num_time_windows={self.perflow.num_time_windows} so window starts lie on the grid.")
        if not 0.0 <= self.cond_dropout < 1.0:
            raise ValueError(f"cond_dropout must be in [0, 1), got {self.cond_dropout}.")
        if not self.guidance_scale >= 1.0:
            raise ValueError(f"guidance_scale must be >= 1, got {self.guidance_scale}.")
        if not self.huber_c > 0:
            raise ValueError(f"huber_c must be > 0, got {self.huber_c}.")

    @property
    def grid_size(self) -> int:
        return self.discrete_timesteps or self.perflow.num_train_timesteps


class ReflowBatch(NamedTuple):
    """One batch of reflow examples (all per-sample arrays are (B,) float32).

    Attributes:
      x_t: the student's input on the straight line; timesteps: t·T (float32) for the student.
      cond: the condition the student sees (after dropout); target: the regression target.
      t, t_start, t_end: the time point and its window; x_start, x_end: the window's end points.
    """

    x_t: jax.Array
    timesteps: jax.Array
    cond: Any
    target: jax.Array
    t: jax.Array
    t_start: jax.Array
    t_end: jax.Array
    x_start: jax.Array
    x_end: jax.Array


def sample_time(config: ReflowConfig, key: jax.Array, batch: int) -> jax.Array:
    """t = 1 − floor(u·D)/D for u ~ U[0, 1): (B,) float32 in (0, 1]."""
    d = config.grid_size
    u = jax.random.uniform(key, (batch,), jnp.float32)
    return 1.0 - jnp.floor(u * d) / np.float32(d)


def drop_condition(key: jax.Array, cond: Any, null_cond: Any, p: float) -> Any:
    """Replace each sample's condition by the null condition with probability `p` (pytree-wise)."""
    leaves = jax.tree_util.tree_leaves(cond)
    b = leaves[0].shape[0]
    drop = jax.random.uniform(key, (b,)) < p
    return jax.tree_util.tree_map(
        lambda c, n: jnp.where(drop.reshape((b,) + (1,) * (c.ndim - 1)), jnp.broadcast_to(n, c.shape), c),
        cond, null_cond)


def targets(config: pf.PeRFlowConfig, x_start: jax.Array, x_end: jax.Array, t_start: jax.Array,
            t_end: jax.Array) -> jax.Array:
    """The regression target for the scheduler's prediction type (float32)."""
    b = lambda a: common.broadcast_to_sample(a, x_start)  # noqa: E731
    if config.prediction_type == "velocity":
        return (x_end - x_start) / b(t_end - t_start)
    lambda_s, eta_s = pf.window_end_coefficients(config, t_start)
    return (x_end - b(lambda_s) * x_start) / b(eta_s)


def make_batch(config: ReflowConfig, teacher_fn: solver_lib.TeacherFn, x0: jax.Array, cond: Any, null_cond: Any,
               key: jax.Array) -> ReflowBatch:
    """Build reflow examples for clean samples `x0` (B, ...) with conditions `cond` (teacher work, no grads).

    `null_cond` is the null condition, broadcastable to `cond` leaf-wise (e.g. the empty prompt's embedding).
    """
    chex.assert_rank(x0, 4)
    b = x0.shape[0]
    k_t, k_noise, k_drop = jax.random.split(key, 3)
    pcfg = config.perflow
    n_train = pcfg.num_train_timesteps
    t = sample_time(config, k_t, b)
    t_start, t_end = pf.window_bounds(pcfg, t)
    x0 = x0.astype(jnp.float32)
    noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
    x_start = pf.add_noise(pcfg, x0, noise, jnp.round(t_start * n_train).astype(jnp.int32))
    cond_in = drop_condition(k_drop, cond, null_cond, config.cond_dropout) if config.cond_dropout > 0 else cond
    if config.cfg_mode == "sync":
        x_end = solver_lib.solve(config.solver, teacher_fn, x_start, t_start, t_end, cond_in)
    else:
        null_b = jax.tree_util.tree_map(lambda n, c: jnp.broadcast_to(n, c.shape), null_cond, cond)
        x_end = solver_lib.solve(config.solver, teacher_fn, x_start, t_start, t_end, cond, uncond=null_b,
                                 guidance_scale=config.guidance_scale)
    x_end = jax.lax.stop_gradient(x_end)
    frac = common.broadcast_to_sample((t - t_start) / (t_end - t_start), x0)
    x_t = x_start + (x_end - x_start) * frac
    target = targets(pcfg, x_start, x_end, t_start, t_end)
    return ReflowBatch(x_t, t * np.float32(n_train), cond_in, target, t, t_start, t_end, x_start, x_end)


def per_sample_weight(config: ReflowConfig, t: jax.Array) -> jax.Array:
    """Per-sample loss weights: 1, or 1/t normalised to mean 1 over the t grid (``reciprocal``)."""
    if config.loss_weighting != "reciprocal":
        return jnp.ones_like(t)
    grid = 1.0 - np.arange(config.grid_size) / config.grid_size
    return (1.0 / t) / np.float32(np.mean(1.0 / grid))


def loss_from_output(config: ReflowConfig, output: jax.Array, batch: ReflowBatch) -> jax.Array:
    """The weighted loss of a student output against the batch's targets (float32 scalar)."""
    chex.assert_equal_shape([output, batch.target])
    err = (output.astype(jnp.float32) - batch.target).reshape(output.shape[0], -1)
    if config.loss_weighting == "huber":
        per = jnp.sqrt(jnp.mean(err**2, axis=1) + config.huber_c**2) - config.huber_c
    else:
        per = jnp.mean(err**2, axis=1)
    return jnp.mean(per * per_sample_weight(config, batch.t))


def loss(config: ReflowConfig, student_fn: StudentFn, params: Any, batch: ReflowBatch) -> jax.Array:
    """The reflow loss of the student with `params` on a prepared batch."""
    out = student_fn(params, batch.x_t, batch.timesteps, batch.cond)
    return loss_from_output(config, out, batch)
