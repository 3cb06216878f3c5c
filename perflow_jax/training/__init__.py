"""PeRFlow training: the teacher's PF-ODE window solver, the reflow objective and the training loop."""

from perflow_jax.training.reflow import ReflowBatch, ReflowConfig, make_batch
from perflow_jax.training.solver import SolverConfig, solve, unet_teacher_fn

__all__ = ["ReflowBatch", "ReflowConfig", "SolverConfig", "make_batch", "solve", "unet_teacher_fn"]
