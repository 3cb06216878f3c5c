"""A tiny random Stable Video Diffusion pipeline built with PyTorch diffusers/transformers for parity tests.

Every parameter is perturbed (seeded) so zero-initialised layers (conv_out, the α mix factors, ...) are not
trivial. The image encoder keeps SVD's 224×224 input (diffusers resizes the conditioning image to 224 whatever
the encoder) with 56-pixel patches, so it stays small.
"""

from __future__ import annotations

import torch

from tests.support.tiny_sd import _perturb

SVD_SCHEDULER = {"beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
                 "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "v_prediction",
                 "set_alpha_to_one": False, "sigma_max": 700.0, "sigma_min": 0.002, "skip_prk_steps": True,
                 "steps_offset": 1, "timestep_spacing": "leading", "timestep_type": "continuous",
                 "trained_betas": None, "use_karras_sigmas": True}  # stabilityai/stable-video-diffusion-img2vid


def tiny_unet(seed: int = 0):
    from diffusers import UNetSpatioTemporalConditionModel

    torch.manual_seed(seed)
    return _perturb(UNetSpatioTemporalConditionModel(
        sample_size=4, in_channels=8, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"), cross_attention_dim=32,
        num_attention_heads=(2, 4), addition_time_embed_dim=8, projection_class_embeddings_input_dim=24,
        num_frames=3), seed + 1)


def tiny_vae(seed: int = 2):
    from diffusers import AutoencoderKLTemporalDecoder

    torch.manual_seed(seed)
    return _perturb(AutoencoderKLTemporalDecoder(block_out_channels=(32, 32), layers_per_block=2,
                                                 down_block_types=("DownEncoderBlock2D",) * 2, latent_channels=4),
                    seed + 1)


def tiny_image_encoder(seed: int = 4):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                           image_size=224, patch_size=56, projection_dim=32)
    return _perturb(CLIPVisionModelWithProjection(cfg), seed + 1)


def make_tiny_svd(folder: str):
    """Save a tiny ``StableVideoDiffusionPipeline`` to `folder` and return it (float32, eval mode)."""
    from diffusers import EulerDiscreteScheduler, StableVideoDiffusionPipeline
    from transformers import CLIPImageProcessor

    pipe = StableVideoDiffusionPipeline(
        vae=tiny_vae(), image_encoder=tiny_image_encoder(), unet=tiny_unet(),
        scheduler=EulerDiscreteScheduler.from_config(SVD_SCHEDULER),
        feature_extractor=CLIPImageProcessor(crop_size=224, size={"shortest_edge": 224}))
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder)
    return pipe
