"""ControlNet (models/controlnet.py, pipelines/controlnet.py) against PyTorch diffusers on tiny random models.

Tiny SD1-, SD2- and SDXL-style pipelines (``tests/support/tiny_sd.py``) with tiny random ControlNets built by
``ControlNetModel.from_unet`` (every parameter perturbed, so the zero convs are not zero), saved with
``save_pretrained`` and loaded by perflow_jax's converter.

Tolerances:
- residuals: 1e-5 absolute (values of order 1): one float32 ControlNet forward on each side, same math,
  different kernels; measured ~3e-6.
- images: 2e-3 on decoded float images in [0, 1] (as tests/test_pipelines.py: about half a uint8 level; a wrong
  residual, scale, keep step or guidance term moves pixels by ≥ 1e-2); measured a few 1e-6.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from perflow_jax.models.adapter import UNetCondition
from perflow_jax.models.controlnet import ControlNetModel, controlnet_apply, load_controlnet
from perflow_jax.pipelines.controlnet import StableDiffusionControlNetPipeline, control_keep
from perflow_jax.pipelines.stable_diffusion import StableDiffusionPipeline
from tests.support.tiny_sd import make_tiny_controlnet, make_tiny_pipeline
from tests.support.torch_perflow import TorchPeRFlowScheduler

H = W = 32
STEPS = 4
PROMPTS = ["a cat on the mat", "the red dog"]
LATENTS = np.random.default_rng(0).standard_normal((2, 4, H // 2, W // 2)).astype(np.float32)
IMAGES = [np.random.default_rng(5 + k).uniform(0, 1, (2, H, W, 3)).astype(np.float32) for k in range(2)]
RESIDUAL_TOL = 1e-5
PARITY_TOL = 2e-3


class Tiny:
    """One family's saved tiny model and two ControlNets (PyTorch objects and folders)."""

    def __init__(self, root, family: str):
        self.family = family
        self.folder = str(root / "model")
        self.torch_pipe = make_tiny_pipeline(self.folder, family)
        self.net_dirs = [str(root / f"controlnet{k}") for k in range(2)]
        self.nets = [make_tiny_controlnet(d, family, seed=10 + k) for k, d in enumerate(self.net_dirs)]
        self._pipes: dict = {}

    def pipe(self, nets: int, scheduler: str = "perflow") -> StableDiffusionControlNetPipeline:
        if (nets, scheduler) not in self._pipes:
            self._pipes[nets, scheduler] = StableDiffusionControlNetPipeline.from_pretrained(
                self.folder, controlnets=self.net_dirs[:nets], scheduler=scheduler)
        return self._pipes[nets, scheduler]

    def torch_controlnet_pipe(self, nets: int, img2img: bool = False):
        from diffusers import (
            StableDiffusionControlNetImg2ImgPipeline,
            StableDiffusionControlNetPipeline,
            StableDiffusionXLControlNetPipeline,
        )
        from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

        comps = dict(self.torch_pipe.components)
        if self.family == "sdxl":
            cls = StableDiffusionXLControlNetPipeline
        else:
            cls = StableDiffusionControlNetImg2ImgPipeline if img2img else StableDiffusionControlNetPipeline
            comps["requires_safety_checker"] = False
        comps["controlnet"] = self.nets[0] if nets == 1 else MultiControlNetModel(self.nets[:nets])
        pipe = cls(**comps)
        pipe.set_progress_bar_config(disable=True)
        return pipe


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Lazily built tiny models and ControlNets per family (PyTorch on one thread, as in test_pipelines)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tiny_controlnet")
    models: dict[str, Tiny] = {}

    def get(family: str) -> Tiny:
        if family not in models:
            (root / family).mkdir()
            models[family] = Tiny(root / family, family)
        return models[family]

    yield get
    torch.set_num_threads(threads)


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _torch_images(images):
    return [torch.from_numpy(i).permute(0, 3, 1, 2) for i in images]


# --------------------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd15", "sd21", "sdxl"])
def test_residuals_match_diffusers(tiny, family: str) -> None:
    """Down and mid residuals of the converted ControlNet vs diffusers' ControlNetModel, non-square latents,
    per-sample timesteps, scale 0.7, with and without guess mode: within 1e-5 (module docstring)."""
    m = tiny(family)
    net = m.nets[0]
    config, params = load_controlnet(m.net_dirs[0])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 8, 12)).astype(np.float32)
    image = rng.uniform(0, 1, (2, 3, 16, 24)).astype(np.float32)
    context = rng.standard_normal((2, 5, config.encoder_dim)).astype(np.float32)
    t = np.array([500.0, 250.0], np.float32)
    cond, kw = UNetCondition(encoder_hidden_states=context), {}
    if family == "sdxl":
        text, ids = rng.standard_normal((2, 16)).astype(np.float32), rng.uniform(0, 64, (2, 6)).astype(np.float32)
        cond = cond._replace(text_embeds=text, time_ids=ids)
        kw = {"added_cond_kwargs": {"text_embeds": torch.from_numpy(text), "time_ids": torch.from_numpy(ids)}}
    for guess in (False, True):
        down, mid = controlnet_apply(ControlNetModel(config), params, x, t, cond, image, 0.7, guess)
        with torch.no_grad():
            ref_down, ref_mid = net(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(context),
                                    torch.from_numpy(image), conditioning_scale=0.7, guess_mode=guess,
                                    return_dict=False, **kw)
        assert len(down) == len(ref_down)
        diff = max(_max_diff(a, b.numpy()) for a, b in zip([*down, mid], [*ref_down, ref_mid], strict=True))
        print(f"\n[{family}] guess_mode={guess}: residuals max |perflow_jax - diffusers| = {diff:.2e}")
        assert diff < RESIDUAL_TOL
        assert min(float(np.abs(b.numpy()).max()) for b in ref_down) > 0.01  # not trivially zero


def test_control_keep_matches_diffusers_rule() -> None:
    """The keep table is diffusers' rule over the steps run: img2img counts from its first step."""
    np.testing.assert_array_equal(control_keep(4, 0, [0.0, 0.25], [0.75, 1.0]),
                                  [[1, 0], [1, 1], [1, 1], [0, 1]])
    np.testing.assert_array_equal(control_keep(5, 3, [0.5], [1.0]), [[0], [0], [0], [0], [1]])


# --------------------------------------------------------------------------------------------------------------
# Pipelines vs diffusers
# --------------------------------------------------------------------------------------------------------------


def _compare_text_to_image(m: Tiny, nets: int, **control) -> np.ndarray:
    pipe = m.pipe(nets)
    ref = m.torch_controlnet_pipe(nets)
    ref.scheduler = TorchPeRFlowScheduler.from_config(pipe.scheduler.config.to_dict())
    images = IMAGES[:nets] if nets > 1 else IMAGES[0]
    kw = dict(num_inference_steps=STEPS, guidance_scale=3.0, height=H, width=W)
    ours = pipe(PROMPTS, images, latents=LATENTS, output_type="float", **kw, **control)
    with torch.no_grad():
        timages = _torch_images(IMAGES[:nets])
        theirs = ref(PROMPTS, image=timages if nets > 1 else timages[0], latents=torch.from_numpy(LATENTS),
                     output_type="np", **kw, **control).images
    diff = _max_diff(ours, theirs)
    print(f"\n[{m.family}] {nets} ControlNet(s) {control}: max |perflow_jax - diffusers| = {diff:.2e}")
    assert ours.shape == theirs.shape == (2, H, W, 3)
    assert np.std(theirs) > 0.02
    assert diff < PARITY_TOL
    return ours


@pytest.mark.slow(reason="compiles a 2-net program and runs diffusers")
def test_two_controlnets_start_end_match_diffusers(tiny) -> None:
    """SD1-style, PeRFlow, CFG 3.0, two ControlNets with their own scales and control_guidance_start/end (net 0
    acts on steps 0-2, net 1 on 1-3) vs diffusers' StableDiffusionControlNetPipeline with a MultiControlNetModel:
    images within 2e-3. Then new control images, scales and start/end reuse the compiled program and change the
    images, and scale 0 gives exactly the plain Stable Diffusion pipeline's images (the nets add nothing)."""
    m = tiny("sd15")
    control = dict(controlnet_conditioning_scale=[0.8, 0.5], control_guidance_start=[0.0, 0.25],
                   control_guidance_end=[0.75, 1.0])
    a = _compare_text_to_image(m, 2, **control)
    pipe = m.pipe(2)
    n = pipe.stats.num_compiled
    kw = dict(num_inference_steps=STEPS, guidance_scale=3.0, latents=LATENTS, output_type="float")
    b = pipe(PROMPTS, IMAGES[::-1], **kw, **control)
    c = pipe(PROMPTS, IMAGES, **kw, controlnet_conditioning_scale=[0.3, 1.2])
    again = pipe(PROMPTS, IMAGES, **kw, **control)
    off = pipe(PROMPTS, IMAGES, **kw, controlnet_conditioning_scale=0.0)
    assert pipe.stats.num_compiled == n
    np.testing.assert_array_equal(a, again)
    assert _max_diff(a, b) > 1e-3 and _max_diff(a, c) > 1e-3
    plain = StableDiffusionPipeline.__call__(pipe, PROMPTS, **kw)
    assert _max_diff(off, plain) < 1e-6 and _max_diff(a, plain) > 1e-2


@pytest.mark.slow(reason="compiles a ControlNet program and runs diffusers")
def test_guess_mode_matches_diffusers(tiny) -> None:
    """SD2-style (linear projections, v-prediction PeRFlow), one ControlNet in guess mode with CFG (the net sees
    only the conditional half; residuals scaled 0.1 → 1) vs diffusers: images within 2e-3."""
    _compare_text_to_image(tiny("sd21"), 1, guess_mode=True, controlnet_conditioning_scale=0.9)


@pytest.mark.slow(reason="compiles a 2-net SDXL program and runs diffusers")
def test_sdxl_matches_diffusers(tiny) -> None:
    """SDXL-style (added text/time conditions reach the ControlNets), two ControlNets, start/end, vs
    diffusers' StableDiffusionXLControlNetPipeline: images within 2e-3."""
    _compare_text_to_image(tiny("sdxl"), 2, controlnet_conditioning_scale=[1.0, 0.6], control_guidance_end=[1.0, 0.5])


@pytest.mark.slow(reason="compiles a ControlNet img2img program and runs diffusers")
def test_img2img_matches_diffusers(tiny, monkeypatch) -> None:
    """ControlNet img2img (SD1-style, DDIM, strength 0.6 → the last 2 of 4 steps, start/end counted over those
    2 steps) vs diffusers' StableDiffusionControlNetImg2ImgPipeline, images within 2e-3, with diffusers' two
    random draws replaced by perflow_jax's (as in tests/test_pipelines.py's img2img test)."""
    import diffusers.models.autoencoders.vae as vae_mod
    import diffusers.pipelines.controlnet.pipeline_controlnet_img2img as i2i_mod
    from diffusers import DDIMScheduler

    from tests.test_pipelines import _jax_img2img_noise

    m = tiny("sd15")
    pipe = m.pipe(1, "ddim")
    image = np.random.default_rng(1).uniform(0, 1, (2, H, W, 3)).astype(np.float32)
    seed = 7
    noise, eps = _jax_img2img_noise(seed, 2, (4, H // 2, W // 2))

    def fixed(arr):
        return lambda shape, *a, **k: torch.from_numpy(arr.copy())

    monkeypatch.setattr(vae_mod, "randn_tensor", fixed(eps))
    monkeypatch.setattr(i2i_mod, "randn_tensor", fixed(noise))
    ref = m.torch_controlnet_pipe(1, img2img=True)
    ref.scheduler = DDIMScheduler.from_pretrained(m.folder, subfolder="scheduler")
    kw = dict(strength=0.6, num_inference_steps=STEPS, guidance_scale=3.0, control_guidance_start=0.5,
              controlnet_conditioning_scale=0.8)
    ours = pipe.img2img(PROMPTS, image, IMAGES[0], seed=seed, output_type="float", **kw)
    with torch.no_grad():
        theirs = ref(PROMPTS, image=image, control_image=_torch_images(IMAGES[:1])[0], output_type="np",
                     **kw).images
    diff = _max_diff(ours, theirs)
    print(f"\n[sd15/ddim] ControlNet img2img max |perflow_jax - diffusers| = {diff:.2e}")
    assert ours.shape == theirs.shape == (2, H, W, 3)
    assert diff < PARITY_TOL


# --------------------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------------------


BAD_CALLS = {
    "control image size": (lambda p: p(PROMPTS, IMAGES[0][:, :16], height=H, width=W),
                           r"control image is 16×32 \(H×W\) but the output is 32×32; resize"),
    "grayscale control image": (lambda p: p(PROMPTS, IMAGES[0][..., 0]), "control image must be .* RGB"),
    "2-D control image": (lambda p: p(PROMPTS, IMAGES[0][0, ..., 0]), "control image must be .* RGB"),
    "RGBA control image": (lambda p: p(PROMPTS, np.zeros((H, W, 4), np.uint8)), "control image must be .* RGB"),
    "missing control image": (lambda p: p(PROMPTS), "control_image is required"),
    "control image count": (lambda p: p(PROMPTS, IMAGES[0][:1].repeat(3, 0)), "Got 3 control images for 2"),
    "start after end": (lambda p: p(PROMPTS, IMAGES[0], control_guidance_start=0.8, control_guidance_end=0.5),
                        "must satisfy 0 ≤ start < end ≤ 1"),
    "scales per net": (lambda p: p(PROMPTS, IMAGES[0], controlnet_conditioning_scale=[1.0, 2.0]),
                       "has 2 values for 1 ControlNets"),
    "nan scale": (lambda p: p(PROMPTS, IMAGES[0], controlnet_conditioning_scale=float("nan")),
                  "controlnet_conditioning_scale must be a finite"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_call_raises_clear_error(tiny, case: str) -> None:
    """Bad control inputs raise one-line ValueErrors naming the argument, before anything is compiled."""
    pipe = tiny("sd15").pipe(1, "ddim")
    call, message = BAD_CALLS[case]
    n = len(pipe._compiled)
    with pytest.raises(ValueError, match=message):
        call(pipe)
    assert len(pipe._compiled) == n


def test_controlnet_of_another_family_is_refused(tiny) -> None:
    """An SDXL ControlNet on an SD1 model, and a UNet folder given as a ControlNet, fail at load with what is
    wrong."""
    sd15, sdxl = tiny("sd15"), tiny("sdxl")
    with pytest.raises(ValueError, match="does not fit this model's UNet .*another model family"):
        StableDiffusionControlNetPipeline.from_pretrained(sd15.folder, controlnets=[sdxl.net_dirs[0]])
    with pytest.raises(ValueError, match="describes a UNet2DConditionModel, not a ControlNetModel"):
        StableDiffusionControlNetPipeline.from_pretrained(sd15.folder, controlnets=[sd15.folder + "/unet"])


# --------------------------------------------------------------------------------------------------------------
# Tiled VAE and the PeRFlow-Refiner
# --------------------------------------------------------------------------------------------------------------


def test_blend_tiles_is_exact_for_a_local_function() -> None:
    """The tiling and blending machinery (equal tiles, ramps, normalisation) gives exactly the untiled result
    (≤ 1e-6, float32 rounding of the weights) for a pixel-local function with 2× upsampling, on a non-square grid
    whose tile starts do not fall on a regular stride."""
    from perflow_jax.models.vae_tiling import blend_tiles, tile_starts

    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 37, 50)).astype(np.float32))
    fn = lambda a: jnp.tanh(jnp.repeat(jnp.repeat(a, 2, axis=2), 2, axis=3))  # noqa: E731
    assert _max_diff(blend_tiles(fn, x, 16, 4, 1, 2), fn(x)) <= 1e-6
    for size, tile, overlap in ((37, 16, 4), (50, 16, 4), (64, 32, 8), (16, 16, 4)):
        starts = tile_starts(size, tile, overlap)
        assert starts[0] == 0 and starts[-1] == size - tile
        assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:], strict=False))


def test_tiled_vae_decode_within_tolerance_of_untiled(tiny) -> None:
    """Tiled decode (2×2 tiles of 32 latents overlapping ≥ 8) vs untiled decode of 48×48 latents with the tiny
    random VAE: mean |Δ| ≤ 0.02 and max |Δ| ≤ 0.2 on images in [0, 1] (measured 0.012 and 0.12). The two cannot
    agree exactly: the VAE's GroupNorm statistics and mid-block attention see one tile, not the image (the
    blending itself is exact, see the test above); a real SD VAE on natural images differs far less."""
    from perflow_jax.models.vae_tiling import tiled_decode

    pipe = tiny("sd15").pipe(1, "ddim")
    z = jnp.asarray(np.random.default_rng(0).standard_normal((1, 4, 48, 48)).astype(np.float32))
    full = np.clip(np.asarray(pipe.vae_decode(pipe.params, z)) / 2 + 0.5, 0, 1)
    tiled = np.clip(np.asarray(tiled_decode(pipe.vae, pipe.params["vae"], z, 32, 8)) / 2 + 0.5, 0, 1)
    diff = np.abs(full - tiled)
    print(f"\n[sd15] tiled vs untiled VAE decode: mean {diff.mean():.3e}, max {diff.max():.3e}")
    assert diff.mean() <= 0.02 and diff.max() <= 0.2


@pytest.mark.slow(reason="compiles a 64×64 ControlNet img2img program with a tiled VAE")
def test_refiner_upscales_2x_with_tiled_vae(tiny) -> None:
    """``refine`` on 32×32 images at scale 2 with a tiled VAE (tiles of 16 px): 64×64 images, finite and not
    flat, exactly what ``img2img`` gives at strength 1.0 with the Lanczos-4-upsampled images as init and control
    images (same compiled program); the Lanczos resize keeps a constant image constant and uint8 stays uint8."""
    from perflow_jax.pipelines.refiner import lanczos_resize, refine_size

    base = tiny("sd15").pipe(1, "ddim")
    pipe = StableDiffusionControlNetPipeline(base.components, base.scheduler,
                                             [(base.controlnets[0].config, base.params["controlnets"][0])],
                                             vae_tile_size=16)
    images = (np.random.default_rng(3).uniform(0, 1, (2, H, W, 3)) * 255).astype(np.uint8)
    kw = dict(num_inference_steps=STEPS, guidance_scale=2.0, seed=1, output_type="float")
    out = pipe.refine(images, PROMPTS, scale=2, **kw)
    assert out.shape == (2, 2 * H, 2 * W, 3) and np.all(np.isfinite(out)) and np.std(out) > 0.02
    n = pipe.stats.num_compiled
    up = lanczos_resize(images, 2 * H, 2 * W)
    assert up.dtype == np.uint8 and up.shape == (2, 2 * H, 2 * W, 3)
    np.testing.assert_array_equal(out, pipe.img2img(PROMPTS, up, up, strength=1.0, **kw))
    assert pipe.stats.num_compiled == n
    flat = np.full((5, 7, 3), 0.25, np.float32)
    np.testing.assert_allclose(lanczos_resize(flat, 13, 9), 0.25, atol=1e-6)
    assert refine_size(512, 768, 2) == (1024, 1536) and refine_size(500, 700, 1.5) == (768, 1024)


# --------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------


def _write_png(path, image: np.ndarray) -> str:
    from PIL import Image

    Image.fromarray(image).save(path)
    return str(path)


@pytest.mark.slow(reason="compiles a ControlNet text-to-image and a refiner program")
def test_cli_controlnet_and_refine(tiny, tmp_path, capsys) -> None:
    """``sample --controlnet DIR:SCALE --control-image FILE --refine 2 --refine-controlnet DIR`` writes 2×-size
    PNGs (the API behind it is checked against diffusers and img2img above)."""
    from PIL import Image

    from perflow_jax.cli import main

    m = tiny("sd15")
    control = (IMAGES[0][0] * 255).round().astype(np.uint8)
    png = _write_png(tmp_path / "control.png", control)
    out = tmp_path / "out"
    rc = main(["--no-cache", "sample", "--model", m.folder, "--prompt", "a cat", "--num-images", "1", "--steps", "4",
               "--guidance", "2.0", "--scheduler", "ddim", "--controlnet", f"{m.net_dirs[0]}:0.7", "--control-image",
               png, "--refine", "2", "--refine-controlnet", m.net_dirs[1], "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    got = np.asarray(Image.open(out / "image_0000.png"))
    assert got.shape == (2 * H, 2 * W, 3) and got.std() > 2


CLI_ERRORS = {
    "image count": (["--controlnet", "NET"], "got 1 --controlnet and 0 --control-image"),
    "refine alone": (["--refine", "2"], "--refine SCALE and --refine-controlnet DIR go together"),
    "guess mode alone": (["--guess-mode"], "--guess-mode applies to ControlNets"),
}


@pytest.mark.parametrize("case", list(CLI_ERRORS))
def test_cli_control_errors(tmp_path, capsys, case: str) -> None:
    """Inconsistent ControlNet/refiner flags are one-line errors (exit 2) before anything is loaded or written."""
    from perflow_jax.cli import main

    extra, message = CLI_ERRORS[case]
    rc = main(["sample", "--model", str(tmp_path / "model"), "--prompt", "a cat", "--out", str(tmp_path / "out"),
               *extra])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------------------
# Original single-file ControlNets
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.slow(reason="builds, converts and loads a full-size-embedding ControlNet with diffusers and perflow_jax")
@pytest.mark.parametrize("family", ["sd15", "sd21"])
def test_single_file_matches_diffusers_from_single_file(tmp_path, family: str) -> None:
    """An original-layout ControlNet file (``control_model.*``; written here from a tiny diffusers ControlNet with
    the default 4-level conditioning embedding, as the real ones have) loads with the config derived from the base
    UNet's, and its residuals equal those of diffusers' ``ControlNetModel.from_single_file(file,
    config=LOCAL_DIR)`` within 1e-5. SDXL is not covered: its ControlNets were released in the diffusers layout
    only (diffusers has no original-layout SDXL mapping either). A ``.pth`` pickle is refused without
    allow_pickle, and a file that is not a ControlNet is named. The pipelines' loader (a file path among the
    ControlNets) gives the same params."""
    from diffusers import ControlNetModel as TorchControlNet
    from safetensors.numpy import save_file

    from perflow_jax.models.controlnet import ControlNetConfig
    from perflow_jax.models.controlnet_single_file import (
        CONTROL_PREFIX,
        controlnet_ldm_table,
        load_controlnet_single_file,
    )
    from perflow_jax.models.convert import ConversionError
    from perflow_jax.models.single_file import rewrite_key
    from perflow_jax.models.unet import UNetConfig
    from tests.support.tiny_sd import _perturb, _unet

    torch.set_num_threads(1)
    unet = _unet(family, 3)
    net = _perturb(TorchControlNet.from_unet(unet), 4)
    net.save_pretrained(str(tmp_path / "config"))
    to_ldm = {v: k for k, v in controlnet_ldm_table(ControlNetConfig.from_json(str(tmp_path / "config"))).items()}
    file = str(tmp_path / "control_tiny.safetensors")
    save_file({CONTROL_PREFIX + rewrite_key(k, to_ldm): v.numpy() for k, v in net.state_dict().items()}, file)

    ref = TorchControlNet.from_single_file(file, config=str(tmp_path / "config"), local_files_only=True)
    config, params = load_controlnet_single_file(file, UNetConfig.from_dict(dict(unet.config)))
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 4, 4, 4)).astype(np.float32)
    image = rng.uniform(0, 1, (1, 3, 32, 32)).astype(np.float32)
    context = rng.standard_normal((1, 3, config.encoder_dim)).astype(np.float32)
    down, mid = controlnet_apply(ControlNetModel(config), params, x, 300, UNetCondition(context), image, 1.0)
    with torch.no_grad():
        ref_down, ref_mid = ref(torch.from_numpy(x), 300, torch.from_numpy(context), torch.from_numpy(image),
                                return_dict=False)
    diff = max(_max_diff(a, b.numpy()) for a, b in zip([*down, mid], [*ref_down, ref_mid], strict=True))
    print(f"\n[{family}] single-file ControlNet residuals max |perflow_jax - diffusers| = {diff:.2e}")
    assert diff < RESIDUAL_TOL

    from perflow_jax.pipelines.controlnet import load_controlnets

    ((via_pipeline_config, via_pipeline),) = load_controlnets([file], UNetConfig.from_dict(dict(unet.config)))
    assert via_pipeline_config == config
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(via_pipeline), jax.tree_util.tree_leaves(params),
                            strict=True):
        np.testing.assert_array_equal(a, b, err_msg=str(path))

    (tmp_path / "control.pth").write_bytes(b"not read")
    with pytest.raises(ConversionError, match="PyTorch pickle"):
        load_controlnet_single_file(str(tmp_path / "control.pth"), config)
    save_file({"model.diffusion_model.conv_in.weight": np.zeros((1,), np.float32)}, str(tmp_path / "unet.safetensors"))
    with pytest.raises(ValueError, match="is not an original ControlNet checkpoint"):
        load_controlnet_single_file(str(tmp_path / "unet.safetensors"), config)
