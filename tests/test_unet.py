"""Parity of the Flax UNet with diffusers' PyTorch ``UNet2DConditionModel`` on tiny random models.

Each config is built in PyTorch with seeded random weights (plus noise on every parameter, so that
zero-initialised layers such as ``conv_out`` are exercised), saved with ``save_pretrained`` and loaded with
:func:`perflow_jax.models.unet.load_unet`. Both models then run on the same inputs in float32.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from perflow_jax.models.convert import flax_to_torch  # noqa: E402
from perflow_jax.models.mismatch import ConversionError  # noqa: E402
from perflow_jax.models.unet import UNet2DConditionModel, UNetConfig, load_unet  # noqa: E402
from perflow_jax.models.weights_io import load_state_dict  # noqa: E402

torch.set_grad_enabled(False)

# float32 results differ only by accumulation order (XLA vs PyTorch CPU kernels): ~1e-6 at these sizes with
# outputs of magnitude ~1. 1e-5 leaves headroom but still catches real mismatches: the tanh GELU approximation
# moves the output by ~1e-4, and the transformers' GroupNorm eps 1e-5 instead of 1e-6 by ~2e-5 when the
# activations are small (hence the 0.1-scaled samples below).
ATOL = 1e-5
BATCH = 2
SEQ = 5  # encoder_hidden_states length

_TINY = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    norm_num_groups=8,
    cross_attention_dim=32,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)
# name → (diffusers config overrides, input (H, W), sample scale, UNet module options)
CONFIGS = {
    "sd1": (dict(attention_head_dim=4), (8, 12), 0.1, {}),
    # SD2: linear projections, per-block head counts, upcast_attention; odd spatial size exercises
    # diffusers' forwarding of the skip size to the upsampler; chunked attention (70 queries → 24+24+22).
    "sd2": (dict(use_linear_projection=True, attention_head_dim=(2, 4), upcast_attention=True), (7, 10), 1.0,
            dict(attention_chunk_size=24)),
    # SDXL: first block without attention, two transformer layers in the second, text_time embedding.
    "sdxl": (dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                  transformer_layers_per_block=(1, 2), use_linear_projection=True, attention_head_dim=(2, 4),
                  addition_embed_type="text_time", addition_time_embed_dim=8,
                  projection_class_embeddings_input_dim=24 + 6 * 8), (8, 8), 0.1, {}),
    # class-conditional (digits model); also only_cross_attention in the first (attention) block.
    "class": (dict(num_class_embeds=10, attention_head_dim=2, only_cross_attention=(True, False)), (8, 8), 1.0,
              {}),
}


def _torch_unet(overrides: dict, seed: int) -> diffusers.UNet2DConditionModel:
    torch.manual_seed(seed)
    model = diffusers.UNet2DConditionModel(**{**_TINY, **overrides}).eval()
    for p in model.parameters():  # make zero-initialised layers (conv_out, proj_out, ...) non-trivial
        p.add_(0.05 * torch.randn_like(p))
    return model


def _inputs(name: str, hw: tuple[int, int], scale: float, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    kw = dict(
        sample=scale * torch.randn(BATCH, 4, *hw, generator=g),
        timestep=torch.tensor([10, 999]),
        encoder_hidden_states=torch.randn(BATCH, SEQ, 32, generator=g),
    )
    if name == "sdxl":
        kw["added_cond_kwargs"] = dict(text_embeds=torch.randn(BATCH, 24, generator=g),
                                       time_ids=torch.tensor([[64.0, 96, 0, 0, 64, 96]] * BATCH))
    if name == "class":
        kw["timestep"] = torch.tensor(500)  # scalar timestep, broadcast to the batch
        kw["class_labels"] = torch.tensor([3, 7])
    return kw


def _to_jax(kw: dict) -> dict:
    out = {("timesteps" if k == "timestep" else k): v for k, v in kw.items()}
    return jax.tree_util.tree_map(lambda t: jnp.asarray(t.numpy()), out)


def _run_flax(config: UNetConfig, params: dict, kw: dict, **options) -> np.ndarray:
    model = UNet2DConditionModel(config, **options)
    return np.asarray(jax.jit(model.apply)({"params": params}, **_to_jax(kw)))


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, tuple[str, np.ndarray, dict]]:
    """name → (folder with config.json + safetensors, PyTorch output, inputs)."""
    out = {}
    for i, (name, (overrides, hw, scale, _)) in enumerate(CONFIGS.items()):
        model = _torch_unet(overrides, seed=i)
        folder = str(tmp_path_factory.mktemp(name))
        model.save_pretrained(folder)
        kw = _inputs(name, hw, scale)
        out[name] = (folder, model(**kw).sample.numpy(), kw)
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_float32(saved, name):
    folder, ref, kw = saved[name]
    config, params = load_unet(folder)
    got = _run_flax(config, params, kw, **CONFIGS[name][3])
    diff = float(np.abs(got - ref).max())
    print(f"{name}: max |flax - torch| = {diff:.3g} (max |torch| = {np.abs(ref).max():.3g})")
    assert got.shape == ref.shape
    assert diff <= ATOL


def test_bf16_compute_close_to_float32(saved):
    folder, ref, kw = saved["sd1"]
    config, params = load_unet(folder)
    got = _run_flax(config, params, kw, dtype=jnp.bfloat16)
    assert got.dtype == jnp.bfloat16
    rel = float(np.abs(got.astype(np.float32) - ref).max() / np.abs(ref).max())
    print(f"bf16 compute: max relative error vs float32 torch = {rel:.3g}")
    assert rel <= 5e-2


def test_fp16_variant_loads(saved, tmp_path):
    folder, _, _ = saved["sd1"]
    model = diffusers.UNet2DConditionModel.from_pretrained(folder, torch_dtype=torch.float16)
    model.save_pretrained(tmp_path, variant="fp16")
    assert os.path.isfile(tmp_path / "diffusion_pytorch_model.fp16.safetensors")
    _, p16 = load_unet(tmp_path, variant="fp16")
    _, p32 = load_unet(folder)
    leaves16, leaves32 = jax.tree_util.tree_leaves(p16), jax.tree_util.tree_leaves(p32)
    assert {x.dtype for x in leaves16} == {np.dtype(np.float16)}
    assert all(np.array_equal(a, b.astype(np.float16)) for a, b in zip(leaves16, leaves32, strict=True))
    _, cast = load_unet(tmp_path, variant="fp16", dtype=jnp.float32)
    assert {x.dtype for x in jax.tree_util.tree_leaves(cast)} == {np.dtype(np.float32)}


def test_flax_to_torch_round_trip(saved):
    """Flax names map one-to-one back onto the PyTorch keys (no rename needed), e.g. to export a trained UNet."""
    folder = saved["sdxl"][0]
    sd = load_state_dict(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    _, params = load_unet(folder)
    back = flax_to_torch(params, {k: v.shape for k, v in sd.items()}, what="UNet")
    assert back.keys() == sd.keys()
    assert all(np.array_equal(back[k], sd[k]) for k in sd)


def _copy_with_state_dict(src: str, dst, edit) -> None:
    from safetensors.numpy import save_file

    shutil.copy(os.path.join(src, "config.json"), dst / "config.json")
    sd = load_state_dict(os.path.join(src, "diffusion_pytorch_model.safetensors"))
    edit(sd)
    save_file(sd, str(dst / "diffusion_pytorch_model.safetensors"))


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda sd: sd.pop("conv_out.weight"), r"missing[\s\S]*conv_out/kernel"),
        (lambda sd: sd.update({"extra.weight": np.zeros(3, np.float32)}), r"unexpected[\s\S]*extra\.weight"),
        (lambda sd: sd.update({"conv_in.bias": np.zeros(7, np.float32)}), r"mis-shaped[\s\S]*conv_in\.bias"),
    ],
    ids=["missing", "extra", "misshaped"],
)
def test_weight_mismatch_errors(saved, tmp_path, edit, match):
    _copy_with_state_dict(saved["sd1"][0], tmp_path, edit)
    with pytest.raises(ConversionError, match=match):
        load_unet(tmp_path)


@pytest.mark.parametrize(
    "update, match",
    [
        ({"resnet_time_scale_shift": "scale_shift"}, r"resnet_time_scale_shift='scale_shift'.*'default'"),
        ({"time_cond_proj_dim": 256}, r"time_cond_proj_dim=256"),
        ({"mid_block_type": "UNetMidBlock2DSimpleCrossAttn"}, r"mid_block_type"),
        ({"down_block_types": ["AttnDownBlock2D", "DownBlock2D"]}, r"down_block_types.*AttnDownBlock2D"),
        ({"addition_embed_type": "text"}, r"addition_embed_type='text'"),
        ({"dual_cross_attention": True}, r"dual_cross_attention"),
    ],
)
def test_unsupported_config_errors(saved, tmp_path, update, match):
    with open(os.path.join(saved["sd1"][0], "config.json")) as f:
        cfg = {**json.load(f), **update}
    with pytest.raises(ValueError, match=match):
        UNetConfig.from_dict(cfg)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match):
        load_unet(tmp_path)


def test_config_is_hashable_and_reads_legacy_head_count(saved):
    config = UNetConfig.from_json(os.path.join(saved["sd2"][0], "config.json"))
    assert hash(config) == hash(UNetConfig.from_dict(config.to_dict()))
    assert config.per_block("heads") == (2, 4)  # attention_head_dim is the head count in diffusers configs


def test_input_shape_errors(saved):
    config, params = load_unet(saved["sd1"][0])
    model = UNet2DConditionModel(config)
    ehs = jnp.zeros((2, SEQ, 32))
    with pytest.raises(AssertionError, match="must be \\(B, C, H, W\\)"):
        model.apply({"params": params}, jnp.zeros((2, 4, 8)), 1, ehs)
    with pytest.raises(AssertionError, match="cross_attention_dim"):
        model.apply({"params": params}, jnp.zeros((2, 4, 8, 8)), 1, jnp.zeros((2, SEQ, 16)))
