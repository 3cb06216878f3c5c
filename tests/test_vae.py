"""Parity of the Flax AutoencoderKL with diffusers' PyTorch model (tiny random config)."""

from __future__ import annotations

import json
import os

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from perflow_jax.models.mismatch import ConversionError
from perflow_jax.models.vae import (
    AutoencoderKL,
    LatentDistribution,
    VAEConfig,
    latents_from_encoding,
    load_vae,
    scale_latents,
    unscale_latents,
)

# float32 on both sides; only accumulation order differs (~1e-7 relative on O(1) activations), so 1e-5
# absolute leaves ample margin while catching any real math difference.
ATOL = 1e-5
WEIGHTS = "diffusion_pytorch_model.safetensors"


def _torch_vae(folder, seed: int = 0, **overrides) -> diffusers.AutoencoderKL:
    """A tiny random diffusers VAE saved to `folder`. Conv/linear weights keep PyTorch's (fan-in scaled)
    random init; norm scales/biases are randomised too and q/k sharpened so attention is far from uniform."""
    torch.manual_seed(seed)
    kwargs = dict(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
        norm_num_groups=16, latent_channels=4, sample_size=32,
    )
    model = diffusers.AutoencoderKL(**{**kwargs, **overrides}).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.2)
            elif "to_q" in name or "to_k" in name:
                p.mul_(3.0)
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("vae"))
    return _torch_vae(folder), folder


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32)
    latents = rng.standard_normal((2, 4, 16, 16)).astype(np.float32)
    return images, latents


def _max_diff(a: torch.Tensor, b: jax.Array) -> float:
    return float(np.max(np.abs(a.numpy() - np.asarray(b, dtype=np.float32))))


def _encode(model: AutoencoderKL, params, x) -> LatentDistribution:
    return jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode"))(params, jnp.asarray(x))


def _decode(model: AutoencoderKL, params, z) -> jax.Array:
    return jax.jit(lambda p, z: model.apply({"params": p}, z, method="decode"))(params, jnp.asarray(z))


def _check_parity(torch_model, folder, images, latents, label: str) -> None:
    config, params = load_vae(folder)
    model = AutoencoderKL(config)
    dist = _encode(model, params, images)
    decoded = _decode(model, params, latents)
    with torch.no_grad():
        ref = torch_model.encode(torch.tensor(images)).latent_dist
        ref_decoded = torch_model.decode(torch.tensor(latents)).sample
    diffs = {
        "encode.mean": _max_diff(ref.mean, dist.mean),
        "encode.logvar": _max_diff(ref.logvar, dist.logvar),
        "decode": _max_diff(ref_decoded, decoded),
    }
    print(f"max abs diffs ({label}):", {k: f"{v:.2e}" for k, v in diffs.items()})
    assert dist.mean.shape == (2, 4, 16, 16) and decoded.shape == (2, 3, 32, 32)
    for name, d in diffs.items():
        assert d <= ATOL, f"{name}: max abs diff {d:.3e} > {ATOL}"


def test_parity(vae, inputs):
    _check_parity(*vae, *inputs, label="default")


def test_parity_without_quant_convs_and_mid_attention(tmp_path, inputs):
    folder = str(tmp_path / "vae")
    model = _torch_vae(folder, seed=1, use_quant_conv=False, use_post_quant_conv=False,
                       mid_block_add_attention=False)
    _check_parity(model, folder, *inputs, label="no quant convs, no mid attention")


def test_chunked_decode_matches(vae, inputs):
    _, folder = vae
    config, params = load_vae(folder)
    latents = np.concatenate([inputs[1], inputs[1][:1] * 0.5])  # batch 3: chunk 2 leaves a remainder
    full = _decode(AutoencoderKL(config), params, latents)
    # Same math per image; a different batch size lets XLA block the float32 sums differently (1e-7 seen on
    # jax 0.10.2, 2.6e-6 on 0.10.0). A wrong chunk or remainder would differ by O(0.1).
    for chunk in (1, 2):
        chunked = _decode(AutoencoderKL(config, decode_chunk_size=chunk), params, latents)
        np.testing.assert_allclose(chunked, full, rtol=0, atol=5e-6, err_msg=f"decode_chunk_size={chunk}")


def test_sampling_is_deterministic(vae, inputs):
    _, folder = vae
    config, params = load_vae(folder)
    model = AutoencoderKL(config)
    dist = _encode(model, params, inputs[0])
    key = jax.random.key(42)
    a, b = dist.sample(key), dist.sample(key)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, dist.sample(jax.random.key(43)))
    expected = dist.mean + jnp.exp(0.5 * dist.logvar) * jax.random.normal(key, dist.mean.shape)
    np.testing.assert_allclose(a, expected, rtol=1e-6, atol=1e-6)
    # The module's own forward with a key samples the same latents.
    recon = jax.jit(lambda p, x, k: model.apply({"params": p}, x, k))(params, jnp.asarray(inputs[0]), key)
    np.testing.assert_allclose(recon, _decode(model, params, a), rtol=0, atol=ATOL)


@pytest.mark.parametrize(
    "config",
    [
        VAEConfig(scaling_factor=0.18215),  # SD1 / SD2
        VAEConfig(scaling_factor=0.13025),  # SDXL
        VAEConfig(scaling_factor=1.5305, shift_factor=0.0609),  # SD3-style shift
        VAEConfig(scaling_factor=0.5, latents_mean=(0.1, -0.2, 0.3, 0.0), latents_std=(1.0, 2.0, 0.5, 1.5)),
    ],
)
def test_scaling_helpers_round_trip(config):
    z = jax.random.normal(jax.random.key(0), (2, 4, 8, 8))
    scaled = scale_latents(z, config)
    np.testing.assert_allclose(unscale_latents(scaled, config), z, rtol=1e-6, atol=1e-6)
    if config.latents_mean is None:
        expected = (z - (config.shift_factor or 0.0)) * config.scaling_factor
        np.testing.assert_allclose(scaled, expected, rtol=1e-6)
    dist = LatentDistribution(z, jnp.zeros_like(z))
    np.testing.assert_allclose(latents_from_encoding(dist, config), scaled, rtol=1e-6)
    key = jax.random.key(1)
    sampled = scale_latents(dist.sample(key), config)
    np.testing.assert_allclose(latents_from_encoding(dist, config, key), sampled, rtol=1e-6)


def test_param_names_follow_former_flax_vae(vae):
    _, folder = vae
    _, params = load_vae(folder)
    enc, dec = params["encoder"], params["decoder"]
    assert enc["conv_in"]["kernel"].shape == (3, 3, 3, 32)
    assert enc["down_blocks_0"]["downsamplers_0"]["conv"]["kernel"].shape == (3, 3, 32, 32)
    assert set(enc["down_blocks_1"]["resnets_0"]) == {"norm1", "conv1", "norm2", "conv2", "conv_shortcut"}
    assert set(enc["mid_block"]["attentions_0"]) == {"group_norm", "query", "key", "value", "proj_attn"}
    assert set(dec["up_blocks_0"]) == {"resnets_0", "resnets_1", "upsamplers_0"}
    assert params["quant_conv"]["kernel"].shape == (1, 1, 8, 8)
    assert params["post_quant_conv"]["kernel"].shape == (1, 1, 4, 4)


def test_legacy_attention_key_names_load(vae, tmp_path):
    """Checkpoints saved by old diffusers name the mid-block attention query/key/value/proj_attn."""
    _, folder = vae
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    sd = {}
    for k, v in load_file(os.path.join(folder, WEIGHTS)).items():
        for new, old in legacy.items():
            k = k.replace(f".{new}.", f".{old}.")
        sd[k] = v
    target = tmp_path / "legacy"
    target.mkdir()
    save_file(sd, str(target / WEIGHTS))
    (target / "config.json").write_text(open(os.path.join(folder, "config.json")).read())
    _, params = load_vae(target)
    _, ref = load_vae(folder)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, ref)


def test_low_precision_compute(vae, inputs):
    torch_model, folder = vae
    config, params = load_vae(folder, dtype=jnp.bfloat16)
    decoded = _decode(AutoencoderKL(config, dtype=jnp.bfloat16), params, inputs[1])
    assert decoded.dtype == jnp.bfloat16
    with torch.no_grad():
        ref = torch_model.decode(torch.tensor(inputs[1])).sample
    assert _max_diff(ref, decoded) < 0.1  # bf16 keeps ~3 significant digits


# ----------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------


def _copy_with_edit(folder, tmp_path, edit):
    sd = dict(load_file(os.path.join(folder, WEIGHTS)))
    edit(sd)
    save_file(sd, str(tmp_path / WEIGHTS))
    (tmp_path / "config.json").write_text(open(os.path.join(folder, "config.json")).read())
    return tmp_path


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda sd: sd.pop("decoder.mid_block.attentions.0.to_v.bias"), r"missing .*attentions_0/value/bias"),
        (lambda sd: sd.update({"encoder.extra.weight": np.zeros(3, np.float32)}),
         r"unexpected .*encoder\.extra"),
        (lambda sd: sd.update({"quant_conv.weight": np.zeros((8, 8, 3, 3), np.float32)}),
         r"mis-shaped.*quant_conv\.weight"),
    ],
    ids=["missing", "unexpected", "misshaped"],
)
def test_bad_weights_raise(vae, tmp_path, edit, match):
    folder = _copy_with_edit(vae[1], tmp_path, edit)
    with pytest.raises(ConversionError, match=f"(?s){match}"):
        load_vae(folder)


@pytest.mark.parametrize(
    "d, match",
    [
        ({"_class_name": "AutoencoderTiny"}, "Unsupported VAE class 'AutoencoderTiny'"),
        ({"down_block_types": ["DownBlock2D"]}, "Unsupported VAE down_block_types"),
        ({"block_out_channels": [32, 64]}, "down_block_types has 1 entries but block_out_channels has 2"),
        ({"act_fn": "gelu"}, "Unsupported VAE act_fn 'gelu'"),
        ({"block_out_channels": [48], "norm_num_groups": 32}, "divisible by norm_num_groups"),
        ({"latents_mean": [0.0] * 4}, "must be given together"),
        ({"scaling_factor": 0}, "scaling_factor must be positive"),
    ],
)
def test_unsupported_config_raises(d, match):
    with pytest.raises(ValueError, match=match):
        VAEConfig.from_dict(d)


def test_config_from_dict_reads_diffusers_json(vae):
    with open(os.path.join(vae[1], "config.json")) as f:
        d = json.load(f)
    cfg = VAEConfig.from_dict({**d, "unknown_key": 1})
    assert cfg.block_out_channels == (32, 64) and cfg.norm_num_groups == 16 and cfg.scaling_factor == 0.18215
    assert cfg.shift_factor is None and cfg.downscale_factor == 2


def test_bad_inputs_raise(vae):
    _, folder = vae
    config, params = load_vae(folder)
    model = AutoencoderKL(config)
    with pytest.raises(AssertionError, match="expects 3 channels"):
        model.apply({"params": params}, jnp.zeros((1, 32, 32, 3)), method="encode")  # NHWC by mistake
    with pytest.raises(ValueError, match="divisible by 2"):
        model.apply({"params": params}, jnp.zeros((1, 3, 31, 31)), method="encode")
    with pytest.raises(AssertionError, match="expects 4 latent channels"):
        model.apply({"params": params}, jnp.zeros((1, 8, 8, 4)), method="decode")
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.fp16.safetensors"):
        load_vae(folder, variant="fp16")
