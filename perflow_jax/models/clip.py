"""CLIP text encoders (Stable Diffusion's text_encoder / SDXL's text_encoder_2) in Flax.

Numerically matches transformers' ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` and keeps the parameter
names of the former ``FlaxCLIPTextModel`` (``text_model/encoder/layers/0/self_attn/q_proj/kernel``, ...), so
both PyTorch safetensors and old ``flax_model.msgpack`` checkpoints map onto it. Norms and the attention
softmax run in float32 whatever the compute ``dtype``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Collection, Mapping
from typing import Any, NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from perflow_jax import values
from perflow_jax.models.config_io import config_from_json
from perflow_jax.models.convert import load_params
from perflow_jax.models.shape_cache import cached_param_shapes

HIDDEN_ACTS = ("quick_gelu", "gelu")
LEGACY_EOS_TOKEN_ID = 2  # configs written before transformers PR #24773 pool at argmax(input_ids)


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The fields of transformers' text-encoder ``config.json`` that the forward pass uses."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    architectures: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers",
                     "num_attention_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
                raise ValueError(f"CLIPTextConfig.{name} must be a positive integer, got {value!r}.")
        if self.hidden_act not in HIDDEN_ACTS:
            raise ValueError(
                f"Unsupported CLIP hidden_act {self.hidden_act!r}; expected one of {HIDDEN_ACTS} "
                "(quick_gelu for OpenAI CLIP / SD1, gelu for OpenCLIP / SD2 and SDXL)."
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}."
            )
        if not values.check_float("CLIPTextConfig.layer_norm_eps", self.layer_norm_eps) > 0:
            raise ValueError(f"layer_norm_eps must be positive, got {self.layer_norm_eps!r}.")
        values.check_int("CLIPTextConfig.eos_token_id", self.eos_token_id, min_value=0)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CLIPTextConfig:
        """Build from a transformers ``CLIPTextConfig`` dict, ignoring keys the forward pass does not use."""
        if not isinstance(d, Mapping):
            raise TypeError(f"CLIPTextConfig.from_dict expects a mapping, got {type(d).__name__}.")
        if "text_config" in d:
            raise ValueError(
                "This is a full CLIPModel config (it has 'text_config'); point to a text encoder folder "
                "(e.g. a pipeline's text_encoder/) instead."
            )
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names and v is not None}
        if "architectures" in kwargs:
            kwargs["architectures"] = tuple(kwargs["architectures"])
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> CLIPTextConfig:
        """Read ``config.json`` (or the folder holding it); errors name the file."""
        return config_from_json(cls.from_dict, path)


class CLIPTextOutput(NamedTuple):
    """Encoder outputs (all ``(B, L, D)`` unless noted).

    Attributes:
      last_hidden_state: final-layer-norm output.
      hidden_states: embeddings output then each layer's output (before the final norm), ``num_layers + 1``
        entries, as transformers' ``output_hidden_states=True`` (SDXL uses ``hidden_states[-2]``).
      pooled_output: ``(B, D)`` final-layer-norm output at each row's EOS token.
      text_embeds: ``(B, projection_dim)`` projected pooled output (``CLIPTextModelWithProjection`` only).
    """

    last_hidden_state: jax.Array
    hidden_states: tuple[jax.Array, ...]
    pooled_output: jax.Array
    text_embeds: jax.Array | None = None


# ----------------------------------------------------------------------------------------------------------
# Public models
# ----------------------------------------------------------------------------------------------------------


class CLIPTextModel(nn.Module):
    """CLIP text transformer: ``input_ids (B, L) → CLIPTextOutput`` (causal attention).

    Attributes:
      config: the encoder config.
      dtype: compute dtype (layer norms and softmax always run in float32).
      param_dtype: dtype of freshly initialised params.
    """

    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> CLIPTextOutput:
        """Encode token ids; `attention_mask` (B, L) marks real tokens (1) vs padding (0)."""
        return _TextTransformer(self.config, self.dtype, self.param_dtype, name="text_model")(
            input_ids, attention_mask
        )


class CLIPTextModelWithProjection(nn.Module):
    """:class:`CLIPTextModel` plus a bias-free ``text_projection`` of the pooled output (SDXL encoder 2)."""

    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> CLIPTextOutput:
        """Encode token ids and fill ``text_embeds``; arguments as :meth:`CLIPTextModel.__call__`."""
        out = _TextTransformer(self.config, self.dtype, self.param_dtype, name="text_model")(
            input_ids, attention_mask
        )
        projection = nn.Dense(self.config.projection_dim, use_bias=False, dtype=self.dtype,
                              param_dtype=self.param_dtype, name="text_projection")
        return out._replace(text_embeds=projection(out.pooled_output))


def load_clip_text_model(
    folder: str | os.PathLike,
    dtype: Any = None,
    with_projection: bool | None = None,
    variant: str | None = None,
    allow_pickle: bool = False,
) -> tuple[CLIPTextConfig, dict]:
    """Read ``config.json`` and ``model[.variant].safetensors`` (a sharded index, or a converted
    ``flax_model.msgpack``) from `folder`.

    Args:
      folder: a transformers text encoder folder (e.g. a pipeline's ``text_encoder``).
      dtype: dtype the params are cast to (default: keep the file's).
      with_projection: build params for :class:`CLIPTextModelWithProjection`; ``None`` decides from the
        config's ``architectures`` (or, if absent, from whether the file has ``text_projection.weight``).
        ``False`` on a with-projection file drops the projection weight.
      variant: weights variant such as ``"fp16"``.
      allow_pickle: allow a ``.bin`` PyTorch pickle (needs torch; trusted files only).

    Returns:
      ``(config, params)`` where ``params`` is the ``"params"`` collection for the chosen model class.
    """
    folder = os.fspath(folder)
    config = CLIPTextConfig.from_json(folder)
    if with_projection is None and config.architectures:
        with_projection = "CLIPTextModelWithProjection" in config.architectures
    drop_projection = with_projection is not None and not with_projection
    ignore = [r"(^|\.)position_ids$"] + ([r"^text_projection\."] if drop_projection else [])
    what = "CLIP text encoder" if with_projection is None else _model_class(with_projection).__name__

    def target(names: Collection[str]) -> dict:  # without architectures, the file decides
        projection = ("text_projection.weight" in names or "text_projection" in names) if with_projection is None \
            else with_projection
        return clip_param_shapes(config, projection)

    params = load_params(folder, "model", target, variant=variant, allow_pickle=allow_pickle,
                         rename=rename_clip_torch_key, ignore=ignore, dtype=dtype, what=what)
    return config, jax.tree_util.tree_map(jnp.asarray, params)


def clip_param_shapes(config: CLIPTextConfig, projection: bool) -> dict:
    """The params tree of ``CLIPTextModel`` (or, with `projection`, ``...WithProjection``) as
    ``jax.ShapeDtypeStruct`` leaves, without allocating anything (traced once per config:
    :func:`~perflow_jax.models.shape_cache.cached_param_shapes`)."""

    def trace() -> dict:
        model = _model_class(projection)(config)
        ids = jax.ShapeDtypeStruct((1, config.max_position_embeddings), jnp.int32)
        return jax.eval_shape(model.init, jax.random.key(0), ids)["params"]

    return cached_param_shapes("clip-projection" if projection else "clip", config, trace)


def _model_class(projection: bool) -> type[nn.Module]:
    return CLIPTextModelWithProjection if projection else CLIPTextModel


def rename_clip_torch_key(key: str) -> str:
    """transformers ≥ 5 saves a bare ``CLIPTextModel`` without the ``text_model.`` prefix; add it back."""
    if key.startswith(("text_model.", "text_projection.")):
        return key
    return "text_model." + key


# ----------------------------------------------------------------------------------------------------------
# Building blocks (names follow transformers' former FlaxCLIP* modules)
# ----------------------------------------------------------------------------------------------------------


def layer_norm(config: Any, name: str, param_dtype: jnp.dtype) -> nn.LayerNorm:
    """Float32 LayerNorm (eps ``config.layer_norm_eps``) with PyTorch's two-pass variance; shared with the vision
    encoder (:mod:`perflow_jax.models.clip_vision`)."""
    return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=jnp.float32, param_dtype=param_dtype,
                        use_fast_variance=False, name=name)


class _TextTransformer(nn.Module):
    config: CLIPTextConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None) -> CLIPTextOutput:
        cfg = self.config
        chex.assert_rank(input_ids, 2, custom_message="input_ids must be (batch, seq_len)")
        chex.assert_type(input_ids, int, custom_message="input_ids must be integer token ids")
        seq_len = input_ids.shape[1]
        if seq_len > cfg.max_position_embeddings:
            raise ValueError(
                f"Sequence length {seq_len} exceeds max_position_embeddings {cfg.max_position_embeddings}."
            )
        if attention_mask is not None:
            chex.assert_equal_shape((input_ids, attention_mask),
                                    custom_message="attention_mask must have the shape of input_ids")

        hidden = _Embeddings(cfg, self.dtype, self.param_dtype, name="embeddings")(input_ids)
        hidden_states = Encoder(cfg, self.dtype, self.param_dtype, name="encoder")(hidden, attention_mask)
        last = layer_norm(cfg, "final_layer_norm", self.param_dtype)(hidden_states[-1]).astype(self.dtype)

        if cfg.eos_token_id == LEGACY_EOS_TOKEN_ID:  # legacy rule: the EOS token has the highest id
            eos_pos = jnp.argmax(input_ids, axis=-1)
        else:  # first occurrence of eos_token_id (padding may reuse the EOS id)
            eos_pos = jnp.argmax((input_ids == cfg.eos_token_id).astype(jnp.int32), axis=-1)
        pooled = jnp.take_along_axis(last, eos_pos[:, None, None], axis=1)[:, 0]
        return CLIPTextOutput(last, hidden_states, pooled)


class _Embeddings(nn.Module):
    config: CLIPTextConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        cfg = self.config
        token = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                         name="token_embedding")
        position = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=self.dtype,
                            param_dtype=self.param_dtype, name="position_embedding")
        positions = jnp.arange(input_ids.shape[1])[None]
        return token(input_ids) + position(positions)


class Encoder(nn.Module):
    """The CLIP transformer encoder (pre-norm layers of attention and MLP), shared by the text encoder (causal)
    and the vision encoder (``causal=False``). Returns the input, then each layer's output.

    `config` is any CLIP config with ``hidden_size``, ``intermediate_size``, ``num_attention_heads``,
    ``num_hidden_layers``, ``hidden_act`` and ``layer_norm_eps``.
    """

    config: Any
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    causal: bool = True

    @nn.compact
    def __call__(self, hidden: jax.Array, attention_mask: jax.Array | None = None) -> tuple[jax.Array, ...]:
        layers = _LayerCollection(self.config, self.dtype, self.param_dtype, self.causal, name="layers")
        return layers(hidden, attention_mask)


class _LayerCollection(nn.Module):
    """Holds layers named ``"0"``, ``"1"``, ... (so the param path is ``encoder/layers/0/...``)."""

    config: Any
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    causal: bool = True

    @nn.compact
    def __call__(self, hidden: jax.Array, attention_mask: jax.Array | None) -> tuple[jax.Array, ...]:
        seq_len = hidden.shape[1]
        mask = jnp.tril(jnp.ones((seq_len, seq_len), dtype=bool))[None, None] if self.causal else None
        if attention_mask is not None:
            padding = (attention_mask > 0)[:, None, None, :]
            mask = padding if mask is None else mask & padding
        states = [hidden]
        for i in range(self.config.num_hidden_layers):
            hidden = _EncoderLayer(self.config, self.dtype, self.param_dtype, name=str(i))(hidden, mask)
            states.append(hidden)
        return tuple(states)


class _EncoderLayer(nn.Module):
    config: Any
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, hidden: jax.Array, mask: jax.Array | None) -> jax.Array:
        cfg = self.config
        h = layer_norm(cfg, "layer_norm1", self.param_dtype)(hidden).astype(self.dtype)
        hidden = hidden + _Attention(cfg, self.dtype, self.param_dtype, name="self_attn")(h, mask)
        h = layer_norm(cfg, "layer_norm2", self.param_dtype)(hidden).astype(self.dtype)
        return hidden + _MLP(cfg, self.dtype, self.param_dtype, name="mlp")(h)


class _Attention(nn.Module):
    config: Any
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, hidden: jax.Array, mask: jax.Array | None) -> jax.Array:
        cfg = self.config
        heads = cfg.num_attention_heads
        b, l, d = hidden.shape

        def proj(name: str) -> nn.Dense:
            return nn.Dense(d, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

        q, k, v = (proj(n)(hidden).reshape(b, l, heads, d // heads) for n in ("q_proj", "k_proj", "v_proj"))
        out = jax.nn.dot_product_attention(q, k, v, mask=mask)  # logits and softmax in float32
        return proj("out_proj")(out.reshape(b, l, d))


class _MLP(nn.Module):
    config: Any
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, hidden: jax.Array) -> jax.Array:
        cfg = self.config
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.Dense(cfg.intermediate_size, name="fc1", **dense)(hidden)
        if cfg.hidden_act == "quick_gelu":
            h = h * jax.nn.sigmoid(1.702 * h)
        else:
            h = jax.nn.gelu(h, approximate=False)
        return nn.Dense(cfg.hidden_size, name="fc2", **dense)(h)
