"""PeRFlow training: the teacher's PF-ODE window solver, the reflow objective and the training loop.

A UNet teacher is :func:`perflow_jax.models.adapter.unet_fn` over its (frozen) params, conditioned on a
:class:`~perflow_jax.models.adapter.UNetCondition`.
"""

from perflow_jax.training.reflow import ReflowBatch, ReflowConfig, make_batch
from perflow_jax.training.solver import SolverConfig, solve

__all__ = ["ReflowBatch", "ReflowConfig", "SolverConfig", "make_batch", "solve"]
