"""``layers.Conv2D``: the same parameters and math as ``flax.linen.Conv`` on both of its lowerings.

On CPU, k×k convolutions on small feature maps run as im2col + matmul (XLA:CPU's own kernel is up to ~100×
slower there, see docs/benchmarks.md). These tests pin that the swap is invisible: identical parameter trees
and initialisation, outputs and gradients equal to ``nn.Conv`` up to float32 accumulation order, a UNet equal
with either lowering, and the lowering actually chosen on each side of the thresholds.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perflow_jax.models import layers
from perflow_jax.models.layers import Conv2D, uses_im2col_on_cpu

# float32 sums of ≤ 9·16 products of O(1) values: different accumulation orders differ by a few ulp (~1e-6).
ATOL = 1e-5

CASES = [  # (spatial, cin, cout, stride, padding) on both sides of the thresholds
    (1, 16, 8, 1, ((1, 1), (1, 1))),  # SD1.5's bottom level at a 64×64 image: only the centre tap is inside
    (2, 16, 8, 1, ((1, 1), (1, 1))),  # ≤ 4 positions: im2col at any width
    (8, 512, 6, 1, ((1, 1), (1, 1))),  # 64 positions, 512 channels: im2col
    (8, 4, 6, 1, ((1, 1), (1, 1))),  # 64 positions, few channels: native
    (9, 4, 6, 1, ((1, 1), (1, 1))),  # 81 positions: native
    (4, 6, 7, 2, ((0, 1), (0, 1))),  # VAE encoder downsample (bottom/right padding only) to 2×2: im2col
    (16, 3, 5, 2, ((1, 1), (1, 1))),  # stride 2 down to 8×8, few channels: native
]


@pytest.mark.parametrize("hw,cin,cout,stride,padding", CASES)
def test_conv2d_matches_flax_conv(hw, cin, cout, stride, padding):
    x = jax.random.normal(jax.random.key(0), (2, hw, hw + 1, cin))  # non-square: catches swapped axes
    kw = dict(strides=(stride, stride), padding=padding)
    ref, ours = nn.Conv(cout, (3, 3), **kw), Conv2D(cout, (3, 3), **kw)
    params = ref.init(jax.random.key(1), x)
    ours_params = ours.init(jax.random.key(1), x)
    assert jax.tree.structure(params) == jax.tree.structure(ours_params)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ours_params), strict=True):
        np.testing.assert_array_equal(a, b)  # same shapes, dtypes and initialisation

    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape), params)  # nonzero bias
    np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), atol=ATOL, rtol=0)
    g_ref = jax.grad(lambda p, v: jnp.sum(jnp.sin(ref.apply(p, v))), argnums=(0, 1))(params, x)
    g_ours = jax.grad(lambda p, v: jnp.sum(jnp.sin(ours.apply(p, v))), argnums=(0, 1))(params, x)
    for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g_ours), strict=True):
        np.testing.assert_allclose(b, a, atol=ATOL * 10, rtol=0)  # sums over the batch and positions

    half = Conv2D(cout, (3, 3), dtype=jnp.bfloat16, **kw).apply(params, x)
    half_ref = nn.Conv(cout, (3, 3), dtype=jnp.bfloat16, **kw).apply(params, x)
    assert half.dtype == jnp.bfloat16
    # bf16 inputs, rounded once more on output: both sides are within bf16 resolution (2^-8) of each other.
    np.testing.assert_allclose(np.asarray(half, np.float32), np.asarray(half_ref, np.float32), atol=0.05, rtol=0.02)


@pytest.mark.parametrize("hw,cin,expect_native", [(2, 4, False), (8, 4, True), (8, 512, False), (9, 512, True),
                                                   (32, 4, True)])
def test_small_feature_maps_avoid_the_xla_cpu_convolution(hw, cin, expect_native):
    if jax.default_backend() != "cpu":
        pytest.skip("the im2col lowering is CPU-only")
    assert uses_im2col_on_cpu((3, 3), (hw, hw), cin) != expect_native
    conv = Conv2D(8, (3, 3), padding=((1, 1), (1, 1)))
    x = jnp.ones((1, hw, hw, cin))
    params = conv.init(jax.random.key(0), x)
    hlo = jax.jit(conv.apply).lower(params, x).compile().as_text()
    assert ("convolution(" in hlo) == expect_native


@pytest.mark.slow(reason="compiles the same UNet under both conv lowerings")
def test_unet_is_the_same_with_either_lowering(monkeypatch):
    """A UNet whose bottom level runs at 2×2 gives the same output with im2col everywhere or nowhere (the
    native path is the one checked against PyTorch in test_unet.py)."""
    from perflow_jax.models.unet import UNet2DConditionModel, UNetConfig

    cfg = UNetConfig(sample_size=4, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                     cross_attention_dim=16, attention_head_dim=4,
                     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    model = UNet2DConditionModel(cfg)
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 4))
    ctx = jax.random.normal(jax.random.key(1), (2, 3, 16))
    t = jnp.array([10.0, 700.0])
    params = model.init(jax.random.key(2), x, t, ctx)
    outs = {}
    for im2col in (True, False):
        monkeypatch.setattr(layers, "uses_im2col_on_cpu", lambda *a, v=im2col: v)
        outs[im2col] = np.asarray(jax.jit(model.apply)(params, x, t, ctx))
    assert np.abs(outs[True]).max() > 0.1
    np.testing.assert_allclose(outs[True], outs[False], atol=ATOL, rtol=0)


def test_one_by_one_convs_stay_native():
    conv = Conv2D(8, (1, 1))
    x = jnp.ones((1, 2, 2, 4))
    params = conv.init(jax.random.key(0), x)
    np.testing.assert_allclose(conv.apply(params, x), nn.Conv(8, (1, 1)).apply(params, x), atol=ATOL)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("lq,lk,chunk,scale", [(37, 37, None, None), (37, 5, 16, None), (8, 77, None, 0.3)])
def test_attention_matches_jax_dot_product_attention(dtype, lq, lk, chunk, scale):
    """``layers.attention`` (heads-first on CPU) is ``jax.nn.dot_product_attention``'s XLA math: float32
    logits and softmax, probabilities cast to the input dtype; self- and cross-attention, chunked or not."""
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (2, lq, 3, 8), dtype)
    k = jax.random.normal(kk, (2, lk, 3, 8), dtype)
    v = jax.random.normal(kv, (2, lk, 3, 8), dtype)
    ours = jax.jit(lambda *a: layers.attention(*a, scale=scale, chunk_size=chunk))(q, k, v)
    ref = jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="xla")
    assert ours.dtype == dtype and ours.shape == ref.shape
    # float32: accumulation order only. bf16: both round the probabilities and the output to bf16 (2^-8).
    tol = ATOL if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(ref, np.float32), atol=tol, rtol=0)
