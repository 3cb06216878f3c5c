"""Flax ``ControlNetModel`` numerically matching diffusers' PyTorch model (SD1.x, SD2.x, SDXL layouts).

A ControlNet is the UNet's encoder half (``conv_in``, down blocks, mid block, same time/SDXL embeddings) plus
a conditioning embedding of the control image (added after ``conv_in``) and one zero-initialised 1×1 conv per
skip connection (``controlnet_down_blocks_i``) and for the mid block (``controlnet_mid_block``). Its outputs
are residuals the UNet adds to its skips and mid block (:class:`perflow_jax.models.adapter.UNetCondition`'s
``down_residuals`` / ``mid_residual``).

:class:`ControlNetModel` subclasses the Flax UNet to reuse its blocks, embeddings and attention settings, so
the two cannot drift apart. Parameter names follow diffusers' former Flax ControlNet
(``controlnet_cond_embedding/blocks_0``, ``controlnet_down_blocks_0``...), which normalise to the PyTorch
names, so :func:`load_controlnet` converts a diffusers folder with the generic loader
(:func:`perflow_jax.models.convert.load_params`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from perflow_jax.models import adapter
from perflow_jax.models.adapter import UNetCondition
from perflow_jax.models.convert import load_params
from perflow_jax.models.layers import conv2d
from perflow_jax.models.unet import UNet2DConditionModel, UNetConfig

Dtype = Any

__all__ = ["ControlNetConfig", "ControlNetModel", "check_compatible", "controlnet_apply",
           "controlnet_param_shapes", "init_controlnet_params", "load_controlnet"]

_UP_FOR_DOWN = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}


@dataclasses.dataclass(frozen=True)
class ControlNetConfig(UNetConfig):
    """diffusers' ``ControlNetModel`` config: the UNet fields it shares (same names, defaults and checks) plus
    the control image's channels and channel order, the conditioning embedding's widths and global pooling.

    A ControlNet config has no up blocks; ``up_block_types`` mirrors ``down_block_types`` so the shared UNet
    checks apply (the up blocks are never built).
    """

    conditioning_channels: int = 3
    controlnet_conditioning_channel_order: str = "rgb"
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    global_pool_conditions: bool = False

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ControlNetConfig:
        """From a diffusers ControlNet config dict (a config of another model class is refused)."""
        d = dict(d)
        if d.get("_class_name", "ControlNetModel") != "ControlNetModel":
            raise ValueError(f"This config describes a {d['_class_name']}, not a ControlNetModel; pass a ControlNet "
                             "folder (its config.json has \"_class_name\": \"ControlNetModel\").")
        if "up_block_types" not in d:
            down = d.get("down_block_types", cls.down_block_types)
            if isinstance(down, list | tuple):
                d["up_block_types"] = [_UP_FOR_DOWN.get(t, t) for t in reversed(down)]
        return super().from_dict(d)  # type: ignore[return-value]

    @classmethod
    def from_unet(cls, unet: UNetConfig, **overrides: Any) -> ControlNetConfig:
        """The config of a ControlNet built on `unet` (as diffusers' ``ControlNetModel.from_unet``): its encoder
        settings and diffusers' ControlNet defaults, overridden by `overrides`."""
        fields = {f.name for f in dataclasses.fields(UNetConfig)}
        return cls(**{k: v for k, v in unet.to_dict().items() if k in fields}, **overrides)

    def __post_init__(self) -> None:
        super().__post_init__()
        ch = self.conditioning_embedding_out_channels
        if not (isinstance(ch, tuple) and ch and all(isinstance(c, int) and not isinstance(c, bool) and c > 0
                                                     for c in ch)):
            raise ValueError(f"ControlNet config conditioning_embedding_out_channels must be a list of positive "
                             f"integers, got {ch!r}.")
        c = self.conditioning_channels
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise ValueError(f"ControlNet config conditioning_channels must be a positive integer, got {c!r}.")
        if self.controlnet_conditioning_channel_order not in ("rgb", "bgr"):
            raise ValueError(f"ControlNet config controlnet_conditioning_channel_order must be 'rgb' or 'bgr', got "
                             f"{self.controlnet_conditioning_channel_order!r}.")
        if not isinstance(self.global_pool_conditions, bool):
            raise ValueError(f"ControlNet config global_pool_conditions must be true or false, got "
                             f"{self.global_pool_conditions!r}.")

    @property
    def image_factor(self) -> int:
        """How much the conditioning embedding downsamples the control image (8 in every SD ControlNet)."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)


def check_compatible(config: ControlNetConfig, unet: UNetConfig, what: str = "ControlNet") -> None:
    """Refuse a ControlNet whose residuals cannot feed this UNet (another family: SD1 vs SD2 vs SDXL), naming
    the differing settings."""
    diff = [f"{f} {config.per_block(f)!r} vs the UNet's {unet.per_block(f)!r}"
            for f in ("layers_per_block", "cross_attention_dim") if config.per_block(f) != unet.per_block(f)]
    diff += [f"{f} {getattr(config, f)!r} vs the UNet's {getattr(unet, f)!r}"
             for f in ("block_out_channels", "down_block_types", "in_channels", "addition_embed_type")
             if getattr(config, f) != getattr(unet, f)]
    if diff:
        raise ValueError(f"{what} does not fit this model's UNet (a ControlNet of another model family?): "
                         f"{'; '.join(diff)}.")


class ControlNetConditioningEmbedding(nn.Module):
    """diffusers ``ControlNetConditioningEmbedding``: ``conv_in``, then per width step a 3×3 conv and a stride-2
    3×3 conv (``blocks_2i``, ``blocks_2i+1``), SiLU after each, and the zero conv ``conv_out``."""

    out_channels: int
    block_out_channels: tuple[int, ...]
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ch = self.block_out_channels
        x = nn.silu(conv2d(ch[0], 3, self.dtype, "conv_in")(x))
        for i in range(len(ch) - 1):
            x = nn.silu(conv2d(ch[i], 3, self.dtype, f"blocks_{2 * i}")(x))
            x = nn.silu(conv2d(ch[i + 1], 3, self.dtype, f"blocks_{2 * i + 1}", stride=2)(x))
        return conv2d(self.out_channels, 3, self.dtype, "conv_out")(x)


class ControlNetModel(UNet2DConditionModel):
    """diffusers ``ControlNetModel`` in Flax (NCHW in and out, NHWC inside); attributes as the UNet's."""

    config: ControlNetConfig

    @nn.compact
    def __call__(  # type: ignore[override]
        self,
        sample: jax.Array,
        timesteps: jax.Array | float | int,
        encoder_hidden_states: jax.Array,
        controlnet_cond: jax.Array,
        conditioning_scale: jax.typing.ArrayLike = 1.0,
        guess_mode: bool = False,
        added_cond_kwargs: Mapping[str, jax.Array] | None = None,
        class_labels: jax.Array | None = None,
    ) -> tuple[tuple[jax.Array, ...], jax.Array]:
        """Residuals for the UNet at ``(sample, timesteps)`` given a control image.

        Args:
          sample, timesteps, encoder_hidden_states, added_cond_kwargs, class_labels: as the UNet's.
          controlnet_cond: ``(B, conditioning_channels, H·f, W·f)`` control images in [0, 1] (f = 8 for SD).
          conditioning_scale: scalar (traced) multiplying every residual.
          guess_mode: (static) scale the residuals from 0.1 (first skip) to 1 (mid block) on a log scale, as
            diffusers does; also implied by ``global_pool_conditions``.

        Returns:
          ``(down_residuals, mid_residual)``, NCHW in ``dtype``.
        """
        cfg = self.config
        chex.assert_rank(sample, 4, custom_message="ControlNet `sample` must be (B, C, H, W)")
        b, _, h, w = sample.shape
        f = cfg.image_factor
        chex.assert_shape(controlnet_cond, (b, cfg.conditioning_channels, h * f, w * f),
                          custom_message=f"ControlNet `controlnet_cond` must be (B, {cfg.conditioning_channels}, "
                                         f"{f}·H, {f}·W) for latents (B, C, H, W)")
        chex.assert_shape(encoder_hidden_states, (b, None, cfg.encoder_dim),
                          custom_message="ControlNet `encoder_hidden_states` must be (B, L, cross_attention_dim)")
        if cfg.controlnet_conditioning_channel_order == "bgr":
            controlnet_cond = jnp.flip(controlnet_cond, axis=1)

        emb = self._embedding(timesteps, b, added_cond_kwargs, class_labels)
        context = encoder_hidden_states.astype(self.dtype)
        x = jnp.transpose(sample, (0, 2, 3, 1)).astype(self.dtype)
        x = conv2d(cfg.block_out_channels[0], cfg.conv_in_kernel, self.dtype, "conv_in")(x)
        hint = jnp.transpose(controlnet_cond, (0, 2, 3, 1)).astype(self.dtype)
        x = x + ControlNetConditioningEmbedding(cfg.block_out_channels[0], cfg.conditioning_embedding_out_channels,
                                                self.dtype, name="controlnet_cond_embedding")(hint)

        x, skips = self._down_and_mid(x, emb, context)
        down = [conv2d(s.shape[-1], 1, self.dtype, f"controlnet_down_blocks_{i}")(s) for i, s in enumerate(skips)]
        mid = conv2d(x.shape[-1], 1, self.dtype, "controlnet_mid_block")(x)

        scale = jnp.asarray(conditioning_scale, jnp.float32)
        if guess_mode and not cfg.global_pool_conditions:
            # diffusers: torch.logspace(-1, 0, len(down) + 1), in float32.
            scales = np.logspace(-1, 0, len(down) + 1).astype(np.float32)
            down = [d * (s * scale).astype(d.dtype) for d, s in zip(down, scales[:-1], strict=True)]
            mid = mid * (scales[-1] * scale).astype(mid.dtype)
        else:
            down = [d * scale.astype(d.dtype) for d in down]
            mid = mid * scale.astype(mid.dtype)
        if cfg.global_pool_conditions:
            down = [jnp.mean(d, axis=(1, 2), keepdims=True) for d in down]
            mid = jnp.mean(mid, axis=(1, 2), keepdims=True)
        nchw = lambda a: jnp.transpose(a, (0, 3, 1, 2))  # noqa: E731
        return tuple(nchw(d) for d in down), nchw(mid)


def controlnet_apply(module: ControlNetModel, params: Any, x: jax.Array, timesteps: jax.typing.ArrayLike,
                     cond: UNetCondition, image: jax.Array, scale: jax.typing.ArrayLike = 1.0,
                     guess_mode: bool = False) -> tuple[tuple[jax.Array, ...], jax.Array]:
    """Run a Flax ControlNet like :func:`~perflow_jax.models.adapter.unet_apply` runs the UNet: `x` (B, C, H, W)
    at `timesteps` under `cond`'s text (and SDXL) condition, with control `image` (B, 3, f·H, f·W) in [0, 1].
    Returns NCHW ``(down_residuals, mid_residual)``, the residuals a :class:`UNetCondition` carries."""
    t, context, added = adapter.model_inputs(module, x, timesteps, cond)
    return module.apply({"params": params}, x, t, context, image, scale, guess_mode, added_cond_kwargs=added,
                        class_labels=cond.class_labels)


# ----------------------------------------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------------------------------------


def _init_fn(config: ControlNetConfig) -> Any:
    """``rng → variables`` of a ControlNet on its smallest valid inputs (batch 1)."""
    s = 2 ** (len(config.block_out_channels) - 1)
    f = config.image_factor
    cond = UNetCondition(encoder_hidden_states=jnp.zeros((1, 1, config.encoder_dim)))
    if config.addition_embed_type == "text_time":
        p = config.projection_class_embeddings_input_dim - config.addition_time_embed_dim
        cond = cond._replace(text_embeds=jnp.zeros((1, p)), time_ids=jnp.zeros((1, 1)))
    if config.num_class_embeds is not None:
        cond = cond._replace(class_labels=jnp.zeros((1,), jnp.int32))
    model = ControlNetModel(config)
    x = jnp.zeros((1, config.in_channels, s, s))
    image = jnp.zeros((1, config.conditioning_channels, s * f, s * f))

    def init(rng: jax.Array) -> Any:
        t, context, added = adapter.model_inputs(model, x, 0, cond)
        return model.init(rng, x, t, context, image, added_cond_kwargs=added, class_labels=cond.class_labels)

    return init


def controlnet_param_shapes(config: ControlNetConfig) -> dict:
    """The params tree as ``jax.ShapeDtypeStruct`` leaves (float32), without allocating anything."""
    return jax.eval_shape(_init_fn(config), jax.random.key(0))["params"]


def init_controlnet_params(config: ControlNetConfig, rng: jax.Array) -> dict:
    """Randomly initialised float32 params (Flax default initialisers; the zero convs are not zero), e.g. for
    benchmarks."""
    return jax.jit(_init_fn(config))(rng)["params"]


def load_controlnet(folder: str | os.PathLike, dtype: Dtype | None = None, variant: str | None = None,
                    allow_pickle: bool = False) -> tuple[ControlNetConfig, dict]:
    """Load a diffusers ControlNet folder: ``config.json`` + ``diffusion_pytorch_model[.variant].safetensors``
    (``.bin`` only with `allow_pickle`), or a converted ``flax_model.msgpack``; strict like :func:`load_unet`.

    Returns:
      ``(config, params)`` for ``ControlNetModel(config)``.
    """
    folder = os.fspath(folder)
    config = ControlNetConfig.from_json(folder)
    params = load_params(folder, "diffusion_pytorch_model", controlnet_param_shapes(config), variant=variant,
                         allow_pickle=allow_pickle, dtype=dtype, what="ControlNet")
    return config, params
