"""perflow-jax: PeRFlow (piecewise rectified flow) for Stable Diffusion in JAX/Flax."""

__version__ = "0.1.0"
