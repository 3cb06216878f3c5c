"""Multi-view UNet (MVDream / ImageDream style) on our SD UNet: camera conditioning, cross-view attention and a
reference image through decoupled cross-attention.

The model is :class:`~perflow_jax.models.unet.UNet2DConditionModel` configured, not copied:

- camera: ``class_embed_type="projection"`` with ``projection_class_embeddings_input_dim=16``; the flattened 4×4
  camera matrix goes through ``class_embedding`` (Linear 16 → time_embed_dim, SiLU, Linear) into the time
  embedding (MVDream's ``camera_embed``);
- cross-view attention: ``num_views=N`` makes every ``attn1`` attend over the N views of a sample jointly,
  tokens ``(B·N, HW, C) → (B, N·HW, C)``; text cross-attention stays per view. N is a shape, never a weight;
- reference image: IP-Adapter's decoupled cross-attention (``attn2.to_k_ip``/``to_v_ip``) on reference tokens,
  either the VAE latent of the reference (``reference="latent"``: its ``h·w`` latent pixels as tokens) or CLIP
  image tokens (``reference="clip"``), both through a learned Dense ``reference_proj`` to cross_attention_dim.

Params are one tree: the UNet's (with ``class_embedding`` and the ``*_ip`` layers) plus ``reference_proj``.
Loaders: :func:`load_multiview_unet` (diffusers-style folder), :func:`multiview_params_from_ldm` (MVDream's
``model.diffusion_model.*`` layout with ``camera_embed.*``) and :func:`init_multiview_from_unet` (a plain SD UNet
plus fresh camera/reference layers that start as a no-op, for fine-tuning).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from perflow_jax.models.convert import load_params, torch_to_flax
from perflow_jax.models.layers import AttentionImpl
from perflow_jax.models.single_file import UNET_PREFIX, rewrite_key, unet_ldm_table
from perflow_jax.models.unet import UNet2DConditionModel, UNetConfig, unet_param_shapes

__all__ = ["CAMERA_DIM", "REFERENCE_KINDS", "MultiViewConfig", "ReferenceProjection", "init_multiview_from_unet",
           "load_multiview_unet", "multiview_apply", "multiview_param_shapes", "multiview_params_from_ldm",
           "reference_tokens"]

CAMERA_DIM = 16  # a flattened 4×4 camera-to-world matrix
REFERENCE_KINDS = ("latent", "clip")
MULTIVIEW_JSON = "multiview.json"  # our extra settings beside a diffusers-style config.json


@dataclasses.dataclass(frozen=True)
class MultiViewConfig:
    """A multi-view UNet: the UNet config (with the camera projection) and the reference-image conditioning.

    ``reference``: None (text only), ``"latent"`` (VAE latents, ``reference_channels`` = latent channels) or
    ``"clip"`` (CLIP image tokens, ``reference_channels`` = the encoder's hidden size).
    """

    unet: UNetConfig
    reference: str | None = None
    reference_channels: int = 4

    def __post_init__(self) -> None:
        u = self.unet
        if u.class_embed_type != "projection" or u.projection_class_embeddings_input_dim != CAMERA_DIM:
            raise ValueError(f"A multi-view UNet config needs class_embed_type='projection' and "
                             f"projection_class_embeddings_input_dim={CAMERA_DIM} (the flattened 4x4 camera); got "
                             f"{u.class_embed_type!r} and {u.projection_class_embeddings_input_dim!r}.")
        if self.reference not in (None, *REFERENCE_KINDS):
            raise ValueError(f"Multi-view reference must be None or one of {REFERENCE_KINDS}, got {self.reference!r}.")
        if isinstance(self.reference_channels, bool) or not isinstance(self.reference_channels, int) \
                or self.reference_channels < 1:
            raise ValueError(f"Multi-view reference_channels must be a positive int, got {self.reference_channels!r}.")

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> MultiViewConfig:
        """``config.json`` (diffusers UNet) + optional ``multiview.json`` (``reference``, ``reference_channels``)."""
        unet = UNetConfig.from_json(folder)
        path = os.path.join(os.fspath(folder), MULTIVIEW_JSON)
        extra: dict[str, Any] = {}
        if os.path.exists(path):
            try:
                with open(path) as f:
                    extra = json.load(f)
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"{path}: not readable JSON ({e}).") from None
            unknown = sorted(set(extra) - {"reference", "reference_channels"}) if isinstance(extra, dict) else []
            if not isinstance(extra, dict) or unknown:
                raise ValueError(f"{path}: expected an object with 'reference' and 'reference_channels', got keys "
                                 f"{unknown}.")
        return cls(unet, **extra)

    def to_json_dict(self) -> dict[str, Any]:
        return {"reference": self.reference, "reference_channels": self.reference_channels}


class ReferenceProjection(nn.Module):
    """Reference tokens ``(B, L, reference_channels)`` → ``(B, L, cross_attention_dim)`` (param ``reference_proj``)."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        return nn.Dense(self.features, dtype=self.dtype, name="reference_proj")(tokens.astype(self.dtype))


def reference_tokens(config: MultiViewConfig, reference: jax.Array) -> jax.Array:
    """The reference input as tokens: latents ``(B, C, h, w)`` → ``(B, h·w, C)``; CLIP tokens ``(B, L, D)`` as
    they are. Raises a one-line ``ValueError`` when it does not fit the config."""
    c = config.reference_channels
    if config.reference is None:
        raise ValueError("This multi-view UNet has no reference-image layers (reference=None); drop the reference.")
    if config.reference == "latent":
        if reference.ndim != 4 or reference.shape[1] != c:
            raise ValueError(f"The reference must be VAE latents (B, {c}, h, w); got shape {tuple(reference.shape)}.")
        b = reference.shape[0]
        return jnp.transpose(reference, (0, 2, 3, 1)).reshape(b, -1, c)
    if reference.ndim != 3 or reference.shape[2] != c:
        raise ValueError(f"The reference must be CLIP image tokens (B, L, {c}); got shape {tuple(reference.shape)}.")
    return reference


def _cameras(cameras: jax.Array, bn: int) -> jax.Array:
    """``(B·N, 4, 4)`` or ``(B·N, 16)`` camera matrices → ``(B·N, 16)`` float32 (row-major flattening)."""
    shape = tuple(cameras.shape)
    if shape not in ((bn, 4, 4), (bn, CAMERA_DIM)):
        raise ValueError(f"Camera matrices must be ({bn}, 4, 4) or ({bn}, 16), one per view; got shape {shape}.")
    return jnp.asarray(cameras, jnp.float32).reshape(bn, CAMERA_DIM)


def multiview_apply(
    config: MultiViewConfig,
    params: Mapping,
    sample: jax.Array,
    timesteps: jax.Array | float | int,
    encoder_hidden_states: jax.Array,
    *,
    num_views: int,
    cameras: jax.Array | None = None,
    reference: jax.Array | None = None,
    reference_scale: jax.Array | float = 1.0,
    dtype: Any = jnp.float32,
    attention_implementation: AttentionImpl = None,
    attention_chunk_size: int | None = None,
) -> jax.Array:
    """One multi-view UNet evaluation (traceable; jit it with `config`, `num_views`, `dtype` static).

    Args:
      sample: ``(B·N, C, H, W)``, the N views of each sample consecutive.
      timesteps: scalar, ``(1,)`` or ``(B·N,)``.
      encoder_hidden_states: ``(B·N, L, cross_attention_dim)`` text tokens (per view).
      num_views: N; 1 (or any N with multi-view attention off) makes views independent.
      cameras: ``(B·N, 4, 4)`` or ``(B·N, 16)``; None leaves the time embedding unconditioned.
      reference: per sample, ``(B, C, h, w)`` latents or ``(B, L, D)`` CLIP tokens (see :func:`reference_tokens`);
        every view of a sample attends to its sample's reference.
      reference_scale: weight of the reference attention, scalar or ``(B·N,)`` (traced).

    Returns:
      ``(B·N, out_channels, H, W)``.
    """
    bn = sample.shape[0]
    if not isinstance(num_views, int) or num_views < 1 or bn % num_views:
        raise ValueError(f"num_views={num_views!r} must be a positive int dividing the batch of {bn} views "
                         "(B samples × N views).")
    cams = None if cameras is None else _cameras(cameras, bn)
    unet_params = {k: v for k, v in params.items() if k != "reference_proj"}
    ip_tokens = None
    if reference is not None:
        tokens = reference_tokens(config, reference)
        if tokens.shape[0] * num_views != bn:
            raise ValueError(f"Got {tokens.shape[0]} reference(s) for {bn // num_views} sample(s) of {num_views} "
                             "views; pass one reference per sample.")
        if "reference_proj" not in params:
            raise ValueError("The params have no reference_proj layer; load a model with reference-image layers.")
        proj = ReferenceProjection(config.unet.encoder_dim, dtype)
        ip_tokens = jnp.repeat(proj.apply({"params": {"reference_proj": params["reference_proj"]}}, tokens),
                               num_views, axis=0)
    model = UNet2DConditionModel(config.unet, dtype=dtype, attention_implementation=attention_implementation,
                                 attention_chunk_size=attention_chunk_size, num_views=num_views)
    return model.apply({"params": unet_params}, sample, timesteps, encoder_hidden_states, class_labels=cams,
                       ip_tokens=ip_tokens, ip_scale=None if ip_tokens is None else reference_scale)


# ----------------------------------------------------------------------------------------------------------
# Parameters and conversion
# ----------------------------------------------------------------------------------------------------------


def multiview_param_shapes(config: MultiViewConfig) -> dict:
    """The params tree as ``ShapeDtypeStruct`` leaves: the UNet (camera MLP; ``*_ip`` layers with a reference)
    plus ``reference_proj`` with a reference."""
    shapes = dict(unet_param_shapes(config.unet, ip_adapter=config.reference is not None))
    if config.reference is not None:
        d = config.unet.encoder_dim
        shapes["reference_proj"] = {"kernel": jax.ShapeDtypeStruct((config.reference_channels, d), jnp.float32),
                                    "bias": jax.ShapeDtypeStruct((d,), jnp.float32)}
    return shapes


def _strip_processor(key: str) -> str:
    """diffusers saves a custom attention processor's layers under ``attn2.processor.``; ours sit on ``attn2``."""
    return key.replace(".processor.", ".")


def load_multiview_unet(folder: str | os.PathLike, dtype: Any = None, variant: str | None = None,
                        allow_pickle: bool = False) -> tuple[MultiViewConfig, dict]:
    """A diffusers-style multi-view UNet folder: ``config.json`` (``class_embed_type="projection"``, 16 inputs),
    optional ``multiview.json``, and ``diffusion_pytorch_model*.safetensors`` with the diffusers UNet keys plus
    ``[...attn2.][processor.]to_k_ip/to_v_ip`` and ``reference_proj`` when there is a reference. Strict: every
    key must be used and every param filled (``ConversionError`` otherwise)."""
    config = MultiViewConfig.from_folder(folder)
    params = load_params(os.fspath(folder), "diffusion_pytorch_model", multiview_param_shapes(config),
                         variant=variant, allow_pickle=allow_pickle, dtype=dtype, rename=_strip_processor,
                         what="multi-view UNet")
    return config, params


def mvdream_ldm_table(config: UNetConfig) -> dict[str, str]:
    """MVDream LDM module names → diffusers ones: the SD UNet table plus ``camera_embed.{0,2}``."""
    return unet_ldm_table(config) | {"camera_embed.0": "class_embedding.linear_1",
                                     "camera_embed.2": "class_embedding.linear_2"}


def multiview_params_from_ldm(state_dict: Mapping[str, np.ndarray], config: MultiViewConfig,
                              dtype: Any = None) -> dict:
    """Params from an MVDream checkpoint state dict (``model.diffusion_model.*`` with ``camera_embed.*``; keys
    outside the UNet such as ``first_stage_model.*`` are the caller's). ``reference_proj`` keeps its name.
    Strict: every UNet key is accounted for and every param filled."""
    table = mvdream_ldm_table(config.unet)
    unet_sd = {k[len(UNET_PREFIX):]: v for k, v in state_dict.items() if k.startswith(UNET_PREFIX)}

    def rename(key: str) -> str:
        new = rewrite_key(key, table)
        return _strip_processor(key if new is None else new)

    return torch_to_flax(unet_sd, multiview_param_shapes(config), rename=rename, dtype=dtype,
                         what="multi-view UNet (MVDream layout)")


def init_multiview_from_unet(config: MultiViewConfig, unet_params: Mapping, rng: jax.Array) -> dict:
    """A plain SD UNet's params plus freshly initialised camera and reference layers, to fine-tune from.

    ``class_embedding.linear_2`` and ``reference_proj`` start at zero and ``to_k_ip``/``to_v_ip`` as copies of
    ``to_k``/``to_v`` (IP-Adapter's init), so the new inputs start as a no-op: with N = 1 the model equals the
    plain UNet until trained. Raises ``ValueError`` when `unet_params` do not fit ``config.unet``."""
    shapes = traverse_util.flatten_dict(multiview_param_shapes(config))
    given = traverse_util.flatten_dict(dict(unet_params))
    bad = [f"{'/'.join(p)} {tuple(np.shape(v))}" for p, v in given.items()
           if p not in shapes or tuple(np.shape(v)) != shapes[p].shape]
    if bad:
        raise ValueError(f"The plain UNet params do not fit the multi-view config: {bad[:3]} (of {len(bad)}).")
    keys = jax.random.split(rng, len(shapes))
    out = {}
    for key, (path, s) in zip(keys, sorted(shapes.items()), strict=True):
        if path in given:
            out[path] = np.asarray(given[path])
        elif path[-2] in ("to_k_ip", "to_v_ip"):
            out[path] = np.asarray(given[(*path[:-2], "to_k" if path[-2] == "to_k_ip" else "to_v", path[-1])])
        elif path[0] == "reference_proj" or path[-2:-1] == ("linear_2",) or path[-1] == "bias":
            out[path] = np.zeros(s.shape, np.float32)
        else:  # class_embedding.linear_1: LeCun normal
            out[path] = np.asarray(nn.initializers.lecun_normal()(key, s.shape, jnp.float32))
    return traverse_util.unflatten_dict(out)
