"""The CLIP image encoder in Flax (transformers' ``CLIPVisionModelWithProjection``) and CLIP image preprocessing.

Image prompts (IP-Adapter), Stable Video Diffusion and image-conditioned multi-view models all condition on this
encoder: ViT-H/14 (IP-Adapter SD1.5 and the SDXL "vit-h" variants, SVD) or ViT-bigG/14 (IP-Adapter SDXL). It
shares the transformer encoder with the text encoder (:class:`perflow_jax.models.clip.Encoder`, without the
causal mask) and keeps transformers' parameter names (``vision_model/embeddings/patch_embedding/kernel``,
``vision_model/pre_layrnorm``, ``visual_projection``...), so an ``image_encoder/`` folder loads torch-free with
:func:`load_clip_vision_model`.

:func:`preprocess_images` is ``CLIPImageProcessor``'s default pipeline (shortest side to ``image_size`` with
PIL's bicubic filter, center crop, rescale to [0, 1], normalise with the OpenAI CLIP mean and std), on the host.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from perflow_jax import values
from perflow_jax.models.clip import HIDDEN_ACTS, Encoder, layer_norm
from perflow_jax.models.config_io import config_from_json
from perflow_jax.models.convert import load_params

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "CLIPVisionConfig",
    "CLIPVisionModelWithProjection",
    "CLIPVisionOutput",
    "clip_vision_param_shapes",
    "load_clip_vision_model",
    "preprocess_images",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP normalisation (CLIPImageProcessor's default)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """The fields of transformers' ``CLIPVisionConfig`` that the forward pass uses (same names and defaults)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if f.type == "int":
                values.check_int(f"CLIPVisionConfig.{f.name}", getattr(self, f.name), min_value=1)
        if self.hidden_act not in HIDDEN_ACTS:
            raise ValueError(f"Unsupported CLIP vision hidden_act {self.hidden_act!r}; expected one of {HIDDEN_ACTS}.")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"CLIPVisionConfig hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}.")
        if self.image_size % self.patch_size:
            raise ValueError(f"CLIPVisionConfig image_size {self.image_size} is not a multiple of patch_size "
                             f"{self.patch_size}.")
        if not values.check_float("CLIPVisionConfig.layer_norm_eps", self.layer_norm_eps) > 0:
            raise ValueError(f"CLIPVisionConfig.layer_norm_eps must be positive, got {self.layer_norm_eps!r}.")

    @property
    def num_positions(self) -> int:
        """Patches plus the class token."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CLIPVisionConfig:
        """Build from a transformers vision config dict (or a full ``CLIPModel`` config's ``vision_config``)."""
        if not isinstance(d, Mapping):
            raise TypeError(f"CLIPVisionConfig.from_dict expects a mapping, got {type(d).__name__}.")
        if "vision_config" in d:
            d = d["vision_config"]
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names and v is not None})

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> CLIPVisionConfig:
        """Read ``config.json`` (or the folder holding it); errors name the file."""
        return config_from_json(cls.from_dict, path)


class CLIPVisionOutput(NamedTuple):
    """Encoder outputs.

    Attributes:
      image_embeds: ``(B, projection_dim)``: the projected, post-normed class token (IP-Adapter's input).
      last_hidden_state: ``(B, 1 + patches, D)`` last layer's output (not normed, as in transformers).
      hidden_states: the pre-normed embeddings, then each layer's output (``num_hidden_layers + 1`` entries);
        ``hidden_states[-2]`` is what IP-Adapter Plus resamples (:attr:`penultimate`).
      pooled_output: ``(B, D)`` post-normed class token.
    """

    image_embeds: jax.Array
    last_hidden_state: jax.Array
    hidden_states: tuple[jax.Array, ...]
    pooled_output: jax.Array

    @property
    def penultimate(self) -> jax.Array:
        """``hidden_states[-2]``, the tokens IP-Adapter Plus and SVD-style models condition on."""
        return self.hidden_states[-2]


class CLIPVisionModelWithProjection(nn.Module):
    """CLIP ViT image encoder with ``visual_projection``: ``pixel_values (B, 3, S, S)`` (from
    :func:`preprocess_images`) → :class:`CLIPVisionOutput`.

    Attributes:
      config: the encoder config.
      dtype: compute dtype (layer norms and the softmax always run in float32).
      param_dtype: dtype of freshly initialised params.
    """

    config: CLIPVisionConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> CLIPVisionOutput:
        cfg = self.config
        chex.assert_shape(pixel_values, (None, cfg.num_channels, cfg.image_size, cfg.image_size),
                          custom_message=f"pixel_values must be (B, {cfg.num_channels}, {cfg.image_size}, "
                                         f"{cfg.image_size}) (see preprocess_images)")
        last, states, pooled = _VisionTransformer(cfg, self.dtype, self.param_dtype, name="vision_model")(
            pixel_values)
        projection = nn.Dense(cfg.projection_dim, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                              name="visual_projection")
        return CLIPVisionOutput(projection(pooled), last, states, pooled)


class _VisionTransformer(nn.Module):
    config: CLIPVisionConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...], jax.Array]:
        cfg = self.config
        hidden = _VisionEmbeddings(cfg, self.dtype, self.param_dtype, name="embeddings")(pixel_values)
        hidden = layer_norm(cfg, "pre_layrnorm", self.param_dtype)(hidden).astype(self.dtype)  # sic (transformers)
        states = Encoder(cfg, self.dtype, self.param_dtype, causal=False, name="encoder")(hidden)
        pooled = layer_norm(cfg, "post_layernorm", self.param_dtype)(states[-1][:, 0]).astype(self.dtype)
        return states[-1], states, pooled


class _VisionEmbeddings(nn.Module):
    config: CLIPVisionConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        cfg = self.config
        b = pixel_values.shape[0]
        p = cfg.patch_size
        patches = nn.Conv(cfg.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                          dtype=self.dtype, param_dtype=self.param_dtype, name="patch_embedding")(
            jnp.transpose(pixel_values, (0, 2, 3, 1)).astype(self.dtype))
        patches = patches.reshape(b, -1, cfg.hidden_size)
        cls = self.param("class_embedding", nn.initializers.normal(1.0), (cfg.hidden_size,), self.param_dtype)
        cls = jnp.broadcast_to(cls.astype(self.dtype), (b, 1, cfg.hidden_size))
        position = nn.Embed(cfg.num_positions, cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                            name="position_embedding")
        return jnp.concatenate([cls, patches], axis=1) + position(jnp.arange(cfg.num_positions))[None]


# ----------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------


def clip_vision_param_shapes(config: CLIPVisionConfig) -> dict:
    """The params tree as ``jax.ShapeDtypeStruct`` leaves, without allocating anything."""
    pixels = jax.ShapeDtypeStruct((1, config.num_channels, config.image_size, config.image_size), jnp.float32)
    return jax.eval_shape(CLIPVisionModelWithProjection(config).init, jax.random.key(0), pixels)["params"]


def _rename_vision_key(key: str) -> str:
    """A bare ``CLIPVisionModel`` file may lack the ``vision_model.`` prefix; add it back."""
    return key if key.startswith(("vision_model.", "visual_projection.")) else "vision_model." + key


def load_clip_vision_model(folder: str | os.PathLike, dtype: Any = None, variant: str | None = None,
                           allow_pickle: bool = False) -> tuple[CLIPVisionConfig, dict]:
    """Read an ``image_encoder/`` folder (``config.json`` + ``model[.variant].safetensors``) torch-free.

    Returns ``(config, params)`` for :class:`CLIPVisionModelWithProjection`; weights that do not fit the config
    raise :class:`~perflow_jax.models.mismatch.ConversionError` listing every mismatch.
    """
    folder = os.fspath(folder)
    config = CLIPVisionConfig.from_json(folder)
    params = load_params(folder, "model", clip_vision_param_shapes(config), variant=variant,
                         allow_pickle=allow_pickle, rename=_rename_vision_key, ignore=[r"(^|\.)position_ids$"],
                         dtype=dtype, what="CLIPVisionModelWithProjection")
    return config, jax.tree_util.tree_map(jnp.asarray, params)


# ----------------------------------------------------------------------------------------------------------
# Preprocessing (host side)
# ----------------------------------------------------------------------------------------------------------


def preprocess_images(images: np.ndarray | Sequence[np.ndarray], image_size: int = 224,
                      crop_size: int | None = None) -> np.ndarray:
    """RGB images → CLIP ``pixel_values`` ``(B, 3, crop, crop)`` float32, as ``CLIPImageProcessor``'s defaults.

    Args:
      images: one ``(H, W, 3)`` image, a ``(B, H, W, 3)`` batch or a list of images (sizes may differ), uint8
        or float in [0, 1].
      image_size: the shortest side after the bicubic resize (``size["shortest_edge"]``).
      crop_size: the center crop (default: `image_size`).
    """
    from PIL import Image

    crop = image_size if crop_size is None else crop_size
    values.check_int("image_size", image_size, min_value=1)
    values.check_int("crop_size", crop, min_value=1)
    batch = [images] if isinstance(images, np.ndarray) and images.ndim == 3 else list(images)
    if not batch:
        raise ValueError("preprocess_images needs at least one image.")
    out = []
    for i, img in enumerate(batch):
        img = np.asarray(img)
        if img.ndim != 3 or img.shape[-1] != 3 or min(img.shape[:2]) < 1:
            raise ValueError(f"Image {i} must be RGB (H, W, 3), got shape {img.shape}.")
        if img.dtype != np.uint8:
            if not np.isfinite(img).all():
                raise ValueError(f"Image {i} has NaN or infinite values; pass uint8 or floats in [0, 1].")
            img = np.round(np.clip(img.astype(np.float64), 0.0, 1.0) * 255).astype(np.uint8)
        h, w = img.shape[:2]
        short, long = (h, w) if h <= w else (w, h)
        new_long = int(image_size * long / short)  # transformers' rule (truncates)
        size = (new_long, image_size) if h <= w else (image_size, new_long)  # PIL takes (width, height)
        resized = np.asarray(Image.fromarray(img).resize(size, resample=Image.Resampling.BICUBIC))
        rh, rw = resized.shape[:2]
        top, left = (rh - crop) // 2, (rw - crop) // 2
        if top < 0 or left < 0:
            raise ValueError(f"crop_size {crop} is larger than the resized image {rh}×{rw}.")
        x = resized[top:top + crop, left:left + crop].astype(np.float64) / 255.0
        x = (x - np.asarray(CLIP_MEAN)) / np.asarray(CLIP_STD)
        out.append(x.transpose(2, 0, 1).astype(np.float32))
    return np.stack(out)
