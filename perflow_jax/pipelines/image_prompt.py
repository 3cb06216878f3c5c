"""Image prompts (IP-Adapter) for the SD pipeline: the image-encoding stage and its loading.

:func:`load_image_prompt` reads an ``ip-adapter*.safetensors`` file and its CLIP image encoder and returns an
:class:`ImagePrompt` (the static modules), the params it adds to a pipeline and the UNet's ``to_k_ip``/``to_v_ip``
layers. :meth:`ImagePrompt.encode` turns preprocessed images into the conditional and unconditional image tokens
the way diffusers' ``prepare_ip_adapter_image_embeds`` does for classifier-free guidance: the unconditional
tokens project zero ``image_embeds`` (IP-Adapter), or resample the encoding of an all-zero pixel image
(IP-Adapter Plus).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from perflow_jax import values
from perflow_jax.images import read_image
from perflow_jax.models.clip_vision import CLIPVisionConfig, CLIPVisionModelWithProjection, load_clip_vision_model
from perflow_jax.models.clip_vision import preprocess_images as clip_preprocess
from perflow_jax.models.ip_adapter import IPAdapterConfig, image_projection, load_ip_adapter
from perflow_jax.models.unet import UNetConfig

IMAGE_ENCODER = "image_encoder"  # the encoder's folder name in pipelines and next to the released adapters


@dataclasses.dataclass(frozen=True)
class ImagePrompt:
    """The static half of a loaded IP-Adapter (params live in the pipeline's params under ``"image_encoder"``
    and ``"ip_projection"``).

    Attributes:
      adapter: the image projection's config.
      encoder: the CLIP image encoder's config.
      dtype: compute dtype of both.
      adapter_path, encoder_path: where they were read from.
    """

    adapter: IPAdapterConfig
    encoder: CLIPVisionConfig
    dtype: Any
    adapter_path: str
    encoder_path: str

    def encode(self, params: Any, pixel_values: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(B, 3, S, S)`` pixel values → (image tokens, unconditional image tokens), each
        ``(B, num_tokens, cross_attention_dim)``."""
        encoder = CLIPVisionModelWithProjection(self.encoder, dtype=self.dtype)
        projection = image_projection(self.adapter, self.dtype)
        out = encoder.apply({"params": params["image_encoder"]}, pixel_values.astype(self.dtype))
        if self.adapter.uses_hidden_states:
            feats = out.penultimate
            zero = encoder.apply({"params": params["image_encoder"]}, jnp.zeros_like(pixel_values[:1])).penultimate
            neg = jnp.broadcast_to(zero, feats.shape)
        else:
            feats = out.image_embeds
            neg = jnp.zeros_like(feats)
        project = lambda f: projection.apply({"params": params["ip_projection"]}, f)  # noqa: E731
        return project(feats), project(neg)

    def preprocess(self, images: Any, n: int, per_prompt: int) -> np.ndarray:
        """Host side: one image for all `n` rows, or one per prompt (each repeated `per_prompt` times) →
        ``(n, 3, S, S)`` float32. Images are files, PIL images or RGB arrays (uint8 or float in [0, 1])."""
        batch = [images] if _is_single(images) else list(images)
        if not batch:
            raise ValueError("ip_adapter_image is empty; pass an image, or one per prompt.")
        batch = [_as_array(im) for im in batch]
        pixels = clip_preprocess(batch, self.encoder.image_size)
        if len(pixels) == 1:
            return np.repeat(pixels, n, axis=0)
        if len(pixels) * per_prompt != n:
            raise ValueError(f"Got {len(pixels)} ip_adapter_image(s) for {n // per_prompt} prompts; pass one image "
                             "or one per prompt.")
        return np.repeat(pixels, per_prompt, axis=0)


def _as_array(image: Any) -> np.ndarray:
    """A file (read), a PIL image (as RGB) or an array."""
    if isinstance(image, str | os.PathLike):
        return read_image(image, "ip_adapter_image")
    return np.asarray(image.convert("RGB")) if hasattr(image, "convert") else np.asarray(image)


def _is_single(images: Any) -> bool:
    """One image (a path, a PIL image, or an (H, W, 3) array) rather than a batch or list of them."""
    if isinstance(images, str | os.PathLike) or hasattr(images, "convert"):
        return True
    return isinstance(images, np.ndarray) and images.ndim == 3


def find_image_encoder(adapter_path: str, model_path: str | None) -> str:
    """The image encoder folder to use when none is given: the model's ``image_encoder/``, else the one next to
    the adapter file (the released repos' layout: ``models/image_encoder`` beside ``models/ip-adapter_sd15...``)."""
    candidates = [os.path.join(p, IMAGE_ENCODER) for p in (model_path, os.path.dirname(os.path.abspath(adapter_path)))
                  if p and os.path.isdir(p)]
    for folder in candidates:
        if os.path.isfile(os.path.join(folder, "config.json")):
            return folder
    raise FileNotFoundError(f"No CLIP image encoder found for IP-Adapter {adapter_path!r} (looked for "
                            f"{IMAGE_ENCODER}/ in the model folder and next to the adapter file); pass its folder "
                            "(image_encoder=..., --image-encoder DIR).")


def load_image_prompt(adapter_path: str | os.PathLike, unet_config: UNetConfig, *,
                      image_encoder: str | os.PathLike | None = None, model_path: str | None = None,
                      dtype: Any = jnp.float32) -> tuple[ImagePrompt, dict, dict]:
    """Load an IP-Adapter file and its image encoder for a UNet of `unet_config`.

    Returns ``(prompt, params, unet_ip_params)``: ``params`` holds ``"image_encoder"`` and ``"ip_projection"``;
    ``unet_ip_params`` the UNet's ``*_ip`` layers (merge with :func:`perflow_jax.models.ip_adapter.merge_ip_adapter`).
    Sizes that do not fit (adapter vs UNet, adapter vs encoder) are one-line ``ValueError``s.
    """
    adapter_path = os.fspath(adapter_path)
    adapter = load_ip_adapter(adapter_path, unet_config)
    folder = os.fspath(image_encoder) if image_encoder is not None else find_image_encoder(adapter_path, model_path)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"Image encoder folder {folder!r} does not exist.")
    enc_config, enc_params = load_clip_vision_model(folder)
    cfg = adapter.config
    need, what = ((enc_config.hidden_size, "hidden_size") if cfg.uses_hidden_states
                  else (enc_config.projection_dim, "projection_dim"))
    if cfg.image_embed_dim != need:
        raise ValueError(f"IP-Adapter {adapter_path!r} reads {cfg.image_embed_dim}-wide image features but the image "
                         f"encoder in {folder!r} gives {need} ({what}); use the encoder the adapter was trained with "
                         "(ViT-H/14 for *_vit-h and SD1.5 adapters, ViT-bigG/14 for ip-adapter_sdxl).")
    prompt = ImagePrompt(cfg, enc_config, jnp.dtype(dtype), adapter_path, folder)
    return prompt, {"image_encoder": enc_params, "ip_projection": adapter.projection_params}, adapter.unet_params


def check_scale(scale: Any) -> float:
    """``ip_adapter_scale``: a finite number (0 turns the image prompt off)."""
    return values.check_float("ip_adapter_scale", scale)


__all__ = ["IMAGE_ENCODER", "ImagePrompt", "check_scale", "find_image_encoder", "load_image_prompt"]
