"""Stable Video Diffusion against PyTorch diffusers on a tiny random model (tests/support/tiny_svd.py).

Tolerances (float32 on both sides; the same math with different kernels, ~1e-7 relative rounding per op):

* UNet, temporal VAE and image encoder outputs: 1e-5 absolute (outputs of magnitude ~1-3; measured ~3e-6).
* Conditioning tensors seen by the UNet (CLIP context, image latents): 1e-5.
* Frames in [0, 1]: 2e-3, about half a uint8 level (measured ~3e-5 here); a wrong fps − 1, 0.25·ln σ, guidance
  scale per frame, augmentation order or decode chunking moves pixels by ≥ 1e-2.
"""

from __future__ import annotations

import os
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

from perflow_jax import schedulers
from perflow_jax.cli import main
from perflow_jax.models.keymap import flax_attention_to_torch, rename_torch_attention
from perflow_jax.models.unet_spatiotemporal import UNetSpatioTemporalConditionModel, load_unet_spatiotemporal
from perflow_jax.models.vae_temporal import AutoencoderKLTemporalDecoder, decode_frames, load_temporal_vae
from perflow_jax.pipelines.video import VideoPipeline, VideoSpec, added_time_ids, frame_guidance_scales
from perflow_jax.video_io import write_video
from tests.support.tiny_svd import SVD_SCHEDULER, make_tiny_svd

TOL = 1e-5
FRAME_TOL = 2e-3
FRAMES, CHUNK, STEPS = 3, 2, 2  # odd frame count, a chunk size that does not divide it
H, W = 16, 24  # the tiny VAE downsamples 2×: 8×12 latents
SETTINGS = dict(num_frames=FRAMES, num_inference_steps=STEPS, decode_chunk_size=CHUNK, fps=9, motion_bucket_id=100,
                noise_aug_strength=0.1, min_guidance_scale=1.5, max_guidance_scale=3.0)
RNG = np.random.default_rng(0)
IMAGE = (RNG.random((H, W, 3)) * 255).astype(np.uint8)
LATENTS = RNG.standard_normal((1, FRAMES, 4, H // 2, W // 2)).astype(np.float32)
AUG_NOISE = RNG.standard_normal((1, 3, H, W)).astype(np.float32)


@pytest.fixture(scope="module")
def svd(tmp_path_factory):
    """(folder, diffusers pipeline, its UNet calls, its frames, our pipeline). The diffusers run gets our
    augmentation noise (its only other random draw) and records every UNet call."""
    from diffusers.pipelines.stable_video_diffusion import pipeline_stable_video_diffusion as svd_module

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    folder = str(tmp_path_factory.mktemp("svd") / "svd")
    pipe = make_tiny_svd(folder)
    calls = []

    def record(module, args, kwargs):
        sample, t = args[:2] if len(args) >= 2 else (args[0], kwargs["timestep"])
        calls.append({"sample": sample.numpy().copy(), "t": float(t),
                      "context": kwargs["encoder_hidden_states"].numpy(), "ids": kwargs["added_time_ids"].numpy()})

    handle = pipe.unet.register_forward_pre_hook(record, with_kwargs=True)
    with mock.patch.object(svd_module, "randn_tensor", lambda shape, **_: torch.from_numpy(AUG_NOISE)):
        frames = pipe(Image.fromarray(IMAGE), height=H, width=W, latents=torch.from_numpy(LATENTS),
                      output_type="np", **SETTINGS).frames[0]
    handle.remove()
    yield folder, pipe, calls, frames, VideoPipeline.from_pretrained(folder)
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------


def test_unet_with_frames_matches_diffusers(svd):
    folder, pipe, *_ = svd
    config, params = load_unet_spatiotemporal(os.path.join(folder, "unet"))
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, FRAMES, 8, 6, 10, generator=g), torch.randn(2, 1, 32, generator=g)
    ids = torch.tensor([[6.0, 127.0, 0.02], [3.0, 20.0, 0.5]])
    with torch.no_grad():
        ref = pipe.unet(x, torch.tensor([0.3, -1.2]), ctx, ids).sample.numpy()
    out = jax.jit(UNetSpatioTemporalConditionModel(config).apply)(
        {"params": params}, jnp.asarray(x.numpy()), jnp.asarray([0.3, -1.2]), jnp.asarray(ctx.numpy()),
        jnp.asarray(ids.numpy()))
    assert out.shape == ref.shape
    np.testing.assert_allclose(np.asarray(out), ref, atol=TOL, rtol=0)


def test_temporal_vae_matches_diffusers(svd):
    folder, pipe, *_ = svd
    config, params = load_temporal_vae(os.path.join(folder, "vae"))
    g = torch.Generator().manual_seed(1)
    images, z = torch.rand(2, 3, H, W, generator=g) * 2 - 1, torch.randn(FRAMES, 4, 8, 12, generator=g)
    with torch.no_grad():
        mean = pipe.vae.encode(images).latent_dist.mode().numpy()
        whole = pipe.vae.decode(z, num_frames=FRAMES).sample.numpy()
    vae = AutoencoderKLTemporalDecoder(config, FRAMES)
    np.testing.assert_allclose(np.asarray(vae.apply({"params": params}, jnp.asarray(images.numpy()),
                                                    method=vae.encode).mode()), mean, atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(vae.apply({"params": params}, jnp.asarray(z.numpy()), method=vae.decode)),
                               whole, atol=TOL, rtol=0)


def test_image_encoder_matches_diffusers(svd):
    _, pipe, calls, _, ours = svd
    ref = calls[0]["context"]  # [zeros; CLIP image_embeds] as the diffusers UNet saw it
    emb = ours.encode_image(ours.params, jnp.asarray(IMAGE, jnp.float32)[None] / 255.0)
    assert emb.shape == (1, 1, 32)
    np.testing.assert_allclose(np.asarray(emb)[0], ref[1], atol=TOL, rtol=0)
    assert not ref[0].any()  # the unconditional context is zeros


# ----------------------------------------------------------------------------------------------------------
# Scheduler on SVD's config
# ----------------------------------------------------------------------------------------------------------


def test_euler_matches_diffusers_on_svd_scheduler_config():
    from diffusers import EulerDiscreteScheduler

    ref = EulerDiscreteScheduler.from_config(SVD_SCHEDULER)
    ref.set_timesteps(5)
    ours = schedulers.from_config({**SVD_SCHEDULER, "_class_name": "EulerDiscreteScheduler"})
    state = ours.set_timesteps(5)
    np.testing.assert_allclose(np.asarray(state.sigmas), ref.sigmas.numpy(), rtol=1e-6)
    # continuous v-prediction timesteps are 0.25·ln σ, not discrete indices
    np.testing.assert_allclose(np.asarray(state.timesteps), 0.25 * np.log(ref.sigmas.numpy()[:-1]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(state.timesteps), ref.timesteps.numpy(), rtol=1e-6)
    np.testing.assert_allclose(float(ours.init_noise_sigma(state)), float(ref.init_noise_sigma), rtol=1e-6)
    x = np.random.default_rng(2).standard_normal((1, 3, 4, 2, 2)).astype(np.float32)
    v = np.random.default_rng(3).standard_normal(x.shape).astype(np.float32)
    xt = torch.from_numpy(x)
    for i, t in enumerate(ref.timesteps):
        scaled = ref.scale_model_input(xt, t)
        np.testing.assert_allclose(np.asarray(ours.scale_model_input(state, jnp.asarray(xt.numpy()), i)),
                                   scaled.numpy(), rtol=1e-6, atol=1e-6)
        nxt = ref.step(torch.from_numpy(v), t, xt).prev_sample
        got, state = ours.step(state, jnp.asarray(v), i, jnp.asarray(xt.numpy()))
        np.testing.assert_allclose(np.asarray(got), nxt.numpy(), rtol=1e-5, atol=1e-5)
        xt = nxt


# ----------------------------------------------------------------------------------------------------------
# Pipeline: every detail on its own, then the frames
# ----------------------------------------------------------------------------------------------------------


def test_noise_augmentation_in_pixel_space_before_encoding(svd):
    _, pipe, calls, _, ours = svd
    image = jnp.asarray(IMAGE, jnp.float32)[None] / 255.0
    strength = SETTINGS["noise_aug_strength"]
    latents = np.asarray(ours.encode_condition(ours.params, image, jnp.asarray(AUG_NOISE), strength))
    seen = calls[0]["sample"][:, :, 4:]  # the channels concatenated to the sample: [zeros; image latents]
    for f in range(FRAMES):
        np.testing.assert_allclose(latents[0], seen[1, f], atol=TOL, rtol=0)
    assert not seen[0].any()
    clean = np.asarray(ours.encode_condition(ours.params, image, jnp.asarray(AUG_NOISE), 0.0))
    assert np.abs(clean - latents).max() > 1e-2  # the augmentation reaches the latents through the encoder


def test_added_time_ids_are_fps_minus_one(svd):
    calls = svd[2]
    ids = np.asarray(added_time_ids(SETTINGS["fps"], SETTINGS["motion_bucket_id"], SETTINGS["noise_aug_strength"]))
    np.testing.assert_allclose(ids, [[SETTINGS["fps"] - 1, SETTINGS["motion_bucket_id"], 0.1]], rtol=1e-7)
    for call in calls:
        np.testing.assert_allclose(call["ids"], np.concatenate([ids, ids]), rtol=1e-7)


def test_guidance_per_frame_in_one_batched_unet_call(svd):
    _, _, calls, _, ours = svd
    scales = np.asarray(frame_guidance_scales(1.5, 3.0, FRAMES))
    # torch.linspace's own float32 rule; XLA may fuse start + step·i into one FMA (1 ulp)
    np.testing.assert_allclose(scales, torch.linspace(1.5, 3.0, FRAMES).numpy()[None], rtol=2e-7)
    np.testing.assert_allclose(np.asarray(frame_guidance_scales(1.0, 3.0, 14)),
                               torch.linspace(1.0, 3.0, 14).numpy()[None], rtol=2e-7)
    assert scales[0, 0] == 1.5 and scales[0, -1] == 3.0
    assert len(calls) == STEPS and all(c["sample"].shape[0] == 2 for c in calls)  # diffusers: [uncond; cond]
    # ours: one UNet call per step on the stacked batch, the per-frame scale applied to u + w·(c − u)
    seen = []
    apply = UNetSpatioTemporalConditionModel.apply

    def spy(self, variables, sample, *args, **kwargs):
        seen.append(sample.shape)
        return apply(self, variables, sample, *args, **kwargs)

    state = ours.scheduler.set_timesteps(1)  # one step: the frames' guidance scales act on one UNet output
    context = jnp.asarray(calls[0]["context"][1:])  # the conditioning as diffusers built it (checked above)
    cond = jnp.asarray(calls[0]["sample"][1:, 0, 4:])
    x = jnp.asarray(LATENTS) * ours.scheduler.init_noise_sigma(state)

    @jax.jit
    def run(guidance: jax.Array) -> jax.Array:
        return ours.denoise(ours.params, x, context, cond, added_time_ids(9, 100, 0.1), guidance, state)

    with mock.patch.object(UNetSpatioTemporalConditionModel, "apply", spy):
        got = np.asarray(run(scales))
        flat = np.asarray(run(np.full((1, FRAMES), 3.0, np.float32)))  # same program: the scales are traced
    assert seen == [(2, FRAMES, 8, H // 2, W // 2)]  # one UNet call on the stacked [uncond; cond] batch
    assert np.abs(got[0, 0] - flat[0, 0]).max() > 1e-3  # frame 0 guided with 1.5, not 3
    np.testing.assert_allclose(got[0, -1], flat[0, -1], atol=1e-5)  # the last frame with 3 in both


def test_decode_chunks_match_diffusers_for_any_chunk_size(svd):
    """diffusers decodes each chunk as its own clip (the decoder mixes the frames of a clip), so the frames depend
    on the chunk size in diffusers itself; ours match diffusers' for every chunk size."""
    folder, pipe, *_ = svd
    config, params = load_temporal_vae(os.path.join(folder, "vae"))
    z = np.random.default_rng(4).standard_normal((1, FRAMES, 4, 8, 12)).astype(np.float32)
    outs = {}
    for chunk in (1, 2, FRAMES):
        with torch.no_grad():
            ref = pipe.decode_latents(torch.from_numpy(z), FRAMES, chunk)[0].permute(1, 0, 2, 3).numpy()
        ours = np.asarray(decode_frames(config, params, jnp.asarray(z[0]) / config.scaling_factor, chunk))
        np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)
        outs[chunk] = ours
    assert np.abs(outs[2] - outs[FRAMES]).max() > 1e-3


def test_frames_match_diffusers(svd):
    *_, frames, ours = svd
    out = ours(IMAGE, latents=LATENTS, aug_noise=AUG_NOISE, **SETTINGS)
    assert out.shape == frames.shape == (FRAMES, H, W, 3)
    np.testing.assert_allclose(out, frames, atol=FRAME_TOL, rtol=0)
    # one compiled program per shape: new fps / motion / strength / guidance reuse it
    ours(IMAGE, latents=LATENTS, aug_noise=AUG_NOISE, **{**SETTINGS, "fps": 6, "motion_bucket_id": 3,
                                                         "noise_aug_strength": 0.3, "min_guidance_scale": 2.0})
    assert len(ours._programs) == 1 and next(iter(ours._programs.values()))._cache_size() == 1


def _find(jaxpr, name: str | None) -> list:
    """The equations of `jaxpr` (into nested jaxprs, not into scans' bodies) named `name` (all if None)."""
    found = []
    for e in jaxpr.eqns:
        if name is None or e.primitive.name == name:
            found.append(e)
        if e.primitive.name != "scan":
            for p in e.params.values():
                inner = getattr(p, "jaxpr", None)
                if inner is not None:
                    found += _find(getattr(inner, "jaxpr", inner), name)
    return found


def test_bfloat16_model_with_float32_scheduler_math(svd):
    """bf16 UNet and image encoder (traced only, to stay within the test budget): the sampler's latents, the
    guidance and the decoded frames stay float32."""
    folder, *_ = svd
    ours = VideoPipeline.from_pretrained(folder, dtype=jnp.bfloat16)
    assert jax.tree_util.tree_leaves(ours.params["unet"])[0].dtype == jnp.bfloat16
    state = ours.scheduler.set_timesteps(STEPS)
    spec = VideoSpec(H, W, FRAMES, STEPS, CHUNK, True)
    args = (ours.params, jnp.zeros((1, H, W, 3)), jnp.asarray(LATENTS), jnp.asarray(AUG_NOISE), jnp.ones(5), state)
    scans = _find(jax.make_jaxpr(ours.program(spec))(*args).jaxpr, "scan")
    assert len(scans) == 1 and scans[0].outvars[0].aval.dtype == jnp.float32  # the carried latents
    assert any(v.aval.dtype == jnp.bfloat16 for e in _find(scans[0].params["jaxpr"].jaxpr, None) for v in e.outvars)
    assert jax.eval_shape(ours.program(spec), *args).dtype == jnp.float32


# ----------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("image", "kwargs", "match"), [
    (IMAGE[..., 0], {}, "RGB image"),
    (np.concatenate([IMAGE, IMAGE[..., :1]], axis=-1), {}, "RGB image"),
    (IMAGE[:12], {}, "multiples of 8"),
    (IMAGE, {"num_frames": 0}, "num_frames"),
    (IMAGE, {"fps": 0}, "fps"),
    (IMAGE, {"decode_chunk_size": 0}, "decode_chunk_size"),
    (IMAGE, {"latents": LATENTS[:, :2]}, "latents must have shape"),
])
def test_bad_input_is_refused_in_one_line(svd, image, kwargs, match):
    ours = svd[4]
    with pytest.raises(ValueError, match=match) as err:
        ours(image, **{**SETTINGS, "num_inference_steps": 1, **kwargs})
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------------------------------------
# Video files and the CLI
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", [".gif", ".png", ".mp4"])
def test_video_writers_round_trip(tmp_path, ext):
    import imageio.v3 as iio

    frames = np.zeros((3, 16, 24, 3), np.uint8)
    frames[1], frames[2] = 128, 255
    path = write_video(frames, tmp_path / f"v{ext}", fps=7)
    back = iio.imread(path)  # a (F, H, W, C) stack
    assert back.shape[:3] == (3, 16, 24)
    means = back[..., :3].reshape(3, -1).mean(axis=1)
    np.testing.assert_allclose(means, [0, 128, 255], atol=3)  # lossy H.264 within 3 levels; GIF/APNG exact
    assert sorted(os.listdir(tmp_path)) == [f"v{ext}"]  # no temp file left


def test_mp4_without_the_video_extra_is_a_clear_error(tmp_path):
    with mock.patch("perflow_jax.video_io.has_mp4_writer", return_value=False), \
            pytest.raises(ValueError, match=r"\[video\] extra"):
        write_video(np.zeros((2, 8, 8, 3), np.uint8), tmp_path / "v.mp4", fps=7)
    assert not os.listdir(tmp_path)


def test_cli_video_writes_video_and_contact_sheet(svd, tmp_path, capsys, monkeypatch):
    folder, ours = svd[0], svd[4]
    # the fixture's pipeline, already compiled for this shape (the loader itself is tested above)
    monkeypatch.setattr(VideoPipeline, "from_pretrained", classmethod(lambda cls, *a, **k: ours))
    image = tmp_path / "in.png"
    Image.fromarray(IMAGE).save(image)
    out = tmp_path / "out.mp4"
    assert main(["--no-cache", "video", "--model", folder, "--image", str(image), "--frames", "3", "--fps", "7",
                 "--motion-bucket-id", "127", "--steps", str(STEPS), "--decode-chunk-size", str(CHUNK),
                 "--out", str(out)]) == 0
    assert out.is_file() and (tmp_path / "out.sheet.png").is_file()
    sheet = np.asarray(Image.open(tmp_path / "out.sheet.png"))
    assert sheet.shape[0] > H and sheet.shape[1] > 2 * W  # 3 frames tiled
    Image.fromarray(IMAGE).convert("L").save(tmp_path / "gray.png")
    assert main(["--no-cache", "video", "--model", folder, "--image", str(tmp_path / "gray.png"),
                 "--out", str(tmp_path / "x.gif")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs RGB" in err[0]
    Image.fromarray(IMAGE[:12]).save(tmp_path / "odd.png")
    assert main(["--no-cache", "video", "--model", folder, "--image", str(tmp_path / "odd.png"), "--steps", "1",
                 "--out", str(tmp_path / "x.gif")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "multiples of 8" in err[0]
    with pytest.raises(SystemExit) as exit_:  # argparse refuses frames < 1 before loading anything
        main(["video", "--model", folder, "--image", str(image), "--frames", "0", "--out", "x.gif"])
    assert exit_.value.code == 2 and "--frames" in capsys.readouterr().err


def test_strict_conversion_and_round_trip(svd, tmp_path):
    """Every key accounted for: a config that does not fit the weights lists the mismatches; Flax → PyTorch gives
    back the file's keys and values (3-D temporal kernels re-laid OIDHW ↔ DHWIO)."""
    import json
    import shutil

    from safetensors.numpy import load_file

    from perflow_jax.models.convert import torch_state_dict
    from perflow_jax.models.mismatch import ConversionError

    folder = svd[0]
    config, params = load_temporal_vae(os.path.join(folder, "vae"))
    ref = load_file(os.path.join(folder, "vae", "diffusion_pytorch_model.safetensors"))
    back = torch_state_dict(params, key=flax_attention_to_torch, rename=rename_torch_attention)
    assert back.keys() == ref.keys()
    assert all(np.array_equal(back[k], ref[k]) for k in ref)
    assert ref["decoder.time_conv_out.weight"].ndim == 5
    bad = tmp_path / "vae"
    shutil.copytree(os.path.join(folder, "vae"), bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "layers_per_block": 3}))
    with pytest.raises(ConversionError, match="missing"):
        load_temporal_vae(bad)
