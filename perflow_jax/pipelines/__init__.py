"""Text-to-image and img2img pipelines (SD1.x, SD2.x, SDXL) with PeRFlow, in named stages, jitted and sharded;
with ControlNets and the PeRFlow-Refiner in :mod:`perflow_jax.pipelines.controlnet` and the SD ×2 latent upscaler
in :mod:`perflow_jax.pipelines.upscale`; Stable Video Diffusion (image → video) in
:mod:`perflow_jax.pipelines.video`; AnimateDiff (text → video) in :mod:`perflow_jax.pipelines.animatediff`;
multi-view generation in :mod:`perflow_jax.pipelines.multiview`."""

from perflow_jax.pipelines.animatediff import AnimateDiffPipeline
from perflow_jax.pipelines.controlnet import StableDiffusionControlNetPipeline
from perflow_jax.pipelines.defaults import FAMILY_DEFAULTS, model_family
from perflow_jax.pipelines.multiview import MultiViewPipeline, orbit_cameras
from perflow_jax.pipelines.stable_diffusion import (
    GenerationInputs,
    GenerationRequest,
    GenerationSpec,
    GenerationStats,
    StableDiffusionPipeline,
    load_components,
    make_scheduler,
)
from perflow_jax.pipelines.upscale import LatentUpscalePipeline, load_upscaler_components
from perflow_jax.pipelines.video import VideoPipeline

__all__ = ["FAMILY_DEFAULTS", "AnimateDiffPipeline", "GenerationInputs", "GenerationRequest", "GenerationSpec",
           "GenerationStats", "LatentUpscalePipeline", "MultiViewPipeline", "StableDiffusionControlNetPipeline",
           "StableDiffusionPipeline", "VideoPipeline", "load_components", "load_upscaler_components", "make_scheduler",
           "model_family", "orbit_cameras"]
