"""Single-file LDM/SGM checkpoints → Flax components, and components → diffusers folder.

The tiny SD1/SD2/SDXL PyTorch pipelines of ``tests/support/tiny_sd.py`` are written as single-file checkpoints
in the original layout by :func:`write_ldm_checkpoint` (the inverse of perflow_jax's key tables). That file is
checked independently with diffusers' own converter (``from_single_file``, offline, configs from the local
folder): it must reproduce the original weights exactly. Then perflow_jax loads it; params must equal those
read from the diffusers folder bit for bit, and the Flax UNet / VAE / text encoders must match the PyTorch
models to ≤ 1e-5 (float32). Real-size key tables (shipped SD1.5 / SD2.1 / SDXL configs) are checked against
diffusers' LDM → diffusers renaming without building the models.
"""

from __future__ import annotations

import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util
from safetensors.numpy import save_file

from perflow_jax.models.clip import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, clip_param_shapes
from perflow_jax.models.components import load_pipeline_components
from perflow_jax.models.export import save_pipeline
from perflow_jax.models.keymap import torch_key
from perflow_jax.models.mismatch import ConversionError
from perflow_jax.models.single_file import (
    UNET_PREFIX,
    VAE_PREFIX,
    family_config,
    load_single_file,
    unet_ldm_table,
    vae_ldm_table,
)
from perflow_jax.models.unet import UNet2DConditionModel, UNetConfig, unet_param_shapes
from perflow_jax.models.vae import AutoencoderKL, VAEConfig, vae_param_shapes
from tests.support.tiny_sd import make_tiny_pipeline

TOL = 1e-5

# ----------------------------------------------------------------------------------------------------------
# diffusers → LDM writer (test side)
# ----------------------------------------------------------------------------------------------------------

_HF_TO_OPENCLIP = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def _inverse(table: dict[str, str]) -> dict[str, str]:
    return {v: k for k, v in table.items()}


def _rename(key: str, table: dict[str, str]) -> str:
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:i])
        if head in table:
            return ".".join([table[head], *parts[i:]])
    raise KeyError(key)


def _openclip(sd: dict[str, np.ndarray], extra_layer: bool, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """transformers CLIP text weights → OpenCLIP names (fused in_proj, bare positional_embedding/text_projection)."""
    sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    out = {"token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
           "positional_embedding": sd.pop("embeddings.position_embedding.weight"),
           "ln_final.weight": sd.pop("final_layer_norm.weight"), "ln_final.bias": sd.pop("final_layer_norm.bias")}
    if "text_projection.weight" in sd:
        out["text_projection"] = np.ascontiguousarray(sd.pop("text_projection.weight").T)
    layers = sorted({int(k.split(".")[2]) for k in sd})
    for i in layers:
        p = f"encoder.layers.{i}."
        for leaf in ("weight", "bias"):
            out[f"transformer.resblocks.{i}.attn.in_proj_{leaf}"] = np.concatenate(
                [sd.pop(f"{p}self_attn.{n}_proj.{leaf}") for n in "qkv"])
        for k in [k for k in sd if k.startswith(p)]:
            out[f"transformer.resblocks.{i}." + _rename(k[len(p):], _HF_TO_OPENCLIP)] = sd.pop(k)
    assert not sd, sorted(sd)
    if extra_layer:  # real SD2 files hold ViT-H's unused last block and its text projection
        n = len(layers)
        for k in [k for k in out if k.startswith(f"transformer.resblocks.{n - 1}.")]:
            out[k.replace(f"resblocks.{n - 1}.", f"resblocks.{n}.")] = rng.standard_normal(out[k].shape, np.float32)
        d = out["ln_final.weight"].shape[0]
        out["text_projection"] = rng.standard_normal((d, d), np.float32)
    return out


def write_ldm_checkpoint(pipe, family: str, path: str, extra_sd2_layer: bool = False) -> dict[str, np.ndarray]:
    """Save a diffusers PyTorch pipeline as one LDM/SGM-layout safetensors file; returns the state dict."""
    unet_table = _inverse(unet_ldm_table(UNetConfig.from_dict(dict(pipe.unet.config))))
    vae_table = _inverse(vae_ldm_table(VAEConfig.from_dict(dict(pipe.vae.config))))
    sd = {UNET_PREFIX + _rename(k, unet_table): v.numpy() for k, v in pipe.unet.state_dict().items()}
    for k, v in pipe.vae.state_dict().items():
        v = v.numpy()
        if ".attentions." in k and v.ndim == 2:  # LDM stores the mid attention projections as 1×1 convs
            v = v[:, :, None, None]
        sd[VAE_PREFIX + _rename(k, vae_table)] = v
    te = {("text_model." + k if not k.startswith("text_") else k): v.numpy()
          for k, v in pipe.text_encoder.state_dict().items()}
    rng = np.random.default_rng(0)
    if family == "sd15":
        sd |= {"cond_stage_model.transformer." + k: v for k, v in te.items()}
    elif family == "sd21":
        sd |= {"cond_stage_model.model." + k: v for k, v in _openclip(te, extra_sd2_layer, rng).items()}
    else:
        sd |= {"conditioner.embedders.0.transformer." + k: v for k, v in te.items()}
        te2 = {k: v.numpy() for k, v in pipe.text_encoder_2.state_dict().items()}
        sd |= {"conditioner.embedders.1.model." + k: v for k, v in _openclip(te2, False, rng).items()}
    sd["alphas_cumprod"] = np.linspace(1, 0, 1000, dtype=np.float32)  # LDM schedule buffer: not a weight
    sd = {k: np.ascontiguousarray(v) for k, v in sd.items() if not k.endswith("position_ids")}
    save_file(sd, path)
    return sd


# ----------------------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """family → (diffusers folder, PyTorch pipeline, single-file path)."""
    out = {}
    for family in ("sd15", "sd21", "sdxl"):
        root = tmp_path_factory.mktemp(family)
        pipe = make_tiny_pipeline(str(root / "diffusers"), family)
        path = str(root / f"{family}.safetensors")
        write_ldm_checkpoint(pipe, family, path, extra_sd2_layer=family == "sd21")
        out[family] = (str(root / "diffusers"), pipe, path)
    return out


def _flat(tree) -> dict:
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(dict(tree)).items()}


def _assert_same_params(a, b, what: str) -> None:
    fa, fb = _flat(a), _flat(b)
    assert set(fa) == set(fb), f"{what}: {sorted(set(fa) ^ set(fb))[:5]}"
    bad = [k for k in fa if fa[k].shape != fb[k].shape or not np.array_equal(fa[k], fb[k])]
    assert not bad, f"{what}: params differ at {bad[:5]}"


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def torch_vs_flax_outputs(pipe, comps, seed: int = 0) -> dict[str, float]:
    """Max |PyTorch − Flax| of the UNet, VAE decoder and text encoder(s) on random inputs."""
    g = torch.Generator().manual_seed(seed)
    ucfg = comps.unet_config
    x = torch.randn(1, 4, 16, 16, generator=g)
    ctx = torch.randn(1, 7, ucfg.encoder_dim, generator=g)
    t = torch.tensor([417])
    added = None
    if ucfg.addition_embed_type == "text_time":
        p = ucfg.projection_class_embeddings_input_dim - 6 * ucfg.addition_time_embed_dim
        added = {"text_embeds": torch.randn(1, p, generator=g), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    z = torch.randn(1, 4, 8, 8, generator=g)
    ids = np.array([[49406 % 1000, 5, 17, 999, 2, 2, 2, 2]], np.int64)
    diffs = {}
    with torch.no_grad():
        want = pipe.unet(x, t, ctx, added_cond_kwargs=added).sample.numpy()
        want_img = pipe.vae.decode(z).sample.numpy()
    got = jax.jit(UNet2DConditionModel(ucfg).apply)(
        {"params": comps.unet_params}, jnp.asarray(x.numpy()), jnp.asarray(t.numpy()), jnp.asarray(ctx.numpy()),
        added_cond_kwargs=None if added is None else {k: jnp.asarray(v.numpy()) for k, v in added.items()})
    diffs["unet"] = _max_diff(got, want)
    vae = AutoencoderKL(comps.vae_config)
    img = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=AutoencoderKL.decode))(comps.vae_params,
                                                                                         jnp.asarray(z.numpy()))
    diffs["vae"] = _max_diff(img, want_img)
    encoders = [("text_encoder", pipe.text_encoder, CLIPTextModel, comps.text_encoder_config,
                 comps.text_encoder_params)]
    if comps.text_encoder_2_params is not None:
        encoders.append(("text_encoder_2", pipe.text_encoder_2, CLIPTextModelWithProjection,
                         comps.text_encoder_2_config, comps.text_encoder_2_params))
    for name, model, cls, cfg, params in encoders:
        with torch.no_grad():
            ref = model(torch.from_numpy(ids), output_hidden_states=True)
        out = jax.jit(cls(cfg).apply)({"params": params}, jnp.asarray(ids, jnp.int32))
        diffs[name] = max(_max_diff(out.last_hidden_state, ref.last_hidden_state.numpy()),
                          _max_diff(out.hidden_states[-2], ref.hidden_states[-2].numpy()))
        if cls is CLIPTextModelWithProjection:
            diffs[name] = max(diffs[name], _max_diff(out.text_embeds, ref.text_embeds.numpy()))
    return diffs


# ----------------------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd15", "sd21", "sdxl"])
def test_written_checkpoint_is_what_diffusers_expects(tiny, family) -> None:
    """The test's LDM writer is validated by diffusers' own LDM → diffusers converter."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    folder, pipe, path = tiny[family]
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    kwargs = {} if family == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    if family == "sd21":  # diffusers only drops ViT-H's block 23; write a file without the extra block for it
        path = path.replace(".safetensors", "-plain.safetensors")
        write_ldm_checkpoint(pipe, family, path)
    loaded = cls.from_single_file(path, config=folder, local_files_only=True, **kwargs)
    got = {name: getattr(loaded, name).state_dict() for name in ("unet", "vae", "text_encoder")}
    if family == "sdxl":
        # from_single_file picks SDXL's second encoder by its width, which the tiny encoders share: convert directly
        from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
        from safetensors.torch import load_file

        got["text_encoder_2"] = convert_open_clip_checkpoint(pipe.text_encoder_2, load_file(path),
                                                             prefix="conditioner.embedders.1.model.")
    for name, sd in got.items():
        want = {k: v for k, v in getattr(pipe, name).state_dict().items() if not k.endswith("position_ids")}
        sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
        assert set(sd) == set(want), name
        assert all(torch.equal(sd[k], want[k]) for k in want), name


@pytest.mark.parametrize("family", ["sd15", "sd21", "sdxl"])
def test_load_single_file_matches_diffusers_folder_and_pytorch(tiny, family) -> None:
    folder, pipe, path = tiny[family]
    comps = load_single_file(path, base=folder)
    ref = load_pipeline_components(folder)
    assert comps.family == ref.family and comps.scheduler_config["prediction_type"] == (
        "v_prediction" if family == "sd21" else "epsilon")
    for name in ("unet", "vae", "text_encoder") + (("text_encoder_2",) if family == "sdxl" else ()):
        assert getattr(comps, f"{name}_config") == getattr(ref, f"{name}_config"), name
        _assert_same_params(getattr(comps, f"{name}_params"), getattr(ref, f"{name}_params"), name)
    diffs = torch_vs_flax_outputs(pipe, comps)
    print(f"{family} single file vs PyTorch: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    assert max(diffs.values()) <= TOL, diffs


@functools.cache
def _real_shapes(family: str) -> tuple[dict, dict]:
    """UNet and VAE param shapes of the shipped (real-size) configs, traced once."""
    return (unet_param_shapes(UNetConfig.from_dict(family_config(family, "unet"))),
            vae_param_shapes(VAEConfig.from_dict(family_config(family, "vae"))))


@pytest.mark.parametrize("family", ["sd15", "sd21", "sdxl"])
def test_real_size_key_tables_match_diffusers_converter(family) -> None:
    """Shipped SD1.5 / SD2.1 / SDXL configs: every diffusers key → our LDM name → diffusers' converter → same key."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    unet_shapes, vae_shapes = _real_shapes(family)
    ucfg_dict, vcfg_dict = family_config(family, "unet"), family_config(family, "vae")
    unet_keys = [torch_key(p) for p in traverse_util.flatten_dict(unet_shapes)]
    table = _inverse(unet_ldm_table(UNetConfig.from_dict(ucfg_dict)))
    ldm = {UNET_PREFIX + _rename(k, table): torch.zeros(1) for k in unet_keys}
    assert len(ldm) == len(unet_keys)
    assert set(convert_ldm_unet_checkpoint(ldm, ucfg_dict)) == set(unet_keys)

    names = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
    vae_keys = [torch_key(tuple(names.get(m, m) for m in p[:-1]) + p[-1:])
                for p in traverse_util.flatten_dict(vae_shapes)]
    vtable = _inverse(vae_ldm_table(VAEConfig.from_dict(vcfg_dict)))
    ldm = {VAE_PREFIX + _rename(k, vtable): torch.zeros(1, 1, 1, 1) for k in vae_keys}
    assert set(convert_ldm_vae_checkpoint(ldm, vcfg_dict)) == set(vae_keys)


def test_shipped_configs_are_the_real_architectures() -> None:
    """Param counts of the shipped configs equal the published model sizes."""

    def count(tree) -> int:
        return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))

    unet = {f: count(_real_shapes(f)[0]) for f in ("sd15", "sd21", "sdxl")}
    assert unet == {"sd15": 859_520_964, "sd21": 865_910_724, "sdxl": 2_567_463_684}
    assert count(_real_shapes("sd15")[1]) == 83_653_863
    te = {(f, c): count(clip_param_shapes(CLIPTextConfig.from_dict(family_config(f, c)), c == "text_encoder_2"))
          for f, c in (("sd15", "text_encoder"), ("sd21", "text_encoder"), ("sdxl", "text_encoder_2"))}
    assert te == {("sd15", "text_encoder"): 123_060_480, ("sd21", "text_encoder"): 340_387_840,
                  ("sdxl", "text_encoder_2"): 694_659_840}


def test_export_diffusers_folder_roundtrip(tiny, tmp_path) -> None:
    """load_single_file → save_pipeline → diffusers from_pretrained reproduces the PyTorch models (state dicts
    exactly, outputs to float32 rounding); the Flax variant reloads with load_pipeline_components to the same
    params."""
    from diffusers import DiffusionPipeline

    for family in ("sd15", "sdxl"):
        folder, pipe, path = tiny[family]
        out = save_pipeline(load_single_file(path, base=folder), tmp_path / family)
        assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]
        loaded = DiffusionPipeline.from_pretrained(out, local_files_only=True)
        assert type(loaded) is type(pipe)
        for name in ("unet", "vae", "text_encoder") + (("text_encoder_2",) if family == "sdxl" else ()):
            want, got = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
            assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want), name
        # The state dicts above are equal exactly: that is the promise. Two separately loaded PyTorch models
        # need not run bit-identical forward passes (the attention implementation is picked at load time), so
        # their outputs are compared to float32 rounding (1e-6), far below any weight-level difference.
        g = torch.Generator().manual_seed(0)
        close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)  # noqa: E731
        with torch.no_grad():
            ids = torch.tensor([[0, 5, 17, 999, 2, 2]])
            close(loaded.text_encoder(ids)[0], pipe.text_encoder(ids)[0])
            z = torch.randn(1, 4, 8, 8, generator=g)
            close(loaded.vae.decode(z).sample, pipe.vae.decode(z).sample)
            if family == "sdxl":
                close(loaded.text_encoder_2(ids).text_embeds, pipe.text_encoder_2(ids).text_embeds)
        assert loaded.scheduler.config.prediction_type == pipe.scheduler.config.prediction_type
    comps = load_single_file(tiny["sd21"][2], base=tiny["sd21"][0])
    ref = load_pipeline_components(save_pipeline(comps, tmp_path / "flax", to="flax"))
    assert os.path.isfile(tmp_path / "flax" / "unet" / "flax_model.msgpack")
    for name in ("unet", "vae", "text_encoder"):
        _assert_same_params(getattr(comps, f"{name}_params"), getattr(ref, f"{name}_params"), name)
        assert getattr(comps, f"{name}_config") == getattr(ref, f"{name}_config"), name
    assert ref.scheduler_config == comps.scheduler_config
    with pytest.raises(FileExistsError):
        save_pipeline(comps, tmp_path / "flax", to="flax")


# -- errors -------------------------------------------------------------------------------------------------


def test_errors_say_what_was_found(tiny, tmp_path) -> None:
    folder, _, path = tiny["sd15"]
    with pytest.raises(ValueError, match="pass base="):
        load_single_file(path, base=None)
    # a diffusers-format UNet file is not an LDM checkpoint
    unet_file = os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors")
    with pytest.raises(ConversionError, match=r"not a single-file Stable Diffusion checkpoint.*'conv_in'"):
        load_single_file(unet_file, base=folder)
    # forced family that contradicts the keys; base folder of another family
    with pytest.raises(ConversionError, match="looks like a sd15 checkpoint"):
        load_single_file(path, base=folder, family="sdxl")
    with pytest.raises(ConversionError, match="is sdxl but the base folder .* is sd15"):
        load_single_file(tiny["sdxl"][2], base=folder)
    # a base folder without model configs → shipped (real SD1.5) configs, which the tiny weights do not fit
    bare = tmp_path / "bare"
    shutil.copytree(folder, bare, ignore=shutil.ignore_patterns("config.json", "*.safetensors"))
    with pytest.raises(ConversionError, match=r"(?s)UNet \(sd15 single file\).*mis-shaped"):
        load_single_file(path, base=bare)
    # unknown extra keys are refused
    from safetensors.numpy import load_file

    sd = load_file(path)
    sd["model.diffusion_model.extra_head.weight"] = np.zeros(3, np.float32)
    sd["something_else.weight"] = np.zeros(3, np.float32)
    bad = str(tmp_path / "extra.safetensors")
    save_file(sd, bad)
    with pytest.raises(ConversionError, match="something_else.weight"):
        load_single_file(bad, base=folder)
    del sd["something_else.weight"]
    save_file(sd, bad)
    with pytest.raises(ConversionError, match=r"(?s)unexpected.*extra_head\.weight"):
        load_single_file(bad, base=folder)
    save_file({"model.diffusion_model.out.2.bias": np.zeros(4, np.float32),
               "conditioner.embedders.0.model.text_projection": np.zeros((4, 4), np.float32)}, bad)
    with pytest.raises(ConversionError, match="SDXL refiner"):
        load_single_file(bad, base=folder)


def test_prediction_type_and_config_overrides(tiny, tmp_path) -> None:
    folder, _, path = tiny["sd21"]
    assert load_single_file(path, base=folder, prediction_type="epsilon").scheduler_config[
        "prediction_type"] == "epsilon"
    from safetensors.numpy import load_file

    folder15, _, path15 = tiny["sd15"]
    marked = str(tmp_path / "vpred.safetensors")
    save_file({**load_file(path15), "v_pred": np.zeros(0, np.float32)}, marked)  # marker key of v-pred models
    assert load_single_file(marked, base=folder15).scheduler_config["prediction_type"] == "v_prediction"
    with open(os.path.join(folder, "vae", "config.json")) as f:
        scaling = json.load(f)["scaling_factor"]
    comps = load_single_file(path, base=folder, config_overrides={"vae": {"scaling_factor": 0.5}})
    assert comps.vae_config.scaling_factor == 0.5 != scaling
