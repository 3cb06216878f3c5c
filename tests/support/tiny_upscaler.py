"""A tiny random SD ×2 latent upscaler built with PyTorch diffusers (``StableDiffusionLatentUpscalePipeline``).

The K-upscaler UNet is the smallest layout diffusers builds: three blocks of 32/64/64 channels (the K blocks'
GroupNorms take groups of 32 channels, and the first up block's self-attention needs its channels equal to the
time embedding size, 2 × 32), one layer per block, head size 8. The VAE, CLIP text encoder (width 32, so
``time_cond_proj_dim`` = 128 noise-level features + 32) and tokenizer are those of ``tiny_sd``. Every weight is
perturbed so no layer is zero.
"""

from __future__ import annotations

import os

import torch

from tests.support.tiny_sd import _clip, _perturb, _vae, write_tokenizer

UNET_KWARGS = dict(
    act_fn="gelu", attention_head_dim=8, norm_num_groups=None, block_out_channels=(32, 64, 64), layers_per_block=1,
    time_cond_proj_dim=160, conv_in_kernel=1, conv_out_kernel=1, cross_attention_dim=32, in_channels=8,
    out_channels=5, mid_block_type=None, resnet_time_scale_shift="scale_shift", time_embedding_type="fourier",
    timestep_post_act="gelu", down_block_types=("KDownBlock2D", "KCrossAttnDownBlock2D", "KCrossAttnDownBlock2D"),
    up_block_types=("KCrossAttnUpBlock2D", "KCrossAttnUpBlock2D", "KUpBlock2D"))


def tiny_upscaler_unet(seed: int = 0):
    """The tiny K-upscaler ``UNet2DConditionModel`` (random, perturbed, eval mode)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return _perturb(UNet2DConditionModel(**UNET_KWARGS), seed)


def make_tiny_upscaler(folder: str, seed: int = 0):
    """Build, ``save_pretrained`` into `folder` and return a tiny ``StableDiffusionLatentUpscalePipeline``."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionLatentUpscalePipeline
    from transformers import CLIPTokenizer

    tok_dir = os.path.join(folder, "_tok")
    write_tokenizer(tok_dir)
    pipe = StableDiffusionLatentUpscalePipeline(
        vae=_vae(seed + 1, 0.18215), text_encoder=_clip("quick_gelu", False, seed + 2),
        tokenizer=CLIPTokenizer.from_pretrained(tok_dir), unet=tiny_upscaler_unet(seed),
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         prediction_type="sample"))
    pipe.save_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe
