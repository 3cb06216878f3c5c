"""Text-to-image and img2img pipelines (SD1.x, SD2.x, SDXL) with PeRFlow, in named stages, jitted and sharded;
with ControlNets and the PeRFlow-Refiner in :mod:`perflow_jax.pipelines.controlnet`."""

from perflow_jax.pipelines.controlnet import StableDiffusionControlNetPipeline
from perflow_jax.pipelines.defaults import FAMILY_DEFAULTS, model_family
from perflow_jax.pipelines.stable_diffusion import (
    GenerationInputs,
    GenerationRequest,
    GenerationSpec,
    GenerationStats,
    StableDiffusionPipeline,
    load_components,
    make_scheduler,
)

__all__ = ["FAMILY_DEFAULTS", "GenerationInputs", "GenerationRequest", "GenerationSpec", "GenerationStats",
           "StableDiffusionControlNetPipeline", "StableDiffusionPipeline", "load_components", "make_scheduler",
           "model_family"]
