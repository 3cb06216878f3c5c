"""Multi-view UNet: parity with a PyTorch reference built from diffusers parts, strict conversion from the
diffusers-style and MVDream LDM layouts, cross-view mixing, and bad input."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from perflow_jax.models.mismatch import ConversionError
from perflow_jax.models.multiview_unet import (
    MULTIVIEW_JSON,
    MultiViewConfig,
    init_multiview_from_unet,
    load_multiview_unet,
    multiview_apply,
    multiview_params_from_ldm,
    mvdream_ldm_table,
)
from perflow_jax.models.single_file import UNET_PREFIX, rewrite_key
from perflow_jax.models.unet import UNet2DConditionModel
from tests.support.tiny_sd import _perturb

# One compiled program per (config, N, shapes): jitted as a pipeline runs it.
apply_mv = jax.jit(multiview_apply, static_argnums=0, static_argnames=("num_views", "dtype"))

# float32 on both sides; the same reductions in a different order (attention over N·HW tokens, GroupNorm) put
# the tiny model ~1e-6 apart, so 1e-5 bounds it with margin while any layout or mixing error is ≥ 1e-2.
TOL = 1e-5
CROSS, REF_CH, H = 32, 4, 8


def _core(attn, x: torch.Tensor, ctx: torch.Tensor, k_layer=None, v_layer=None) -> torch.Tensor:
    """q from `x`, k/v from `ctx`, multi-head SDPA; heads merged (before to_out)."""
    b, lq, _ = x.shape
    q, k, v = attn.to_q(x), (k_layer or attn.to_k)(ctx), (v_layer or attn.to_v)(ctx)

    def heads(t):
        return t.reshape(b, t.shape[1], attn.heads, -1).transpose(1, 2)

    o = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))
    return o.transpose(1, 2).reshape(b, lq, -1)


class MultiViewSelfAttn:
    """attn1: the N views of each sample attend jointly, (B·N, HW, C) → (B, N·HW, C)."""

    def __init__(self, views: int):
        self.views = views

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 ref_tokens=None):
        bn, length, c = hidden_states.shape
        h = hidden_states.reshape(bn // self.views, self.views * length, c)
        o = attn.to_out[0](_core(attn, h, h))
        return o.reshape(bn, length, c)


class ReferenceCrossAttn(torch.nn.Module):
    """attn2: text cross-attention plus the decoupled reference attention (IP-Adapter style)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.to_k_ip = torch.nn.Linear(CROSS, hidden, bias=False)
        self.to_v_ip = torch.nn.Linear(CROSS, hidden, bias=False)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 ref_tokens=None):
        o = _core(attn, hidden_states, encoder_hidden_states)
        if ref_tokens is not None:
            o = o + _core(attn, hidden_states, ref_tokens, self.to_k_ip, self.to_v_ip)
        return attn.to_out[0](o)


def _reference_model(seed: int = 0):
    from diffusers import UNet2DConditionModel as TorchUNet

    torch.manual_seed(seed)
    unet = TorchUNet(sample_size=H, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                     norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=CROSS,
                     attention_head_dim=(2, 4), use_linear_projection=True, class_embed_type="projection",
                     projection_class_embeddings_input_dim=16)
    mv = MultiViewSelfAttn(1)
    procs = {}
    for name in unet.attn_processors:
        module = unet.get_submodule(name[: -len(".processor")])
        procs[name] = mv if name.endswith("attn1.processor") else ReferenceCrossAttn(module.to_q.out_features)
    unet.set_attn_processor(procs)
    unet.reference_proj = torch.nn.Linear(REF_CH, CROSS)
    return _perturb(unet, seed), mv


def _torch_forward(unet, mv, sample, t, text, cams, ref, views):
    mv.views = views
    with torch.no_grad():
        tokens = unet.reference_proj(torch.from_numpy(ref).flatten(2).transpose(1, 2)).repeat_interleave(views, 0)
        out = unet(torch.from_numpy(sample), torch.tensor(t), torch.from_numpy(text),
                   class_labels=torch.from_numpy(cams).reshape(-1, 16),
                   cross_attention_kwargs={"ref_tokens": tokens}).sample
    return out.numpy()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mv") / "unet"
    unet, mv = _reference_model()
    unet.save_pretrained(folder)
    (folder / MULTIVIEW_JSON).write_text(json.dumps({"reference": "latent", "reference_channels": REF_CH}))
    config, params = load_multiview_unet(folder)
    return unet, mv, config, params, folder


def _inputs(b: int, n: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    f = np.float32
    return (rng.standard_normal((b * n, 4, H, H)).astype(f), 500, rng.standard_normal((b * n, 5, CROSS)).astype(f),
            rng.standard_normal((b * n, 4, 4)).astype(f), rng.standard_normal((b, REF_CH, 4, 4)).astype(f))


@pytest.mark.parametrize("views", [1, 2, 4])
def test_matches_the_pytorch_reference(model, views: int) -> None:
    unet, mv, config, params, _ = model
    sample, t, text, cams, ref = _inputs(2 if views < 4 else 1, views)
    want = _torch_forward(unet, mv, sample, t, text, cams, ref, views)
    got = apply_mv(config, params, sample, t, text, num_views=views, cameras=cams, reference=ref)
    err = float(np.abs(np.asarray(got) - want).max())
    assert err < TOL, f"N={views}: max |jax - torch| = {err:.2e}"


def test_one_view_without_camera_is_the_plain_unet(model) -> None:
    _, _, config, params, _ = model
    sample, t, text, _, _ = _inputs(2, 1)
    plain_cfg = dataclasses.replace(config.unet, class_embed_type=None, projection_class_embeddings_input_dim=None)
    plain = {k: v for k, v in params.items() if k not in ("class_embedding", "reference_proj")}
    want = UNet2DConditionModel(plain_cfg).apply({"params": plain}, sample, t, text)
    got = multiview_apply(config, params, sample, t, text, num_views=1)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_cross_view_attention_mixes_views(model) -> None:
    _, _, config, params, _ = model
    sample, t, text, cams, ref = _inputs(1, 4)
    changed = sample.copy()
    changed[0] += 1.0
    for views, mixes in ((4, True), (1, False)):  # off: each view its own sample, with the same reference
        refs = np.repeat(ref, 4 // views, axis=0)
        a, b = (np.asarray(apply_mv(config, params, x, t, text, num_views=views, cameras=cams, reference=refs))
                for x in (sample, changed))
        assert np.abs(a[0] - b[0]).max() > 1e-3
        others = float(np.abs(a[1:] - b[1:]).max())
        assert (others > 1e-3) if mixes else (others == 0.0), (views, others)


def test_half_precision_stays_close_to_float32(model) -> None:
    _, _, config, params, _ = model
    sample, t, text, cams, ref = _inputs(1, 2)
    want = np.asarray(apply_mv(config, params, sample, t, text, num_views=2, cameras=cams, reference=ref))
    got = apply_mv(config, params, sample, t, text, num_views=2, cameras=cams, reference=ref, dtype=jnp.bfloat16)
    assert got.dtype == jnp.bfloat16
    # bf16 keeps 8 mantissa bits (~4e-3 relative per op); float32 sinusoids, norms and softmax keep the whole
    # tiny UNet within a few percent of float32, where a half-precision softmax or timestep embedding is not.
    err = float(np.abs(np.asarray(got, np.float32) - want).max())
    assert err < 0.05 * np.abs(want).max(), err


def test_clip_image_tokens_as_the_reference(model) -> None:
    _, _, config, params, _ = model
    clip_cfg = MultiViewConfig(config.unet, reference="clip", reference_channels=24)
    base = {k: _drop_ip(v) for k, v in params.items() if k not in ("class_embedding", "reference_proj")}
    fresh = init_multiview_from_unet(clip_cfg, base, jax.random.key(1))
    rng = np.random.default_rng(5)
    fresh["reference_proj"]["kernel"] = rng.standard_normal((24, CROSS)).astype(np.float32)
    sample, t, text, cams, _ = _inputs(1, 2)
    tokens = rng.standard_normal((1, 7, 24)).astype(np.float32)
    a, b = (np.asarray(apply_mv(clip_cfg, fresh, sample, t, text, num_views=2, cameras=cams, reference=r))
            for r in (tokens, 2 * tokens))
    assert np.abs(a - b).max() > 1e-3  # the tokens reach every view through to_k_ip/to_v_ip
    with pytest.raises(ValueError, match=r"CLIP image tokens \(B, L, 24\)"):
        multiview_apply(clip_cfg, fresh, sample, t, text, num_views=2, reference=tokens[..., :8])


def _ldm_state_dict(unet, config) -> dict[str, np.ndarray]:
    inverse = {v: k for k, v in mvdream_ldm_table(config.unet).items()}
    out = {}
    for key, value in unet.state_dict().items():
        new = rewrite_key(key.replace(".processor.", "."), inverse)
        out[UNET_PREFIX + (key if new is None else new)] = value.numpy()
    return out


def test_mvdream_ldm_layout_accounts_for_every_key(model, tmp_path) -> None:
    from safetensors.numpy import save_file

    from perflow_jax.models.weights_io import load_state_dict

    unet, _, config, params, _ = model
    sd = _ldm_state_dict(unet, config)
    assert any(k.startswith(UNET_PREFIX + "camera_embed.0.") for k in sd)
    assert any(k.startswith(UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k_ip") for k in sd)
    got = multiview_params_from_ldm(sd | {"first_stage_model.decoder.conv_in.weight": np.zeros(1)}, config)
    jax.tree.map(np.testing.assert_array_equal, got, params)
    # The released MVDream weights are a .pt pickle (opt-in); a safetensors conversion loads torch-free.
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, tmp_path / "mvdream.pt")
    save_file(sd, str(tmp_path / "mvdream.safetensors"))
    for name, pickle_ok in (("mvdream.pt", True), ("mvdream.safetensors", False)):
        loaded = load_state_dict(tmp_path / name, allow_pickle=pickle_ok)
        jax.tree.map(np.testing.assert_array_equal, multiview_params_from_ldm(loaded, config), params)
    with pytest.raises(ConversionError, match="pickle"):
        load_state_dict(tmp_path / "mvdream.pt")
    with pytest.raises(ConversionError, match="camera_embed"):
        multiview_params_from_ldm({k: v for k, v in sd.items() if "camera_embed.2.weight" not in k}
                                  | {UNET_PREFIX + "camera_embed.5.weight": np.zeros((1,), np.float32)}, config)


def test_plain_unet_plus_fresh_layers_starts_as_the_plain_unet(model) -> None:
    _, _, config, params, _ = model
    plain = {k: v for k, v in params.items() if k not in ("class_embedding", "reference_proj")}
    plain = {k: _drop_ip(v) for k, v in plain.items()}
    fresh = init_multiview_from_unet(config, plain, jax.random.key(0))
    assert np.abs(fresh["class_embedding"]["linear_1"]["kernel"]).max() > 0
    sample, t, text, cams, ref = _inputs(2, 1)
    plain_cfg = dataclasses.replace(config.unet, class_embed_type=None, projection_class_embeddings_input_dim=None)
    want = UNet2DConditionModel(plain_cfg).apply({"params": plain}, sample, t, text)
    got = multiview_apply(config, fresh, sample, t, text, num_views=1, cameras=cams, reference=ref)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(ValueError, match="do not fit"):
        init_multiview_from_unet(config, {**plain, "conv_in": {"kernel": np.zeros((1, 1, 4, 32)),
                                                               "bias": plain["conv_in"]["bias"]}}, jax.random.key(0))


def _drop_ip(tree):
    if not isinstance(tree, dict):
        return tree
    return {k: _drop_ip(v) for k, v in tree.items() if k not in ("to_k_ip", "to_v_ip")}


def test_bad_input_is_refused(model, tmp_path) -> None:
    import shutil

    _, _, config, params, folder = model
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    for extra, match in (({"reference": "depth"}, "reference must be None or one of"),
                         ({"views": 4}, r"expected an object with 'reference'.*\['views'\]"),
                         ([1, 2], "expected an object")):
        (tmp_path / MULTIVIEW_JSON).write_text(json.dumps(extra))
        with pytest.raises(ValueError, match=match):
            MultiViewConfig.from_folder(tmp_path)
    sample, t, text, cams, ref = _inputs(1, 4)
    kw = dict(num_views=4, cameras=cams, reference=ref)
    with pytest.raises(ValueError, match=r"Camera matrices must be \(4, 4, 4\)"):
        multiview_apply(config, params, sample, t, text, **{**kw, "cameras": cams[:, :3]})
    with pytest.raises(ValueError, match="dividing the batch of 4"):
        multiview_apply(config, params, sample, t, text, **{**kw, "num_views": 3})
    with pytest.raises(ValueError, match=r"reference must be VAE latents \(B, 4, h, w\)"):
        multiview_apply(config, params, sample, t, text, **{**kw, "reference": ref[:, :3]})
    with pytest.raises(ValueError, match="one reference per sample"):
        multiview_apply(config, params, sample, t, text, **{**kw, "reference": np.concatenate([ref, ref])})
    with pytest.raises(ValueError, match="num_views=4"):
        UNet2DConditionModel(config.unet, num_views=4).apply({"params": params}, sample[:3], t, text[:3])
    with pytest.raises(ValueError, match="projection_class_embeddings_input_dim=16"):
        MultiViewConfig(dataclasses.replace(config.unet, class_embed_type=None))


# ----------------------------------------------------------------------------------------------------------
# Pipeline and CLI
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mv_pipeline(tmp_path_factory, model):
    """A tiny SD2.1 pipeline folder whose unet/ is the multi-view reference model, and a random ΔW for it."""
    import shutil

    from perflow_jax import delta as delta_lib
    from perflow_jax.pipelines.multiview import split_base_params
    from tests.support.tiny_sd import make_tiny_pipeline

    root = tmp_path_factory.mktemp("mvpipe")
    make_tiny_pipeline(str(root / "pipe"), "sd21")
    shutil.rmtree(root / "pipe" / "unet")
    shutil.copytree(model[4], root / "pipe" / "unet")
    base, _ = split_base_params(model[3])
    rng = np.random.default_rng(3)
    delta = jax.tree.map(lambda v: (0.01 * rng.standard_normal(v.shape)).astype(np.float32), base)
    path = delta_lib.export(delta, root / "delta")
    return root / "pipe", path, delta


def test_orbit_cameras_look_at_the_origin() -> None:
    from perflow_jax.pipelines.multiview import orbit_cameras

    cams = orbit_cameras(30.0, [0.0, 90.0, 180.0, 270.0], distance=2.0)
    assert cams.shape == (4, 4, 4)
    for m in cams.astype(np.float64):
        np.testing.assert_allclose(m[:3, :3] @ m[:3, :3].T, np.eye(3), atol=1e-6)  # a rotation
        np.testing.assert_allclose(np.linalg.norm(m[:3, 3]), 2.0, rtol=1e-6)
        np.testing.assert_allclose(-m[:3, 2], -m[:3, 3] / 2.0, atol=1e-6)  # looks down -z at the origin
        np.testing.assert_allclose(np.degrees(np.arcsin(m[2, 3] / 2.0)), 30.0, rtol=1e-5)
    np.testing.assert_allclose(cams[1, :3, 3], [0.0, 2 * np.cos(np.radians(30)), 1.0], atol=1e-6)
    with pytest.raises(ValueError, match="elevation must be in"):
        orbit_cameras(90.0, [0.0])


@pytest.mark.slow(reason="compiles two 4-step multi-view programs (CFG + reference, and bf16 DDIM)")
def test_pipeline_with_delta_runs_at_four_steps(mv_pipeline, model) -> None:
    from perflow_jax.pipelines.multiview import MultiViewPipeline, split_base_params

    folder, delta_path, delta = mv_pipeline
    params = model[3]
    pipe = MultiViewPipeline.from_pretrained(folder, delta=delta_path)
    # ΔW lands on the 2D weights only; camera and reference layers are untouched.
    base, extra = split_base_params(pipe.params["unet"])
    _, extra0 = split_base_params(params)
    jax.tree.map(np.testing.assert_array_equal, extra, extra0)
    want = jax.tree.map(lambda w, d: np.asarray(w) + d, split_base_params(params)[0], delta)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), base, want)
    ref = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    images = pipe("a chair", num_views=4, elevation=15, num_inference_steps=4, guidance_scale=5.0,
                  reference_image=ref, seed=1)
    assert images.shape == (4, 16, 16, 3) and np.isfinite(images).all()
    assert np.abs(images[0] - images[1]).max() > 0  # different cameras, different views
    plain = MultiViewPipeline.from_pretrained(folder, scheduler="ddim", dtype=jnp.bfloat16)  # VAE stays fp32
    other = plain("a chair", num_views=2, num_inference_steps=4, guidance_scale=1.0, seed=1)
    assert other.shape == (2, 16, 16, 3) and other.dtype == np.float32 and np.isfinite(other).all()
    with pytest.raises(ValueError, match=r"cameras must be \(N, 4, 4\)"):
        pipe("a chair", cameras=np.zeros((4, 3, 4)))
    with pytest.raises(ValueError, match="reference_image must be an RGB image of the output size"):
        pipe("a chair", reference_image=ref[:8])
    with pytest.raises(ValueError, match="3 azimuths for num_views=4"):
        pipe("a chair", azimuths=[0, 90, 180])


def test_cli_multiview_writes_views_and_a_contact_sheet(mv_pipeline, tmp_path, capsys) -> None:
    from PIL import Image

    from perflow_jax.cli import main

    folder, delta_path, _ = mv_pipeline
    image = tmp_path / "ref.png"
    Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(image)
    out = tmp_path / "out"
    rc = main(["--no-cache", "multiview", "--model", str(folder), "--prompt", "a chair", "--image", str(image),
               "--views", "4", "--elevation", "15", "--steps", "4", "--delta", str(delta_path), "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    names = sorted(p.name for p in out.iterdir())
    assert [n for n in names if n.startswith("view_")] == [f"view_{i:04d}.png" for i in range(4)]
    assert "contact_sheet.png" in names
    assert np.asarray(Image.open(out / "contact_sheet.png")).shape[1] > 4 * 16
    rc = main(["--no-cache", "multiview", "--model", str(folder), "--prompt", "x", "--image", str(tmp_path / "no.png"),
               "--out", str(tmp_path / "o2")])
    assert rc == 2 and "--image" in capsys.readouterr().err


def test_pipeline_with_a_clip_reference(mv_pipeline, model, tmp_path) -> None:
    """A reference="clip" model in the pipeline: the reference image goes through CLIP preprocessing and the
    image encoder's penultimate states; its effect scales with the traced reference_scale (0: none at all)."""
    from perflow_jax.models.clip_vision import load_clip_vision_model
    from perflow_jax.pipelines.multiview import MultiViewPipeline
    from tests.support.tiny_ip_adapter import ENCODER, save_tiny_encoder

    _, _, config, params, _ = model
    latent = MultiViewPipeline.from_pretrained(mv_pipeline[0], scheduler="ddim")
    with pytest.raises(ValueError, match="image_encoder= is for reference='clip' models"):
        MultiViewPipeline.from_pretrained(mv_pipeline[0], image_encoder=tmp_path)
    hidden = ENCODER["hidden_size"]
    clip_cfg = MultiViewConfig(config.unet, reference="clip", reference_channels=hidden)
    base = {k: _drop_ip(v) for k, v in params.items() if k not in ("class_embedding", "reference_proj")}
    fresh = init_multiview_from_unet(clip_cfg, base, jax.random.key(1))
    fresh["reference_proj"]["kernel"] = np.random.default_rng(6).standard_normal((hidden, CROSS)).astype(np.float32)
    save_tiny_encoder(str(tmp_path / "enc"))
    enc_config, enc_params = load_clip_vision_model(tmp_path / "enc")
    ps = {**latent.params, "unet": fresh, "image_encoder": enc_params}
    pipe = MultiViewPipeline(clip_cfg, ps, latent.components, latent.scheduler, image_encoder_config=enc_config)
    rng = np.random.default_rng(0)
    ref_a, ref_b = (rng.integers(0, 256, (40, 56, 3), dtype=np.uint8) for _ in range(2))  # any size: CLIP crops
    run = lambda ref, scale: pipe("a chair", num_views=2, num_inference_steps=2, guidance_scale=3.0,  # noqa: E731
                                  reference_image=ref, reference_scale=scale, seed=1)
    off_a, off_b, on_a, on_b = run(ref_a, 0.0), run(ref_b, 0.0), run(ref_a, 1.0), run(ref_b, 1.0)
    assert len(pipe._compiled) == 1  # the scale is traced
    np.testing.assert_allclose(off_a, off_b, atol=1e-6)  # scale 0: the reference has no effect
    assert np.abs(on_a - on_b).max() > 1e-4 and np.abs(on_a - off_a).max() > 1e-4
    no_encoder = MultiViewPipeline(clip_cfg, {**latent.params, "unet": fresh}, latent.components, latent.scheduler)
    with pytest.raises(ValueError, match="needs this reference='clip' model's CLIP image encoder"):
        no_encoder("a chair", num_views=2, reference_image=ref_a)
    with pytest.raises(ValueError, match="hidden size is 32 but the model's reference_channels is 8"):
        MultiViewPipeline(MultiViewConfig(config.unet, reference="clip", reference_channels=8), ps,
                          latent.components, latent.scheduler, image_encoder_config=enc_config)
