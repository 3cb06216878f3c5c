"""Flax Stable Diffusion models (UNet, VAE, CLIP text and image encoders, IP-Adapter, SVD's video UNet and VAE)
and their loaders from PyTorch weights.

Public layout is NCHW like diffusers; parameter names follow the former diffusers/transformers Flax classes.
"""

from perflow_jax.models.clip import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTextOutput,
    load_clip_text_model,
)
from perflow_jax.models.clip_vision import (
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    CLIPVisionOutput,
    load_clip_vision_model,
    preprocess_images,
)
from perflow_jax.models.components import (
    PipelineComponents,
    convert_to_flax,
    load_pipeline_components,
    load_tokenizer,
)
from perflow_jax.models.controlnet import ControlNetConfig, ControlNetModel, load_controlnet
from perflow_jax.models.convert import load_params, torch_to_flax
from perflow_jax.models.ip_adapter import IPAdapter, IPAdapterConfig, load_ip_adapter, merge_ip_adapter
from perflow_jax.models.mismatch import ConversionError
from perflow_jax.models.unet import UNet2DConditionModel, UNetConfig, init_unet_params, load_unet
from perflow_jax.models.unet_spatiotemporal import (
    SpatioTemporalUNetConfig,
    UNetSpatioTemporalConditionModel,
    load_unet_spatiotemporal,
)
from perflow_jax.models.vae import AutoencoderKL, VAEConfig, load_vae, scale_latents, unscale_latents
from perflow_jax.models.vae_temporal import AutoencoderKLTemporalDecoder, TemporalVAEConfig, load_temporal_vae
from perflow_jax.models.weights_io import load_state_dict

__all__ = [
    "AutoencoderKL", "AutoencoderKLTemporalDecoder", "CLIPTextConfig", "CLIPTextModel",
    "CLIPTextModelWithProjection", "CLIPTextOutput", "CLIPVisionConfig", "CLIPVisionModelWithProjection",
    "CLIPVisionOutput", "ControlNetConfig", "ControlNetModel", "ConversionError", "IPAdapter", "IPAdapterConfig",
    "PipelineComponents", "SpatioTemporalUNetConfig", "TemporalVAEConfig", "UNet2DConditionModel", "UNetConfig",
    "UNetSpatioTemporalConditionModel", "VAEConfig", "convert_to_flax", "init_unet_params", "load_clip_text_model",
    "load_clip_vision_model", "load_controlnet", "load_ip_adapter", "load_params", "load_pipeline_components",
    "load_state_dict", "load_temporal_vae", "load_tokenizer", "load_unet", "load_unet_spatiotemporal", "load_vae",
    "merge_ip_adapter", "preprocess_images", "scale_latents", "torch_to_flax", "unscale_latents",
]
