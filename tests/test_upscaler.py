"""The SD ×2 latent upscaler against PyTorch diffusers on a tiny random model (tests/support/tiny_upscaler.py).

Tolerances (float32 on both sides; the two sides run the same math with different kernels, ~1e-7 relative
rounding per op):

* UNet output: 1e-5 absolute on outputs of magnitude ~3 (measured ~3e-6 here).
* Decoded float images in [0, 1]: 2e-3, about half a uint8 level, as for the SD pipelines (measured ~2e-6);
  a wrong σ, c_skip/c_out/c_in/c_noise, noise-level feature or guidance term moves pixels by ≥ 1e-2.
* ×2 latents (magnitude ~3, before the VAE decoder's contraction): 1e-4 (measured ~2e-6).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
import pytest
import torch
from PIL import Image

from perflow_jax.cli import main
from perflow_jax.models.upscaler_unet import UpscalerUNet, UpscalerUNetConfig, load_upscaler_unet
from perflow_jax.pipelines.upscale import LatentUpscalePipeline, load_upscaler_components
from perflow_jax.schedulers.euler import karras_preconditioning
from tests.support.tiny_sd import make_tiny_pipeline
from tests.support.tiny_upscaler import make_tiny_upscaler

UNET_TOL = 1e-5
IMAGE_TOL = 2e-3
LATENT_TOL = 1e-4
STEPS = 4
PROMPTS = ["a cat on the mat", "the red dog"]
NEGATIVES = ["blurry", "a dog"]
LOW_RES = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)  # scaled SD latents
NOISE = np.random.default_rng(1).standard_normal((2, 4, 16, 16)).astype(np.float32)  # the ×2 initial noise


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny upscaler saved once: (folder, diffusers pipeline, perflow_jax pipeline). PyTorch on one thread
    (the 2 shared CI cores make its thread pool slow on tiny models)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    folder = str(tmp_path_factory.mktemp("upscaler") / "up")
    torch_pipe = make_tiny_upscaler(folder)
    yield folder, torch_pipe, LatentUpscalePipeline.from_pretrained(folder)
    torch.set_num_threads(threads)


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.mark.parametrize("sigma_data", [1.0, 0.5])
def test_karras_preconditioning_matches_the_formulas(sigma_data: float) -> None:
    """c_skip, c_out, c_in, c_noise (Karras et al. 2022, Table 1) against a float64 NumPy oracle, within float32
    rounding (2e-6 relative)."""
    sigma = np.array([0.0292, 1.0, 14.6146], np.float64)  # the SD schedule's ends and a middle value
    d2 = sigma_data**2
    want = (d2 / (sigma**2 + d2), sigma * sigma_data / np.sqrt(sigma**2 + d2), 1 / np.sqrt(sigma**2 + d2),
            np.log(sigma) / 4)
    got = karras_preconditioning(sigma.astype(np.float32), sigma_data)
    for name, g, w in zip(("c_skip", "c_out", "c_in", "c_noise"), got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=2e-6, atol=1e-7, err_msg=name)


def test_unet_matches_diffusers(tiny) -> None:
    """Converted without torch, the Flax K-upscaler UNet gives PyTorch's output within 1e-5, on a non-square map
    with per-sample continuous timesteps (c_noise = log σ / 4, negative and positive)."""
    folder, torch_pipe, _ = tiny
    config, params = load_upscaler_unet(os.path.join(folder, "unet"))
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 8, 16, 8)).astype(np.float32)
    t = np.array([-0.6, 0.9], np.float32)
    ctx = rng.standard_normal((2, 7, 32)).astype(np.float32)
    cond = rng.standard_normal((2, 160)).astype(np.float32)
    out = jax.jit(lambda p, *a: UpscalerUNet(config).apply({"params": p}, *a))(params, x, t, ctx, cond)
    with torch.no_grad():
        ref = torch_pipe.unet(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx),
                              timestep_cond=torch.from_numpy(cond)).sample.numpy()
    diff = _max_diff(out, ref)
    print(f"\n[upscaler UNet] max |flax - torch| = {diff:.2e} (|out| ≤ {np.abs(ref).max():.2f})")
    assert out.shape == ref.shape == (2, 5, 16, 8) and diff < UNET_TOL


def test_images_match_diffusers_with_guidance(tiny, monkeypatch) -> None:
    """Images in, images out, with prompts, negative prompts and CFG 3.0: within 2e-3 of diffusers'
    StableDiffusionLatentUpscalePipeline given the same initial noise and the same VAE posterior noise (ours is
    row i's fold_in(fold_in(key(seed), i), 1) draw; diffusers' posterior sample is patched to use it). A second
    call with other prompts, guidance and seed reuses the compiled program."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    _, torch_pipe, pipe = tiny
    images = np.random.default_rng(3).uniform(size=(2, 16, 16, 3)).astype(np.float32)
    seed = 7
    eps = np.stack([np.asarray(jax.random.normal(jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), i), 1),
                                                 (4, 8, 8))) for i in range(2)])
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample",
                        lambda self, generator=None: self.mean + self.std * torch.from_numpy(eps))

    kw = dict(num_inference_steps=STEPS, guidance_scale=3.0)
    ours = pipe(PROMPTS, image=images, negative_prompt=NEGATIVES, noise=NOISE, seed=seed, output_type="float", **kw)
    with torch.no_grad():
        ref = torch_pipe(PROMPTS, image=torch.from_numpy(images.transpose(0, 3, 1, 2)), negative_prompt=NEGATIVES,
                         latents=torch.from_numpy(NOISE), output_type="np", **kw).images
    diff = _max_diff(ours, ref)
    print(f"\n[upscaler, images, CFG 3] max |perflow_jax - diffusers| = {diff:.2e}")
    assert ours.shape == ref.shape == (2, 32, 32, 3) and ours.dtype == np.float32
    assert diff < IMAGE_TOL and np.std(ours) > 0.02

    again = pipe(PROMPTS[::-1], image=images, noise=NOISE, seed=seed + 1, output_type="float",
                 num_inference_steps=STEPS, guidance_scale=5.0)
    assert pipe.stats.num_compiled == 1 and pipe.stats.compile_seconds < 0.1  # a cache hit
    assert _max_diff(again, ours) > 1e-3  # prompts, guidance and posterior noise are real inputs


def test_latent_stage_matches_diffusers_without_guidance(tiny) -> None:
    """Latents in, ×2 latents out (the stage after text-to-image), guidance 0 (diffusers' example setting: no
    CFG, empty prompts), seeded noise: within 1e-4 of diffusers' output_type="latent" given our noise, row i's
    normal(fold_in(fold_in(key(seed), i), 0)) draw (so it does not depend on the batch split)."""
    _, torch_pipe, pipe = tiny
    seed = 3
    noise = np.stack([np.asarray(jax.random.normal(
        jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), i), 0), (4, 16, 16))) for i in range(2)])
    ours = pipe(PROMPTS, latents=LOW_RES, seed=seed, num_inference_steps=STEPS, guidance_scale=0.0,
                output_type="latent")
    with torch.no_grad():
        ref = torch_pipe(PROMPTS, image=torch.from_numpy(LOW_RES), latents=torch.from_numpy(noise),
                         num_inference_steps=STEPS, guidance_scale=0.0, output_type="latent").images.numpy()
    diff = _max_diff(ours, ref)
    print(f"\n[upscaler, latents, no CFG] max |perflow_jax - diffusers| = {diff:.2e}")
    assert ours.shape == ref.shape == (2, 4, 16, 16) and diff < LATENT_TOL


@pytest.mark.parametrize("kwargs,message", [
    (dict(), "exactly one of them"),
    (dict(latents=LOW_RES, image=np.zeros((2, 16, 16, 3))), "exactly one of them"),
    (dict(latents=LOW_RES[:, :3]), "(B, 4, h, w)"),
    (dict(latents=LOW_RES[:, :, :7]), "multiples of 2"),
    (dict(latents=np.full_like(LOW_RES, np.nan)), "finite"),
    (dict(image=np.zeros((2, 14, 16, 3))), "multiples of 4"),
    (dict(image=np.full((2, 16, 16, 3), np.inf, np.float32)), "image has non-finite values"),
    (dict(latents=np.zeros((3, 4, 8, 8), np.float32)), "3 inputs"),
    (dict(latents=LOW_RES, noise=NOISE[:, :, :8]), "noise must have shape (2, 4, 16, 16)"),
    (dict(latents=LOW_RES, output_type="png"), "output_type"),
    (dict(latents=LOW_RES, guidance_scale=float("nan")), "guidance_scale"),
    (dict(latents=LOW_RES, num_inference_steps=0), "num_inference_steps"),
    (dict(latents=LOW_RES, negative_prompt=["a", "b", "c"]), "negative prompts"),
])
def test_bad_call_is_a_clear_error(tiny, kwargs, message) -> None:
    """Bad input is refused before anything compiles, with the argument named."""
    pipe = tiny[2]
    with pytest.raises(ValueError) as e:
        pipe.build_request(PROMPTS, **kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_model_is_a_clear_error(tiny, tmp_path) -> None:
    """An SD UNet is not a K-upscaler; a UNet that does not fit the text encoder is named; the UNet refuses a
    map its K blocks cannot take."""
    folder = tiny[0]
    with pytest.raises(ValueError, match="not a latent-upscaler UNet: down_block_types"):
        UpscalerUNetConfig.from_dict({"down_block_types": ["CrossAttnDownBlock2D"] * 4})
    with pytest.raises(ValueError, match="down_block_types must list one of"):
        UpscalerUNetConfig(down_block_types=("KDownBlock2D", "DownBlock2D", "KCrossAttnDownBlock2D",
                                             "KCrossAttnDownBlock2D"))
    with pytest.raises(ValueError, match="mid_block_type"):
        UpscalerUNetConfig.from_dict({"mid_block_type": "UNetMidBlock2DCrossAttn"})
    comps = load_upscaler_components(folder)
    bad = dataclasses.replace(comps, unet_config=dataclasses.replace(comps.unet_config, time_cond_proj_dim=100))
    with pytest.raises(ValueError, match=r"time_cond_proj_dim=100 \(needs 128 noise-level features"):
        LatentUpscalePipeline(bad)
    with pytest.raises(ValueError, match="multiples of 4"):
        UpscalerUNet(comps.unet_config).apply({"params": comps.unet_params}, np.zeros((1, 8, 6, 8)), 0.0,
                                              np.zeros((1, 1, 32)), np.zeros((1, 160)))
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_upscaler_components(os.path.join(folder, "unet"))


def test_convert_to_flax_and_load(tiny, tmp_path) -> None:
    """`perflow-jax convert` of an upscaler folder writes Flax checkpoints (the K-block UNet told apart from an
    SD UNet by its block types) that load back to the same params; a PeRFlow ΔW is refused for it."""
    folder = tiny[0]
    assert main(["convert", folder, str(tmp_path / "flax")]) == 0
    assert os.path.isfile(tmp_path / "flax" / "unet" / "flax_model.msgpack")
    a, b = load_upscaler_components(folder), load_upscaler_components(str(tmp_path / "flax"))
    for name in ("unet_params", "vae_params", "text_encoder_params"):
        la, lb = jax.tree_util.tree_leaves(getattr(a, name)), jax.tree_util.tree_leaves(getattr(b, name))
        assert len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb, strict=True)), name
    from perflow_jax.models.components import convert_to_flax

    with pytest.raises(ValueError, match="latent upscaler's UNet"):
        convert_to_flax(folder, str(tmp_path / "merged"), unet_transform=lambda p: p)


@pytest.mark.slow(reason="compiles a text-to-image and an upscaler program (~40 s on 2 CPU cores)")
def test_cli_upscale_after_text_to_image(tiny, tmp_path, capsys) -> None:
    """`perflow-jax sample --upscale 2 --upscaler DIR`: the text-to-image latents are upscaled ×2 before
    decoding, so the PNGs are twice the size; the upscale options need each other; one-line errors."""
    sd = str(tmp_path / "sd")
    make_tiny_pipeline(sd, "sd15")
    out = tmp_path / "out"
    argv = ["sample", "--model", sd, "--prompt", "a cat", "--num-images", "2", "--steps", "2", "--height", "32",
            "--width", "32", "--out", str(out)]
    assert main([*argv, "--upscale", "2", "--upscaler", tiny[0], "--upscale-steps", "2"]) == 0, \
        capsys.readouterr().err
    assert "loaded upscaler" in capsys.readouterr().out
    img = np.asarray(Image.open(out / "image_0001.png"))
    assert img.shape == (64, 64, 3) and img.std() > 0
    for extra, message in ((["--upscale", "2"], "needs --upscaler"), (["--upscaler", tiny[0]], "needs --upscale 2"),
                           (["--upscale-guidance", "1"], "needs --upscale 2"),
                           (["--upscale", "2", "--upscaler", sd], "not a latent-upscaler UNet")):
        assert main([*argv, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err
    assert main(["sample", "--model", "digits", "--prompt", "1", "--upscale", "2", "--out", str(out)]) == 2
    assert "--upscale" in capsys.readouterr().err
