"""The one way to call a UNet: a condition pytree and :func:`unet_apply`.

Pipelines, the PF-ODE solver and the trainer all see a model as ``model_fn(x, timesteps, cond) -> output``
(float32), with ``cond`` a :class:`UNetCondition`. This module builds that function from a Flax
:class:`~perflow_jax.models.unet.UNet2DConditionModel` and its params, so no caller branches on SD vs SDXL
vs class-conditional models, and SDXL's added time ids are built in one place (:func:`sdxl_time_ids`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

ModelFn = Callable[[jax.Array, jax.Array, "UNetCondition"], jax.Array]


class UNetCondition(NamedTuple):
    """What a UNet is conditioned on, batched like the sample (a pytree; absent parts are None).

    Attributes:
      encoder_hidden_states: (B, L, cross_attention_dim) text embeddings. None means one zero token (the
        built-in class-conditional digits model has no text).
      text_embeds: SDXL's pooled text embedding (B, P).
      time_ids: SDXL's added time ids (B, 6), from :func:`sdxl_time_ids`.
      class_labels: (B,) integer labels for class-conditional UNets (``num_class_embeds``).
      down_residuals: ControlNet residuals added to the UNet's skip connections, one (B, C, H, W) per skip.
      mid_residual: ControlNet residual added to the mid block's output, (B, C, H, W).
      ip_tokens: (B, Li, cross_attention_dim) IP-Adapter image tokens (:mod:`perflow_jax.models.ip_adapter`);
        the UNet params must carry the adapter's ``to_k_ip``/``to_v_ip`` layers.
      ip_scale: (B,) float32 weight of the image tokens (traced; None means 1).
    """

    encoder_hidden_states: jax.Array | None = None
    text_embeds: jax.Array | None = None
    time_ids: jax.Array | None = None
    class_labels: jax.Array | None = None
    down_residuals: tuple[jax.Array, ...] | None = None
    mid_residual: jax.Array | None = None
    ip_tokens: jax.Array | None = None
    ip_scale: jax.Array | None = None

    @classmethod
    def from_mapping(cls, cond: Mapping[str, Any] | UNetCondition) -> UNetCondition:
        """From a dict with the field names (unknown keys are an error, so typos do not pass silently)."""
        if isinstance(cond, UNetCondition):
            return cond
        unknown = set(cond) - set(cls._fields)
        if unknown:
            raise ValueError(f"Unknown UNet condition keys {sorted(unknown)}; expected some of {cls._fields}.")
        return cls(**dict(cond))


def sdxl_time_ids(batch: int, original_size: Any, crop_top_left: Any = (0, 0), target_size: Any = None
                  ) -> jax.Array:
    """SDXL's added time ids per sample, (B, 6) float32: original (h, w), crop top-left (y, x), target (h, w).

    Sizes may be ints, (h, w) pairs or traced arrays; `target_size` defaults to `original_size` (what
    diffusers' pipelines pass for text-to-image).
    """

    def pair(v: Any) -> jax.Array:
        v = jnp.asarray(v, jnp.float32)
        return jnp.broadcast_to(v, (2,)) if v.ndim == 0 else v.reshape(2)

    original = pair(original_size)
    target = original if target_size is None else pair(target_size)
    ids = jnp.concatenate([original, pair(crop_top_left), target])
    return jnp.broadcast_to(ids, (batch, 6))


def model_inputs(module: Any, x: jax.Array, timesteps: jax.typing.ArrayLike, cond: UNetCondition
                 ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array] | None]:
    """The ``(timesteps (B,), encoder_hidden_states, added_cond_kwargs)`` a UNet-shaped module (UNet or
    ControlNet) takes for `x` under `cond`; a zero token stands in for absent text."""
    b = x.shape[0]
    t = jnp.broadcast_to(jnp.asarray(timesteps), (b,))
    context = cond.encoder_hidden_states
    if context is None:
        context = jnp.zeros((b, 1, module.config.encoder_dim), module.dtype)
    added = None
    if cond.text_embeds is not None or cond.time_ids is not None:
        if cond.text_embeds is None or cond.time_ids is None:
            raise ValueError("An SDXL condition needs both text_embeds and time_ids.")
        added = {"text_embeds": cond.text_embeds, "time_ids": cond.time_ids}
    return t, context, added


def unet_apply(module: Any, params: Any, x: jax.Array, timesteps: jax.typing.ArrayLike,
               cond: UNetCondition | Mapping[str, Any]) -> jax.Array:
    """Run a Flax UNet on `x` (B, C, H, W) at `timesteps` (scalar or (B,)) under `cond`; float32 output.

    `module` is a :class:`~perflow_jax.models.unet.UNet2DConditionModel` (its ``config.encoder_dim`` sizes
    the zero token used when `cond` has no text). ControlNet residuals in `cond` are added to the UNet's skips;
    IP-Adapter image tokens go to the adapter's decoupled cross-attention.
    """
    cond = UNetCondition.from_mapping(cond)
    t, context, added = model_inputs(module, x, timesteps, cond)
    image = {}
    if cond.ip_tokens is not None:  # only then: a UNet without image tokens keeps its exact program
        if not _has_ip_layers(params):
            raise ValueError("The condition has IP-Adapter image tokens but the UNet params have no to_k_ip/"
                             "to_v_ip layers; merge the adapter first (perflow_jax.models.ip_adapter).")
        image = {"ip_tokens": cond.ip_tokens, "ip_scale": cond.ip_scale}
    elif cond.ip_scale is not None:
        raise ValueError("The condition has an ip_scale but no ip_tokens.")
    out = module.apply({"params": params}, x, t, context, added_cond_kwargs=added, class_labels=cond.class_labels,
                       down_block_additional_residuals=cond.down_residuals,
                       mid_block_additional_residual=cond.mid_residual, **image)
    return out.astype(jnp.float32)


def _has_ip_layers(params: Any) -> bool:
    """Whether some transformer block's ``attn2`` carries IP-Adapter layers (searched depth-first, cheaply)."""
    if not isinstance(params, Mapping):
        return False
    return "to_k_ip" in params or any(_has_ip_layers(v) for v in params.values())


def unet_fn(module: Any, params: Any) -> ModelFn:
    """``model_fn(x, timesteps, cond)`` over a UNet module and fixed params (see :func:`unet_apply`)."""

    def fn(x: jax.Array, timesteps: jax.Array, cond: UNetCondition) -> jax.Array:
        return unet_apply(module, params, x, timesteps, cond)

    return fn


__all__ = ["ModelFn", "UNetCondition", "model_inputs", "sdxl_time_ids", "unet_apply", "unet_fn"]
