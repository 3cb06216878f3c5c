"""Training at scale: per-block rematerialization (same loss and gradients as without), bf16 compute over
float32 master params and optimizer state, and the typed config view."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perflow_jax.models.adapter import UNetCondition
from perflow_jax.models.unet import REMAT_POLICIES, UNet2DConditionModel, UNetConfig, init_unet_params
from perflow_jax.training import reflow
from perflow_jax.training import train as train_lib

# Cross-attention down/up blocks, a mid block and an upsampler: every block kind that remat wraps.
TINY_ATTN = UNetConfig(sample_size=8, in_channels=1, out_channels=1,
                       down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(8, 16),
                       layers_per_block=1, norm_num_groups=4, cross_attention_dim=4, attention_head_dim=2)


@pytest.mark.slow(reason="compiles the tiny UNet's loss and gradients three times (plain, full, dots)")
def test_remat_same_loss_and_grads():
    """train.remat recomputes block activations in the backward pass: for each policy the loss and every gradient
    equal the plain run's to 1e-6 (float32; XLA may fuse the recomputed forward differently, so not bit for bit),
    and the param tree is the same."""
    cfg = train_lib.load_config(None, ["output_dir=/tmp/unused", "perflow.num_time_windows=2",
                                       "perflow.prediction_type=velocity", "solver.num_steps=2"])
    rcfg = train_lib.reflow_config(cfg)
    params = init_unet_params(TINY_ATTN, jax.random.key(0))
    rng = np.random.default_rng(0)
    x = jnp.asarray(np.tanh(rng.standard_normal((4, 1, 8, 8))), jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((4, 3, 4)), jnp.float32)
    plain = train_lib.make_apply_fn(TINY_ATTN, jnp.float32)
    batch = jax.jit(lambda k: reflow.make_batch(rcfg, functools.partial(plain, params), x,
                                                UNetCondition(encoder_hidden_states=ctx),
                                                UNetCondition(encoder_hidden_states=jnp.zeros((3, 4))), k)
                    )(jax.random.key(1))

    def loss_and_grads(remat):
        apply_fn = train_lib.make_apply_fn(TINY_ATTN, jnp.float32, remat)
        return jax.jit(jax.value_and_grad(lambda p: reflow.loss(rcfg, apply_fn, p, batch)))(params)

    loss0, g0 = loss_and_grads(None)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree_util.tree_leaves(g0))
    assert scale > 0
    for policy in ("full", "dots"):  # dots_saveable keeps more than dots: same code path, not compiled here
        assert policy in REMAT_POLICIES
        loss1, g1 = loss_and_grads(policy)
        assert jax.tree_util.tree_structure(g0) == jax.tree_util.tree_structure(g1)
        np.testing.assert_allclose(float(loss1), float(loss0), rtol=1e-6, err_msg=policy)
        for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g0), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6 * scale, err_msg=policy)


def test_remat_policy_names_checked():
    with pytest.raises(ValueError, match=r"train\.remat='some': expected one of"):
        train_lib.load_config(None, ["output_dir=/tmp/unused", "train.remat=some"])
    assert train_lib.RunConfig.from_dict(train_lib.load_config(None, ["output_dir=/tmp/x", "train.remat=full"])
                                         ).train.remat == "full"


def test_bf16_compute_keeps_float32_state():
    """model.dtype=bfloat16: the step runs the UNet in bf16, but the params, Adam moments, EMA and loss it returns
    stay float32 (traced with eval_shape: the dtypes are decided at trace time, nothing is compiled)."""
    cfg = train_lib.load_config(None, ["output_dir=/tmp/unused", "perflow.num_time_windows=2",
                                       "perflow.prediction_type=velocity", "solver.num_steps=2",
                                       "model.dtype=bfloat16"])
    run = train_lib.RunConfig.from_dict(cfg)
    assert run.model.dtype == "bfloat16"
    apply_fn = train_lib.make_apply_fn(TINY_ATTN, jnp.bfloat16, "full")
    tx = train_lib.make_optimizer(cfg["train"])
    params = jax.eval_shape(lambda: init_unet_params(TINY_ATTN, jax.random.key(0)))
    params = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, jnp.float32), params)
    state = train_lib.init_state(params, tx, ema=True)
    step = train_lib.make_train_step(train_lib.reflow_config(cfg), apply_fn, tx, 0.9, jax.random.key(0))
    x = jax.ShapeDtypeStruct((2, 4, 1, 8, 8), jnp.float32)  # 2 micro-batches of 4
    cond = UNetCondition(encoder_hidden_states=jax.ShapeDtypeStruct((2, 4, 3, 4), jnp.float32))
    null = UNetCondition(encoder_hidden_states=jnp.zeros((3, 4)))
    out_state, loss = jax.eval_shape(step, state, params, x, cond, null)
    assert loss.dtype == jnp.float32
    floats = [leaf.dtype for leaf in jax.tree_util.tree_leaves((out_state["params"], out_state["opt_state"],
                                                                out_state["ema"])) if leaf.ndim > 0]
    assert floats and all(d == jnp.float32 for d in floats), set(floats)
    # and the compute really is bf16: the student's output before the float32 loss
    out = jax.eval_shape(lambda p: apply_fn(p, jnp.zeros((1, 1, 8, 8)), jnp.ones((1,)),
                                            UNetCondition(encoder_hidden_states=jnp.zeros((1, 3, 4)))), params)
    assert out.dtype == jnp.float32  # unet_apply returns float32 ...
    module_out = jax.eval_shape(lambda p: UNet2DConditionModel(TINY_ATTN, dtype=jnp.bfloat16).apply(
        {"params": p}, jnp.zeros((1, 1, 8, 8)), jnp.ones((1,)), jnp.zeros((1, 3, 4))), params)
    assert module_out.dtype == jnp.bfloat16  # ... of a UNet computing in bf16
