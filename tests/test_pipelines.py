"""StableDiffusionPipeline against PyTorch diffusers on tiny SD1-, SD2- and SDXL-style models.

Each family's tiny model (``tests/support/tiny_sd.py``: random, perturbed weights, 32×32 images, VAE factor 2)
is built and saved once per module; one perflow_jax pipeline per (family, scheduler) is reused by every test.

Parity tolerance (decoded float images in [0, 1], float32 on both sides): 2e-3, about half a uint8 level.
The two sides run the same math with different kernels (XLA vs PyTorch/oneDNN convolutions, matmuls and
attention), each rounding at ~1e-7 relative per op; through CLIP, 4 UNet steps with CFG and the VAE decoder
that measures a few 1e-6 here (printed with ``pytest -s``). 2e-3 leaves room for other BLAS builds while
still catching any real difference (a wrong timestep, scale, layout or guidance term moves pixels by ≥ 1e-2).
"""

from __future__ import annotations

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from perflow_jax import delta as delta_lib
from perflow_jax import schedulers
from perflow_jax.models.components import load_pipeline_components
from perflow_jax.models.convert import ConversionError
from perflow_jax.pipelines.stable_diffusion import GenerationRequest, StableDiffusionPipeline, make_scheduler
from tests.support.tiny_sd import make_tiny_pipeline
from tests.support.torch_perflow import TorchPeRFlowScheduler

FAMILIES = ("sd15", "sd21", "sdxl")
H = W = 32
STEPS = 4
PROMPTS = ["a cat on the mat", "the red dog"]
NEGATIVES = ["blurry", "a dog"]
LATENTS = np.random.default_rng(0).standard_normal((2, 4, H // 2, W // 2)).astype(np.float32)
PARITY_TOL = 2e-3


class TinyModel:
    """One saved tiny model: its folder, the PyTorch diffusers pipeline, and perflow_jax pipelines by scheduler."""

    def __init__(self, folder: str, family: str):
        self.folder, self.family = folder, family
        self.torch_pipe = make_tiny_pipeline(folder, family)
        self.torch_pipe.set_progress_bar_config(disable=True)
        self._pipes: dict[str, StableDiffusionPipeline] = {}

    def pipe(self, scheduler: str = "perflow") -> StableDiffusionPipeline:
        if scheduler not in self._pipes:
            self._pipes[scheduler] = StableDiffusionPipeline.from_pretrained(self.folder, scheduler=scheduler)
        return self._pipes[scheduler]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Lazily built tiny models, one per family, shared by the whole module (PyTorch on one thread: with
    2 shared cores its thread pool slows the tiny models ~20×)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tiny_sd")
    models: dict[str, TinyModel] = {}

    def get(family: str) -> TinyModel:
        if family not in models:
            models[family] = TinyModel(str(root / family), family)
        return models[family]

    yield get
    torch.set_num_threads(threads)


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# --------------------------------------------------------------------------------------------------------------
# Text-to-image parity
# --------------------------------------------------------------------------------------------------------------


# diffusers' class for each registered scheduler whose steps draw no noise (the others are checked for output).
DETERMINISTIC = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler",
                 "dpmpp_2m": "DPMSolverMultistepScheduler", "unipc": "UniPCMultistepScheduler"}


@pytest.mark.parametrize("scheduler", [s for s in schedulers.available() if s != "perflow"])
def test_every_scheduler_runs_the_sd_pipeline(tiny, scheduler: str) -> None:
    """Every registered scheduler drives the SD pipeline (built from the model's own scheduler_config.json):
    deterministic ones match diffusers' pipeline with the same scheduler class within PARITY_TOL; stochastic
    ones (their noise comes from different generators) give finite, non-flat, seeded images."""
    import diffusers

    m = tiny("sd15")
    pipe = m.pipe(scheduler)
    kw = dict(num_inference_steps=STEPS, guidance_scale=3.0, height=H, width=W)
    ours = pipe(PROMPTS, latents=LATENTS, output_type="float", **kw)
    assert ours.shape == (2, H, W, 3) and np.all(np.isfinite(ours)) and np.std(ours) > 0.02
    np.testing.assert_array_equal(ours, pipe(PROMPTS, latents=LATENTS, output_type="float", **kw))
    if scheduler in DETERMINISTIC:
        cls = getattr(diffusers, DETERMINISTIC[scheduler])
        m.torch_pipe.scheduler = cls.from_pretrained(m.folder, subfolder="scheduler")
        with torch.no_grad():
            ref = m.torch_pipe(PROMPTS, latents=torch.from_numpy(LATENTS), output_type="np", **kw).images
        diff = _max_diff(ours, ref)
        print(f"\n[sd15/{scheduler}] max |perflow_jax - diffusers| = {diff:.2e}")
        assert diff < PARITY_TOL


@pytest.mark.parametrize("scheduler", ["perflow", "ddim"])
@pytest.mark.parametrize("family", FAMILIES)
def test_text_to_image_matches_diffusers(tiny, family: str, scheduler: str) -> None:
    """Same weights, same initial latents, same scheduler math, CFG 3.0, 4 steps: decoded float images of
    perflow_jax vs diffusers' StableDiffusion(XL)Pipeline within 2e-3 (see the module docstring).

    PeRFlow runs against ``TorchPeRFlowScheduler`` built from perflow_jax's own config (sd15: diff_eps,
    sd21: velocity, sdxl: ddim_eps); DDIM against diffusers' DDIMScheduler saved with the model (sd21 is a
    v-prediction model). The DDIM cases pass negative prompts; PeRFlow ones none (SDXL: zeroed negatives).
    """
    from diffusers import DDIMScheduler

    m = tiny(family)
    pipe = m.pipe(scheduler)
    if scheduler == "perflow":
        m.torch_pipe.scheduler = TorchPeRFlowScheduler.from_config(pipe.scheduler.config.to_dict())
        negatives = None
    else:
        m.torch_pipe.scheduler = DDIMScheduler.from_pretrained(m.folder, subfolder="scheduler")
        negatives = NEGATIVES
    kw = dict(num_inference_steps=STEPS, guidance_scale=3.0, height=H, width=W)

    ours = pipe(PROMPTS, negatives, latents=LATENTS, output_type="float", **kw)
    with torch.no_grad():
        ref = m.torch_pipe(PROMPTS, negative_prompt=negatives, latents=torch.from_numpy(LATENTS),
                           output_type="np", **kw).images
    diff = _max_diff(ours, ref)
    print(f"\n[{family}/{scheduler}] text-to-image max |perflow_jax - diffusers| = {diff:.2e}")
    assert ours.shape == ref.shape == (2, H, W, 3)
    assert ours.dtype == np.float32
    assert np.std(ref) > 0.02, "reference images are flat; the comparison would be meaningless"
    assert diff < PARITY_TOL


def test_no_guidance_non_square_sdxl_matches_diffusers(tiny) -> None:
    """SDXL, PeRFlow, a non-square 32×48 image and guidance ≤ 1 (no classifier-free guidance), vs diffusers,
    decoded float images within 2e-3 (module docstring). Non-square checks the SDXL time ids' (height, width)
    order and the latent layout; guidance 1.0 and 0.0 both mean "no CFG" in diffusers (``guidance_scale > 1``
    turns it on), so both must match diffusers, give identical images and share one compiled program."""
    m = tiny("sdxl")
    pipe = m.pipe("perflow")
    m.torch_pipe.scheduler = TorchPeRFlowScheduler.from_config(pipe.scheduler.config.to_dict())
    latents = np.random.default_rng(3).standard_normal((2, 4, 16, 24)).astype(np.float32)
    results = {}
    for guidance in (1.0, 0.0):
        kw = dict(num_inference_steps=STEPS, guidance_scale=guidance, height=32, width=48)
        ours = pipe(PROMPTS, latents=latents, output_type="float", **kw)
        with torch.no_grad():
            ref = m.torch_pipe(PROMPTS, latents=torch.from_numpy(latents), output_type="np", **kw).images
        diff = _max_diff(ours, ref)
        print(f"\n[sdxl/perflow] 32x48, guidance {guidance}: max |perflow_jax - diffusers| = {diff:.2e}")
        assert ours.shape == ref.shape == (2, 32, 48, 3)
        assert diff < PARITY_TOL
        results[guidance] = (ours, len(pipe._compiled))
    np.testing.assert_array_equal(results[1.0][0], results[0.0][0])
    assert results[1.0][1] == results[0.0][1]


# --------------------------------------------------------------------------------------------------------------
# img2img
# --------------------------------------------------------------------------------------------------------------


def _jax_img2img_noise(seed: int, n: int, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The two random draws perflow_jax's img2img makes for images 0..n-1 (its documented scheme: image i uses
    ``k = fold_in(key(seed), i)``; initial noise from ``fold_in(k, 0)``, the VAE posterior sample from
    ``fold_in(k, 1)``). Returns (noise, posterior eps), each (n, *shape)."""
    base = jax.random.key(np.uint32(seed))
    keys = [jax.random.fold_in(base, i) for i in range(n)]
    noise = np.stack([np.asarray(jax.random.normal(jax.random.fold_in(k, 0), shape)) for k in keys])
    eps = np.stack([np.asarray(jax.random.normal(jax.random.fold_in(k, 1), shape)) for k in keys])
    return noise, eps


def test_img2img_matches_diffusers_with_shared_noise(tiny, monkeypatch) -> None:
    """img2img (SD1-style, DDIM, strength 0.6 → the last 2 of 4 steps, CFG 3.0) vs diffusers'
    StableDiffusionImg2ImgPipeline, decoded float images within 2e-3.

    What is compared: the whole path, VAE encoding of the pixels included. The only thing made equal by hand
    is randomness: diffusers' two draws (the VAE posterior sample's ε in ``DiagonalGaussianDistribution.sample``
    and the forward-noising noise in ``prepare_latents``) are replaced, by patching diffusers' ``randn_tensor``
    in those two modules, with the exact arrays perflow_jax draws from the seed. So encoder mean/logvar,
    posterior sampling, latent scaling, the strength → start-step rule, ``add_noise`` at the first kept
    timestep, the remaining DDIM steps and the decode must all agree. (PeRFlow is not compared here: the
    reference PeRFlow scheduler has no ``add_noise``.)
    """
    import diffusers.models.autoencoders.vae as vae_mod
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img as i2i_mod
    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline

    m = tiny("sd15")
    pipe = m.pipe("ddim")
    image = np.random.default_rng(1).uniform(0, 1, (2, H, W, 3)).astype(np.float32)
    seed, strength = 7, 0.6
    noise, eps = _jax_img2img_noise(seed, 2, (4, H // 2, W // 2))

    def fixed(arr: np.ndarray, where: str):
        def randn_tensor(shape, *args, **kwargs):
            assert tuple(shape) == arr.shape, f"{where}: diffusers asked for {tuple(shape)}, have {arr.shape}"
            return torch.from_numpy(arr.copy())
        return randn_tensor

    monkeypatch.setattr(vae_mod, "randn_tensor", fixed(eps, "VAE posterior sample"))
    monkeypatch.setattr(i2i_mod, "randn_tensor", fixed(noise, "img2img noise"))
    ref_pipe = StableDiffusionImg2ImgPipeline(**{**m.torch_pipe.components, "requires_safety_checker": False})
    ref_pipe.scheduler = DDIMScheduler.from_pretrained(m.folder, subfolder="scheduler")
    ref_pipe.set_progress_bar_config(disable=True)

    kw = dict(strength=strength, num_inference_steps=STEPS, guidance_scale=3.0)
    ours = pipe.img2img(PROMPTS, image, seed=seed, output_type="float", **kw)
    with torch.no_grad():
        ref = ref_pipe(PROMPTS, image=image, output_type="np", **kw).images
    diff = _max_diff(ours, ref)
    print(f"\n[sd15/ddim] img2img max |perflow_jax - diffusers| = {diff:.2e}")
    assert ours.shape == ref.shape == (2, H, W, 3)
    assert diff < PARITY_TOL


def test_img2img_deterministic_and_no_recompile(tiny) -> None:
    """img2img (PeRFlow, strength 0.5): the same seed gives bit-identical images; a new seed, prompt or
    guidance scale reuses the compiled program and changes the images; a uint8 init image gives exactly
    what the same image as float /255 gives."""
    pipe = tiny("sd15").pipe("perflow")
    image = (np.random.default_rng(2).uniform(0, 1, (H, W, 3)) * 255).astype(np.uint8)
    kw = dict(strength=0.5, num_inference_steps=STEPS, guidance_scale=2.0, output_type="float")
    a = pipe.img2img(PROMPTS, image, seed=3, **kw)
    n = pipe.stats.num_compiled
    b = pipe.img2img(PROMPTS, image, seed=3, **kw)
    c = pipe.img2img(PROMPTS, image, seed=4, **kw)
    d = pipe.img2img(["a dog", "a cat"], image, seed=3, **{**kw, "guidance_scale": 5.0})
    f = pipe.img2img(PROMPTS, image.astype(np.float32) / 255, seed=3, **kw)
    assert pipe.stats.num_compiled == n
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, f)
    assert _max_diff(a, c) > 1e-3 and _max_diff(a, d) > 1e-3


# --------------------------------------------------------------------------------------------------------------
# Compilation
# --------------------------------------------------------------------------------------------------------------


def test_no_recompile_when_prompt_seed_guidance_change(tiny) -> None:
    """Prompts, negative prompts, seed and guidance scale are traced inputs: changing them reuses the one
    compiled program (``pipe._compiled`` and ``stats.num_compiled`` unchanged) yet changes the images, and
    repeating a call reproduces it bit for bit."""
    pipe = tiny("sd15").pipe("perflow")
    kw = dict(num_inference_steps=STEPS, height=H, width=W, output_type="float")
    a = pipe(PROMPTS, seed=0, guidance_scale=3.0, **kw)
    keys, n = set(pipe._compiled), pipe.stats.num_compiled
    variants = {
        "seed": pipe(PROMPTS, seed=1, guidance_scale=3.0, **kw),
        "prompt": pipe(["a dog on the mat", "the cat"], seed=0, guidance_scale=3.0, **kw),
        "guidance": pipe(PROMPTS, seed=0, guidance_scale=6.5, **kw),
        "negative": pipe(PROMPTS, "blurry", seed=0, guidance_scale=3.0, **kw),
    }
    again = pipe(PROMPTS, seed=0, guidance_scale=3.0, **kw)
    assert set(pipe._compiled) == keys and pipe.stats.num_compiled == n
    assert pipe.stats.compile_seconds < 0.1  # the last call only looked the program up
    np.testing.assert_array_equal(a, again)
    for name, img in variants.items():
        assert _max_diff(a, img) > 1e-4, f"changing the {name} did not change the images"


# --------------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------------


BAD_CALLS = {
    "empty prompt list": (lambda p: p([]), "prompt must be a non-empty"),
    "height not divisible": (lambda p: p("a cat", height=33, width=32), "height must be a positive multiple of 2"),
    "width not divisible": (lambda p: p("a cat", height=32, width=31), "width must be a positive multiple of 2"),
    "zero steps": (lambda p: p("a cat", num_inference_steps=0), "num_inference_steps must be an integer ≥ 1"),
    "negative guidance": (lambda p: p("a cat", guidance_scale=-1.0), "guidance_scale must be a finite number ≥ 0"),
    "nan guidance": (lambda p: p("a cat", guidance_scale=float("nan")), "guidance_scale must be a finite"),
    "negatives count": (lambda p: p(PROMPTS, ["x", "y", "z"]), "Got 3 negative prompts for 2 prompts"),
    "latents shape": (lambda p: p(PROMPTS, latents=LATENTS[:1], height=H, width=W), r"latents must have shape"),
    "strength 0": (lambda p: p.img2img("a cat", np.zeros((H, W, 3), np.uint8), strength=0.0),
                   r"strength must be in \(0, 1\]"),
    "init image shape": (lambda p: p.img2img("a cat", np.zeros((H, W), np.uint8)), "init image must be"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_call_raises_clear_error(tiny, case: str) -> None:
    """Invalid arguments raise ValueError naming the argument, before anything is compiled."""
    pipe = tiny("sd15").pipe("perflow")
    call, message = BAD_CALLS[case]
    n = len(pipe._compiled)
    with pytest.raises(ValueError, match=message):
        call(pipe)
    assert len(pipe._compiled) == n


def test_missing_model_raises(tmp_path) -> None:
    """A path that does not exist, and a folder that is not a diffusers pipeline, fail with what to do."""
    with pytest.raises(FileNotFoundError, match="neither an existing file or folder nor a Hugging Face repo id"):
        StableDiffusionPipeline.from_pretrained(str(tmp_path / "no" / "such" / "model"))
    with pytest.raises(FileNotFoundError, match="has no model_index.json"):
        StableDiffusionPipeline.from_pretrained(str(tmp_path))


# --------------------------------------------------------------------------------------------------------------
# PeRFlow ΔW
# --------------------------------------------------------------------------------------------------------------


def _torch_unet(folder: str):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(folder, subfolder="unet")


def test_delta_that_does_not_match_the_unet_is_rejected(tiny, tmp_path) -> None:
    """A ΔW with one wrong-shaped tensor, and a ΔW of another family's UNet (SDXL ΔW on an SD1 model), raise
    ConversionError saying the ΔW does not match this UNet."""
    from safetensors.torch import save_file

    m = tiny("sd15")
    sd = {k: torch.zeros_like(v) for k, v in _torch_unet(m.folder).state_dict().items()}
    sd["conv_in.weight"] = torch.zeros(sd["conv_in.weight"].shape[0], 5, 3, 3)  # 5 input channels, not 4
    save_file(sd, str(tmp_path / "delta_weights.safetensors"))
    with pytest.raises(ConversionError, match="does not match this UNet"):
        StableDiffusionPipeline.from_pretrained(m.folder, delta=str(tmp_path))

    other = {k: torch.zeros_like(v) for k, v in _torch_unet(tiny("sdxl").folder).state_dict().items()}
    save_file(other, str(tmp_path / "sdxl_delta.safetensors"))
    with pytest.raises(ConversionError, match="does not match this UNet"):
        StableDiffusionPipeline.from_pretrained(m.folder, delta=str(tmp_path / "sdxl_delta.safetensors"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        StableDiffusionPipeline.from_pretrained(m.folder, delta=str(tmp_path / "missing.safetensors"))


def test_delta_equals_model_with_merged_unet(tiny, tmp_path) -> None:
    """``from_pretrained(base, delta=ΔW)`` gives the same images (≤ 1e-6; both sides add W + ΔW in float32,
    so in practice bit-identical) as loading a diffusers folder whose UNet weights are base + ΔW, added in
    PyTorch on the state dict. ΔW is written in the released format: PyTorch layout, diffusers key names,
    ``delta_weights.safetensors``. The images also differ from the base model's (ΔW is not ignored), and
    ``delta.export`` of the loaded ΔW writes back exactly the original tensors (keys, layouts, values)."""
    from safetensors.numpy import load_file
    from safetensors.torch import save_file

    m = tiny("sd15")
    base_unet = _torch_unet(m.folder)
    g = torch.Generator().manual_seed(0)
    dw = {k: 0.02 * torch.randn(v.shape, generator=g) for k, v in base_unet.state_dict().items()}
    delta_dir = tmp_path / "delta"
    delta_dir.mkdir()
    save_file(dw, str(delta_dir / "delta_weights.safetensors"))

    merged_dir = tmp_path / "merged"
    shutil.copytree(m.folder, merged_dir)
    base_unet.load_state_dict({k: v + dw[k] for k, v in base_unet.state_dict().items()})
    base_unet.save_pretrained(str(merged_dir / "unet"))

    kw = dict(num_inference_steps=STEPS, guidance_scale=3.0, height=H, width=W, latents=LATENTS,
              output_type="float")
    with_delta = StableDiffusionPipeline.from_pretrained(m.folder, delta=str(delta_dir))
    merged = StableDiffusionPipeline.from_pretrained(str(merged_dir))
    a, b = with_delta(PROMPTS, **kw), merged(PROMPTS, **kw)
    base = m.pipe("perflow")(PROMPTS, **kw)
    print(f"\n[sd15] ΔW: |delta - merged| = {_max_diff(a, b):.2e}, |delta - base| = {_max_diff(a, base):.2e}")
    assert _max_diff(a, b) <= 1e-6
    assert _max_diff(a, base) > 1e-3

    loaded = delta_lib.load_delta(str(delta_dir), m.pipe("perflow").components.unet_params)
    exported = load_file(delta_lib.export(loaded, str(tmp_path / "exported")))
    assert set(exported) == set(dw)
    for k, v in dw.items():
        np.testing.assert_array_equal(exported[k], v.numpy(), err_msg=k)


# --------------------------------------------------------------------------------------------------------------
# load_pipeline_components: tokenizer files and the Hugging Face cache
# --------------------------------------------------------------------------------------------------------------


def test_missing_tokenizer_files_raise(tiny, tmp_path) -> None:
    """A tokenizer/ folder without vocab.json + merges.txt and without tokenizer.json names the missing files."""
    folder = tmp_path / "model"
    shutil.copytree(tiny("sd15").folder, folder)
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        if (folder / "tokenizer" / name).exists():
            os.remove(folder / "tokenizer" / name)
    with pytest.raises(FileNotFoundError, match=r"lacks vocab\.json, merges\.txt"):
        load_pipeline_components(str(folder))


def test_repo_id_not_in_cache_raises(monkeypatch, tmp_path) -> None:
    """Offline, a repo id absent from an (empty) Hugging Face cache fails saying downloads are off and how to
    fetch it (downloads themselves: tests/test_hub.py)."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache.*downloads are off.*hf download"):
        load_pipeline_components("perflow-test/not-there")


def test_repo_id_resolves_in_cache_layout(tiny, monkeypatch, tmp_path) -> None:
    """A repo id in the hub cache layout (``models--org--name/refs/main`` → ``snapshots/<hash>/``) loads that
    snapshot (also by explicit revision hash), with the same params as loading the folder directly."""
    src = tiny("sd15").folder
    repo = tmp_path / "models--perflow-test--tiny-sd15"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(src, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit + "\n")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))

    comps = load_pipeline_components("perflow-test/tiny-sd15")
    assert os.path.samefile(comps.path, repo / "snapshots" / commit)
    assert comps.family == "sd"
    assert os.path.samefile(load_pipeline_components("perflow-test/tiny-sd15", revision=commit).path, comps.path)
    direct = load_pipeline_components(src)
    flat = jax.tree_util.tree_leaves_with_path(comps.unet_params)
    ref = dict(jax.tree_util.tree_leaves_with_path(direct.unet_params))
    assert len(flat) == len(ref)
    for path, leaf in flat:
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(ref[path]))
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache"):
        load_pipeline_components("perflow-test/tiny-sd15", revision="no-such-branch")


def test_cpu_pipeline_holds_the_weights_once(tiny) -> None:
    """On one CPU process in float32, the converted params are used in place by the device arrays, and the
    pipeline's own ``components`` keeps read-only views of them (not a second copy); the components passed to
    the constructor are left as they were (their own arrays); a bf16 pipeline from the same components casts its
    own copy and leaves them untouched."""
    if jax.default_backend() != "cpu" or jax.device_count() != 1:
        pytest.skip("weight sharing applies to a single-device CPU mesh")
    pipe = tiny("sd15").pipe()
    reference = load_pipeline_components(tiny("sd15").folder)
    device = jax.tree_util.tree_leaves(pipe.params["unet"])
    host = jax.tree_util.tree_leaves(pipe.components.unet_params)
    assert all(d.unsafe_buffer_pointer() == h.ctypes.data for d, h in zip(device, host, strict=True))
    assert not any(h.flags.writeable for h in host)
    for h, r in zip(host, jax.tree_util.tree_leaves(reference.unet_params), strict=True):
        np.testing.assert_array_equal(h, r)  # same values as a fresh load

    caller = jax.tree_util.tree_leaves(reference.unet_params)
    own = StableDiffusionPipeline(reference, pipe.scheduler)
    assert own.components is not reference
    assert all(a is b for a, b in zip(jax.tree_util.tree_leaves(reference.unet_params), caller, strict=True))
    own_device = jax.tree_util.tree_leaves(own.params["unet"])
    own_host = jax.tree_util.tree_leaves(own.components.unet_params)
    assert all(d.unsafe_buffer_pointer() == h.ctypes.data for d, h in zip(own_device, own_host, strict=True))

    half = StableDiffusionPipeline(pipe.components, pipe.scheduler, dtype=jnp.bfloat16)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree_util.tree_leaves(half.params))
    assert half.components is pipe.components  # no sharing in bf16: the components are used as given
    assert jax.tree_util.tree_leaves(pipe.components.unet_params)[0] is host[0]  # unchanged by the bf16 pipeline


# --------------------------------------------------------------------------------------------------------------
# Stages and construction
# --------------------------------------------------------------------------------------------------------------


def _stages_by_hand(pipe: StableDiffusionPipeline, request: GenerationRequest) -> np.ndarray:
    """The four public stages, each jitted on its own and called in order, as research code would."""
    spec, inputs, params = request.spec, request.inputs, pipe.params
    state = pipe.scheduler_state(spec.num_inference_steps, pipe.latent_shape(spec))
    size = (spec.height, spec.width)
    encode = jax.jit(pipe.encode_prompt, static_argnames=("size", "zero_text"))
    cond = encode(params, inputs.ids, size=size)
    uncond = encode(params, inputs.neg_ids, size=size, zero_text=spec.zero_negative) if spec.use_cfg else None
    x = jax.jit(pipe.prepare_latents, static_argnums=1)(params, spec, state, inputs, request.seed)
    x = jax.jit(pipe.denoise, static_argnums=1)(params, spec, state, x, cond, uncond, request.guidance_scale,
                                                request.seed)
    images = jax.jit(pipe.decode, static_argnums=2)(params, x, spec.output_type)
    return np.asarray(images)[:request.num_images]


STAGE_CASES = {
    "sd15 cfg": ("sd15", dict(guidance_scale=3.0, negative_prompt=NEGATIVES)),
    "sd15 no cfg": ("sd15", dict(guidance_scale=1.0)),
    "sdxl cfg zero negative": ("sdxl", dict(guidance_scale=3.0)),
    "sdxl no cfg": ("sdxl", dict(guidance_scale=0.0)),
    "sd15 img2img": ("sd15", dict(guidance_scale=3.0, strength=0.6)),
    "sdxl img2img": ("sdxl", dict(guidance_scale=3.0, strength=0.5)),
}


@pytest.mark.parametrize("case", list(STAGE_CASES))
def test_stages_composed_by_hand_equal_call(tiny, case: str) -> None:
    """``encode_prompt`` → ``prepare_latents`` → ``denoise`` → ``decode``, each jitted separately and composed
    by hand, give bit for bit the images of ``__call__`` / ``img2img`` (text-to-image with and without CFG,
    img2img; SD1 and SDXL, whose negative branch is zeroed without a negative prompt)."""
    family, kw = STAGE_CASES[case]
    pipe = tiny(family).pipe("perflow")
    kw = dict(kw, num_inference_steps=STEPS, seed=5, output_type="float")
    if "strength" in kw:
        image = np.random.default_rng(4).uniform(0, 1, (H, W, 3)).astype(np.float32)
        ours = pipe.img2img(PROMPTS, image, **kw)
        request = pipe.build_request(PROMPTS, image=image, **kw)
        assert request.spec.has_image and request.spec.start_step > 0
    else:
        ours = pipe(PROMPTS, height=H, width=W, **kw)
        request = pipe.build_request(PROMPTS, height=H, width=W, **kw)
    assert request.spec in pipe._compiled  # __call__ ran the program of exactly this spec
    assert request.spec.use_cfg == (kw["guidance_scale"] > 1.0)
    np.testing.assert_array_equal(_stages_by_hand(pipe, request), ours)


CONFIG_KEYS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
               "jax_persistent_cache_min_entry_size_bytes")


def test_building_a_pipeline_changes_no_global_state_nor_components(tiny, monkeypatch, tmp_path) -> None:
    """Constructing a pipeline (directly and with ``from_pretrained``) and generating with it leave
    ``jax.config`` as it was, even with ``PERFLOW_JAX_CACHE_DIR`` pointing elsewhere, and leave the caller's
    ``components`` untouched: the same param trees and arrays (identity) with the same values."""
    monkeypatch.setenv("PERFLOW_JAX_CACHE_DIR", str(tmp_path / "would-be-cache"))
    before = {k: getattr(jax.config, k) for k in CONFIG_KEYS}
    folder = tiny("sd15").folder
    comps = load_pipeline_components(folder)
    trees = {"unet": comps.unet_params, "vae": comps.vae_params, "text_encoder": comps.text_encoder_params}
    leaves = {k: jax.tree_util.tree_leaves(t) for k, t in trees.items()}
    values = {k: [np.array(a, copy=True) for a in v] for k, v in leaves.items()}

    pipe = StableDiffusionPipeline(comps, make_scheduler(comps, "perflow"))
    pipe(PROMPTS, num_inference_steps=STEPS, height=H, width=W)
    StableDiffusionPipeline.from_pretrained(folder, scheduler="ddim")

    assert {k: getattr(jax.config, k) for k in CONFIG_KEYS} == before
    assert not (tmp_path / "would-be-cache").exists()
    assert comps.unet_params is trees["unet"] and comps.vae_params is trees["vae"]
    assert comps.text_encoder_params is trees["text_encoder"]
    for k, tree in trees.items():
        now = jax.tree_util.tree_leaves(tree)
        assert all(a is b for a, b in zip(now, leaves[k], strict=True)), k
        for a, v in zip(now, values[k], strict=True):
            np.testing.assert_array_equal(a, v)
