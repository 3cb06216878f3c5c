"""Building blocks shared by the Flax UNet and VAE, matching diffusers' PyTorch math.

All modules take and return NHWC tensors (``(B, H, W, C)``) or token tensors ``(B, L, C)``. ``dtype`` is the
compute dtype; normalisations and the attention softmax always run in float32 so that bf16/fp16 compute stays
close to the float32 reference.

Parameter names follow the former diffusers Flax classes (``norm1``, ``conv1``, ``time_emb_proj``,
``conv_shortcut``, ``conv``; attention ``to_q``/``to_k``/``to_v``/``to_out_0`` as in the Flax UNet, or
``query``/``key``/``value``/``proj_attn`` as in the Flax VAE), so that
:mod:`perflow_jax.models.keymap` maps PyTorch checkpoints onto them generically; the VAE naming needs
:func:`perflow_jax.models.keymap.rename_torch_attention`.
"""

from __future__ import annotations

from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Dtype = Any
AttentionImpl = Literal["xla", "cudnn"] | None

__all__ = [
    "IP_ATTENTION_NAMES",
    "UNET_ATTENTION_NAMES",
    "VAE_ATTENTION_NAMES",
    "Attention",
    "Conv2D",
    "Downsample2D",
    "GroupNorm",
    "LayerNorm",
    "ResnetBlock2D",
    "Upsample2D",
    "attention",
    "conv2d",
    "group_norm",
    "uses_im2col_on_cpu",
]


# ----------------------------------------------------------------------------------------------------------
# Normalisation (float32 whatever the activation dtype)
# ----------------------------------------------------------------------------------------------------------


def group_norm(x: jax.Array, num_groups: int, eps: float, scale: jax.Array | None = None,
               bias: jax.Array | None = None) -> jax.Array:
    """GroupNorm over the last (channel) axis of ``(B, ..., C)``, computed in float32, returned in x.dtype.

    Same math as ``torch.nn.GroupNorm``: per-sample, per-group mean and biased variance over all spatial
    positions and the group's channels (two-pass variance, not E[x²]−E[x]², for PyTorch parity).
    """
    b, c = x.shape[0], x.shape[-1]
    if c % num_groups:
        raise ValueError(f"GroupNorm: {c} channels are not divisible by num_groups={num_groups}.")
    h = x.astype(jnp.float32).reshape(b, -1, num_groups, c // num_groups)
    mean = h.mean(axis=(1, 3), keepdims=True)
    var = jnp.square(h - mean).mean(axis=(1, 3), keepdims=True)
    h = ((h - mean) * lax.rsqrt(var + eps)).reshape(x.shape)
    if scale is not None:
        h = h * scale.astype(jnp.float32)
    if bias is not None:
        h = h + bias.astype(jnp.float32)
    return h.astype(x.dtype)


class GroupNorm(nn.Module):
    """Affine GroupNorm (params ``scale``, ``bias``) computed in float32; see :func:`group_norm`."""

    num_groups: int = 32
    epsilon: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        return group_norm(x, self.num_groups, self.epsilon, scale, bias)


class LayerNorm(nn.Module):
    """Affine LayerNorm over the last axis (params ``scale``, ``bias``), float32 compute, PyTorch eps 1e-5."""

    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        h = x.astype(jnp.float32)
        mean = h.mean(axis=-1, keepdims=True)
        var = jnp.square(h - mean).mean(axis=-1, keepdims=True)
        h = (h - mean) * lax.rsqrt(var + self.epsilon)
        return (h * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


# ----------------------------------------------------------------------------------------------------------
# Convolutional blocks
# ----------------------------------------------------------------------------------------------------------


# XLA:CPU runs k×k convolutions on tiny feature maps up to ~100× slower than the same product written as
# im2col + one matmul (SD1.5's bottom levels at low resolution: 2×2 maps with 1280 channels; see
# docs/benchmarks.md). Measured on 2 cores, im2col wins on maps of ≤ 4 positions at any width and on maps of
# ≤ 64 positions with ≥ 512 input channels; elsewhere XLA's own kernel is as fast or faster. GPUs and TPUs
# always keep the native convolution.
TINY_CONV_MAX_POSITIONS = 4
SMALL_CONV_MAX_POSITIONS = 64
SMALL_CONV_MIN_CHANNELS = 512


def uses_im2col_on_cpu(kernel_size: tuple[int, int], out_hw: tuple[int, int], in_channels: int) -> bool:
    """Whether :class:`Conv2D` lowers this convolution as im2col + matmul on CPU (the rule above)."""
    positions = out_hw[0] * out_hw[1]
    if kernel_size[0] * kernel_size[1] == 1:
        return False
    return positions <= TINY_CONV_MAX_POSITIONS or (
        positions <= SMALL_CONV_MAX_POSITIONS and in_channels >= SMALL_CONV_MIN_CHANNELS)


def _conv_native(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
                 padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _conv_im2col(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
                 padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    """The same convolution as one ``(B·Ho·Wo, kh·kw·Cin) @ (kh·kw·Cin, Cout)`` matmul over gathered patches."""
    kh, kw, cin, cout = kernel.shape
    (sh, sw), b = strides, x.shape[0]
    xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    ho, wo = (xp.shape[1] - kh) // sh + 1, (xp.shape[2] - kw) // sw + 1
    patches = [xp[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :] for i in range(kh) for j in range(kw)]
    cols = jnp.concatenate(patches, axis=-1).reshape(b * ho * wo, kh * kw * cin)
    return (cols @ kernel.reshape(kh * kw * cin, cout)).reshape(b, ho, wo, cout)


class Conv2D(nn.Module):
    """An NHWC convolution with ``nn.Conv``'s parameters (``kernel`` HWIO, ``bias``), init and dtype handling.

    Same math as ``nn.Conv``; only the lowering differs: on CPU, k×k (k > 1) convolutions on small maps run as
    im2col + matmul (:func:`uses_im2col_on_cpu`).
    """

    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))
    dtype: Dtype = None
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (*self.kernel_size, x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32) if self.use_bias else None
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        strides, padding = tuple(self.strides), tuple(tuple(p) for p in self.padding)
        (kh, kw), (sh, sw) = self.kernel_size, strides
        ho = (x.shape[1] + sum(padding[0]) - kh) // sh + 1
        wo = (x.shape[2] + sum(padding[1]) - kw) // sw + 1
        if uses_im2col_on_cpu((kh, kw), (ho, wo), x.shape[-1]):
            y = lax.platform_dependent(
                x, kernel, cpu=lambda a, k: _conv_im2col(a, k, strides, padding),
                default=lambda a, k: _conv_native(a, k, strides, padding))
        else:
            y = _conv_native(x, kernel, strides, padding)
        return y if bias is None else y + bias


def conv2d(features: int, kernel: int, dtype: Dtype, name: str, stride: int = 1,
           padding: Any = None) -> Conv2D:
    """A k×k :class:`Conv2D` padded like PyTorch's ``padding=(k-1)//2`` on every side (or explicit `padding`)."""
    pad = (kernel - 1) // 2
    return Conv2D(features, (kernel, kernel), strides=(stride, stride),
                  padding=((pad, pad), (pad, pad)) if padding is None else padding, dtype=dtype, name=name)


class ResnetBlock2D(nn.Module):
    """diffusers ``ResnetBlock2D`` (``time_embedding_norm="default"``, no up/down-sampling inside).

    ``out = (shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))) + time_emb_proj(silu(temb)))))) / scale``.
    The time projection exists only when ``use_time_emb`` (UNet); the VAE builds it without. ``conv_shortcut``
    (1×1) is created when the channel count changes. Dropout is 0 in SD models and omitted.
    """

    out_channels: int
    groups: int = 32
    eps: float = 1e-6
    use_time_emb: bool = True
    output_scale_factor: float = 1.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        h = nn.silu(GroupNorm(self.groups, self.eps, name="norm1")(x))
        h = conv2d(self.out_channels, 3, self.dtype, "conv1")(h)
        if self.use_time_emb:
            if temb is None:
                raise ValueError("ResnetBlock2D built with use_time_emb=True needs a time embedding `temb`.")
            t = nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = nn.silu(GroupNorm(self.groups, self.eps, name="norm2")(h))
        h = conv2d(self.out_channels, 3, self.dtype, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = conv2d(self.out_channels, 1, self.dtype, "conv_shortcut")(x)
        out = x.astype(h.dtype) + h
        return out / self.output_scale_factor if self.output_scale_factor != 1.0 else out


class Downsample2D(nn.Module):
    """Stride-2 3×3 conv named ``conv``. ``padding=1`` pads (1, 1) on each side like PyTorch's ``padding=1``;
    ``padding=0`` reproduces diffusers' VAE encoder, which pads only bottom/right by one before the conv."""

    out_channels: int
    padding: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.padding
        pad = ((0, 1), (0, 1)) if p == 0 else ((p, p), (p, p))
        return conv2d(self.out_channels, 3, self.dtype, "conv", stride=2, padding=pad)(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour upsampling (2× or to ``output_size``) followed by a 3×3 conv named ``conv``."""

    out_channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, output_size: tuple[int, int] | None = None) -> jax.Array:
        _, h, w, _ = x.shape
        if output_size is None or tuple(output_size) == (2 * h, 2 * w):
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        else:  # PyTorch 'nearest' with an explicit size: source index = floor(dst * in / out)
            oh, ow = output_size
            x = x[:, (jnp.arange(oh) * h) // oh][:, :, (jnp.arange(ow) * w) // ow]
        return conv2d(self.out_channels, 3, self.dtype, "conv")(x)


# ----------------------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------------------


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float | None = None,
              implementation: AttentionImpl = None, chunk_size: int | None = None) -> jax.Array:
    """Multi-head attention ``softmax(q·kᵀ·scale)·v`` on ``(B, L, heads, head_dim)`` tensors.

    Built on :func:`jax.nn.dot_product_attention`, which accumulates logits and runs the softmax in float32
    for any input dtype. ``scale`` defaults to ``head_dim ** -0.5``. ``implementation`` (``'xla'`` /
    ``'cudnn'``) is passed through; cuDNN needs fp16/bf16 inputs and supported head sizes. With None, JAX
    chooses, except on CPU, where the same math runs in a heads-first layout that XLA:CPU runs faster.

    ``chunk_size``: when set and smaller than the query length, queries are processed ``chunk_size`` at a
    time with :func:`jax.lax.map` (sequentially), so the ``(B, heads, Lq, Lk)`` logits are never
    materialised at once — peak attention memory drops by ``Lq / chunk_size`` at some speed cost. A final
    partial chunk is handled separately. Results equal the unchunked computation.
    """
    b, lq, n, d = q.shape

    def run(qc: jax.Array) -> jax.Array:
        if implementation is not None:
            return jax.nn.dot_product_attention(qc, k, v, scale=scale, implementation=implementation)
        return lax.platform_dependent(qc, k, v, cpu=lambda *a: _attention_heads_first(*a, scale=scale),
                                      default=lambda *a: jax.nn.dot_product_attention(*a, scale=scale))

    if chunk_size is None or chunk_size >= lq:
        return run(q)
    if chunk_size <= 0:
        raise ValueError(f"attention chunk_size must be a positive int or None, got {chunk_size}.")
    n_full = lq // chunk_size
    main = n_full * chunk_size
    chunks = q[:, :main].reshape(b, n_full, chunk_size, n, d).swapaxes(0, 1)
    out = lax.map(run, chunks).swapaxes(0, 1).reshape(b, main, n, d)
    if main < lq:
        out = jnp.concatenate([out, run(q[:, main:])], axis=1)
    return out


def _attention_heads_first(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float | None) -> jax.Array:
    """``jax.nn.dot_product_attention``'s XLA math (float32 logits and softmax, probabilities cast back to the
    input dtype) with heads moved ahead of the sequence first: XLA:CPU runs it 1.4–2.7× faster that way
    (docs/benchmarks.md)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qh, kh, vh = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))  # (B, heads, L, head_dim)
    logits = jnp.einsum("bhqd,bhkd->bhqk", qh, kh, preferred_element_type=jnp.float32) * scale
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.swapaxes(jnp.einsum("bhqk,bhkd->bhqd", probs, vh), 1, 2)


UNET_ATTENTION_NAMES = ("to_q", "to_k", "to_v", "to_out_0")  # former FlaxAttention (UNet transformer blocks)
VAE_ATTENTION_NAMES = ("query", "key", "value", "proj_attn")  # former FlaxAttentionBlock (VAE mid block)
IP_ATTENTION_NAMES = ("to_k_ip", "to_v_ip")  # IP-Adapter's decoupled cross-attention (image tokens)


class Attention(nn.Module):
    """diffusers ``Attention`` core: q/k/v projections, multi-head attention, output projection.

    Self-attention when ``context`` is None, else cross-attention on ``context`` ``(B, Lk, C_ctx)``.
    ``param_names`` names the q, k, v and output Dense layers: :data:`UNET_ATTENTION_NAMES` (default; the same
    normalised names as PyTorch's ``to_q``/``to_k``/``to_v``/``to_out.0``) or :data:`VAE_ATTENTION_NAMES`
    (load with :func:`perflow_jax.models.keymap.rename_torch_attention`). ``qkv_bias``: False in the UNet's
    transformer blocks, True in the VAE. ``norm_context``: LayerNorm the context first (param ``norm_cross``,
    diffusers' ``cross_attention_norm="layer_norm"``, as in the K-upscaler's cross-attention). Other norms and
    residuals are left to the caller.
    """

    heads: int
    head_dim: int
    qkv_bias: bool = False
    param_names: tuple[str, str, str, str] = UNET_ATTENTION_NAMES
    dtype: Dtype = jnp.float32
    implementation: AttentionImpl = None
    chunk_size: int | None = None
    norm_context: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None,
                 ip: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
        """`ip` = (image tokens (B, Li, C_ctx), scale (B,)) adds IP-Adapter's decoupled cross-attention:
        ``scale · attention(q, to_k_ip(tokens), to_v_ip(tokens))`` joins the output before ``to_out``. Without
        it no ``*_ip`` param is created or read, so the program is the plain one."""
        context = x if context is None else context
        if self.norm_context:
            context = LayerNorm(name="norm_cross")(context)
        inner = self.heads * self.head_dim

        def proj(name: str, t: jax.Array) -> jax.Array:
            y = nn.Dense(inner, use_bias=self.qkv_bias, dtype=self.dtype, name=name)(t)
            return y.reshape(*y.shape[:-1], self.heads, self.head_dim)

        nq, nk, nv, no = self.param_names
        q, k, v = proj(nq, x), proj(nk, context), proj(nv, context)
        o = attention(q, k, v, implementation=self.implementation, chunk_size=self.chunk_size)
        if ip is not None:
            tokens, scale = ip
            tokens = tokens.astype(self.dtype)
            o_ip = attention(q, proj(IP_ATTENTION_NAMES[0], tokens), proj(IP_ATTENTION_NAMES[1], tokens),
                             implementation=self.implementation, chunk_size=self.chunk_size)
            scale = jnp.broadcast_to(jnp.asarray(scale, jnp.float32).reshape(-1), (o.shape[0],))
            o = o + scale.astype(o.dtype)[:, None, None, None] * o_ip
        o = o.reshape(*o.shape[:-2], inner)
        return nn.Dense(x.shape[-1], dtype=self.dtype, name=no)(o)
