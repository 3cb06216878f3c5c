"""IP-Adapter and IP-Adapter Plus: tiny random adapters in the released layout, loaded by diffusers
(``load_ip_adapter`` from a local folder) and by perflow_jax, for SD1.5-style and SDXL-style UNets.

Tolerances: the UNet output is compared at 1e-5 (float32 on both sides; only matmul/reduction order differs,
~1e-7 relative on O(1) activations); generated images at 2e-3 like the other pipeline parity tests (4 sampler
steps through the tiny VAE amplify float32 rounding; still far below one 8-bit level, 3.9e-3).
"""

from __future__ import annotations

import os
import re

import jax
import numpy as np
import pytest
import torch

from perflow_jax.models import adapter
from perflow_jax.models.adapter import UNetCondition
from perflow_jax.models.ip_adapter import image_projection, load_ip_adapter, merge_ip_adapter
from perflow_jax.models.unet import UNet2DConditionModel, load_unet
from perflow_jax.pipelines import StableDiffusionPipeline
from tests.support.tiny_ip_adapter import ENCODER, save_tiny_encoder, write_ip_adapter
from tests.support.tiny_sd import make_tiny_pipeline

UNET_TOL = 1e-5
IMAGE_TOL = 2e-3
KINDS = ("ip-adapter", "plus")


class Tiny:
    """A saved tiny diffusers pipeline of one family, a tiny image encoder and an adapter file per kind."""

    def __init__(self, root: str, family: str):
        self.family = family
        self.folder = os.path.join(root, family)
        self.torch_pipe = make_tiny_pipeline(self.folder, family)
        self.torch_pipe.set_progress_bar_config(disable=True)
        self.encoder_dir = os.path.join(root, f"{family}_adapters", "image_encoder")
        self.torch_encoder = save_tiny_encoder(self.encoder_dir, seed=7)
        self.adapter_dir = os.path.dirname(self.encoder_dir)
        self.files = {}
        for i, kind in enumerate(KINDS):
            dim = ENCODER["hidden_size"] if kind == "plus" else ENCODER["projection_dim"]
            self.files[kind] = os.path.join(self.adapter_dir, f"{kind}.safetensors")
            write_ip_adapter(self.files[kind], self.torch_pipe.unet, dim, kind == "plus", seed=10 + i)

    def load_torch(self, kind: str, scale: float):
        """Load the `kind` adapter into the diffusers pipeline the way users do (replacing any earlier one)."""
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        pipe = self.torch_pipe
        if getattr(pipe.unet, "encoder_hid_proj", None) is not None:
            pipe.unload_ip_adapter()
        size = ENCODER["image_size"]
        pipe.register_modules(image_encoder=self.torch_encoder,
                              feature_extractor=CLIPImageProcessorPil(size={"shortest_edge": size},
                                                                      crop_size={"height": size, "width": size}))
        pipe.load_ip_adapter(self.adapter_dir, subfolder="", weight_name=f"{kind}.safetensors",
                             image_encoder_folder=None, low_cpu_mem_usage=False)
        pipe.set_ip_adapter_scale(scale)
        return pipe


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: PyTorch's thread pool slows tiny models down
    root = str(tmp_path_factory.mktemp("ip_adapter"))
    models: dict[str, Tiny] = {}

    def get(family: str) -> Tiny:
        if family not in models:
            models[family] = Tiny(root, family)
        return models[family]

    yield get
    torch.set_num_threads(threads)


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_unet_output_matches_diffusers(tiny, family: str, kind: str) -> None:
    """Same image features in: diffusers' UNet with the adapter (projection inside its encoder_hid_proj) and
    ours (projection, then image tokens through the one UNet adapter) agree within 1e-5, at scale 0.7."""
    m = tiny(family)
    pipe = m.load_torch(kind, 0.7)
    rng = np.random.default_rng(3)
    b = 2
    x = rng.standard_normal((b, 4, 8, 8)).astype(np.float32)
    t = np.array([10, 700])
    cross = pipe.unet.config.cross_attention_dim
    text = rng.standard_normal((b, 5, cross)).astype(np.float32)
    feat = (rng.standard_normal((b, 17, ENCODER["hidden_size"])) if kind == "plus"
            else rng.standard_normal((b, ENCODER["projection_dim"]))).astype(np.float32)
    added = {"image_embeds": [torch.from_numpy(feat[:, None])]}
    cond = UNetCondition(encoder_hidden_states=text)
    if family == "sdxl":
        text_embeds = rng.standard_normal((b, 16)).astype(np.float32)
        time_ids = np.tile(np.array([32, 32, 0, 0, 32, 32], np.float32), (b, 1))
        added |= {"text_embeds": torch.from_numpy(text_embeds), "time_ids": torch.from_numpy(time_ids)}
        cond = cond._replace(text_embeds=text_embeds, time_ids=time_ids)
    with torch.no_grad():
        want = pipe.unet(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(text),
                         added_cond_kwargs=added).sample.numpy()

    config, params = load_unet(os.path.join(m.folder, "unet"))
    ip = load_ip_adapter(m.files[kind], config)
    assert ip.config.kind == kind and ip.config.uses_hidden_states == (kind == "plus")
    tokens = jax.jit(image_projection(ip.config).apply)({"params": ip.projection_params}, feat)
    with torch.no_grad():
        ref_tokens = pipe.unet.encoder_hid_proj.image_projection_layers[0](torch.from_numpy(feat)).numpy()
    np.testing.assert_allclose(tokens, ref_tokens, atol=UNET_TOL, rtol=0)
    merged = merge_ip_adapter(params, ip)
    cond = cond._replace(ip_tokens=tokens, ip_scale=np.full((b,), 0.7, np.float32))
    unet = jax.jit(adapter.unet_fn(UNet2DConditionModel(config), merged))
    got = unet(x, t, cond)
    diff = _max_diff(got, want)
    print(f"\n[{family}/{kind}] UNet max |perflow_jax - diffusers| = {diff:.2e}")
    assert diff < UNET_TOL
    assert _max_diff(got, unet(x, t, cond._replace(ip_scale=np.zeros((b,), np.float32)))) > 1e-3  # tokens matter


# --------------------------------------------------------------------------------------------------------------
# Pipelines
# --------------------------------------------------------------------------------------------------------------

H = W = 32
STEPS = 4
LATENTS = np.random.default_rng(0).standard_normal((1, 4, H // 2, W // 2)).astype(np.float32)
IP_IMAGE = np.random.default_rng(5).integers(0, 256, size=(40, 56, 3), dtype=np.uint8)  # resized, then cropped


def _pipe(m: Tiny, kind: str, **kw) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(m.folder, scheduler="ddim", ip_adapter=m.files[kind],
                                                   image_encoder=m.encoder_dir, **kw)


@pytest.mark.parametrize(("family", "kind"), [("sd15", "plus"), ("sdxl", "ip-adapter")])
def test_images_match_diffusers(tiny, tmp_path, family: str, kind: str) -> None:
    """The whole image-prompt path (preprocessing, image encoder, projection, CFG with diffusers' unconditional
    image tokens, decoupled attention) against diffusers' pipeline: DDIM, CFG 3.0, scale 0.6, same latents.

    SD1.5 also composes a PeRFlow-style ΔW: ours loads ``delta=`` and the adapter on top; diffusers' UNet holds
    base + ΔW (added in PyTorch) with the adapter loaded the usual way."""
    from diffusers import DDIMScheduler
    from PIL import Image
    from safetensors.torch import save_file

    m = tiny(family)
    ref_pipe = m.load_torch(kind, 0.6)
    ref_pipe.scheduler = DDIMScheduler.from_pretrained(m.folder, subfolder="scheduler")
    delta = None
    base_sd = {k: v.clone() for k, v in ref_pipe.unet.state_dict().items()  # the UNet without the adapter
               if "_ip" not in k and not k.startswith("encoder_hid_proj.")}
    if family == "sd15":
        g = torch.Generator().manual_seed(1)
        dw = {k: 0.02 * torch.randn(v.shape, generator=g) for k, v in base_sd.items()}
        save_file(dw, str(tmp_path / "delta_weights.safetensors"))
        delta = str(tmp_path)
        ref_pipe.unet.load_state_dict({k: v + dw[k] for k, v in base_sd.items()}, strict=False)
    kw = dict(num_inference_steps=STEPS, guidance_scale=3.0, height=H, width=W)
    try:
        with torch.no_grad():
            ref = ref_pipe(["a cat"], ip_adapter_image=Image.fromarray(IP_IMAGE),
                           latents=torch.from_numpy(LATENTS), output_type="np", **kw).images
    finally:
        ref_pipe.unet.load_state_dict(base_sd, strict=False)
    pipe = _pipe(m, kind, delta=delta)
    ours = pipe(["a cat"], ip_adapter_image=IP_IMAGE, ip_adapter_scale=0.6, latents=LATENTS, output_type="float",
                **kw)
    diff = _max_diff(ours, ref)
    print(f"\n[{family}/{kind}{' + ΔW' if delta else ''}] images max |perflow_jax - diffusers| = {diff:.2e}")
    assert np.std(ref) > 0.02
    assert diff < IMAGE_TOL
    if family == "sd15":  # the scale is traced (no recompile); scale 0 is the model without the image prompt
        compiled = pipe.stats.num_compiled
        off = pipe(["a cat"], ip_adapter_image=IP_IMAGE, ip_adapter_scale=0.0, latents=LATENTS,
                   output_type="float", **kw)
        assert pipe.stats.num_compiled == compiled
        plain = pipe(["a cat"], latents=LATENTS, output_type="float", **kw)
        assert _max_diff(off, plain) < 1e-6 and _max_diff(ours, plain) > 1e-2


def test_cli_sample_with_an_image_prompt(tiny, tmp_path, capsys) -> None:
    """``perflow-jax sample --ip-adapter FILE --ip-image FILE --ip-scale S`` in img2img (the pipeline tests cover
    text-to-image); the image encoder is found next to the adapter file (the released repos' layout)."""
    from PIL import Image

    from perflow_jax.cli import main

    m = tiny("sd15")
    Image.fromarray(IP_IMAGE).save(tmp_path / "prompt.png")
    Image.fromarray(IP_IMAGE[:32, :32]).save(tmp_path / "init.png")
    out = tmp_path / "out"
    argv = ["--no-cache", "sample", "--model", m.folder, "--prompt", "a cat", "--num-images", "1", "--steps", "2",
            "--scheduler", "ddim", "--ip-adapter", m.files["ip-adapter"],
            "--ip-image", str(tmp_path / "prompt.png"), "--ip-scale", "0.5", "--init-image",
            str(tmp_path / "init.png"), "--strength", "0.5", "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    with Image.open(out / "image_0000.png") as im:
        assert im.size == (32, 32)


# --------------------------------------------------------------------------------------------------------------
# Bad input: one-line errors
# --------------------------------------------------------------------------------------------------------------


def _one_line_error(fn, match: str, error=ValueError) -> None:
    with pytest.raises(error, match=match) as e:
        fn()
    assert "\n" not in str(e.value), str(e.value)


def test_adapters_that_do_not_fit_the_unet_are_refused(tiny, tmp_path) -> None:
    from safetensors.numpy import load_file, save_file

    from perflow_jax.models.unet import UNetConfig

    sd15, sdxl = tiny("sd15"), tiny("sdxl")
    config = UNetConfig.from_json(os.path.join(sd15.folder, "unet"))
    _one_line_error(lambda: load_ip_adapter(sdxl.files["ip-adapter"], config),
                    r"image tokens are 64 wide but the UNet's cross_attention_dim is 32")
    sd = load_file(sd15.files["plus"])
    fewer = {k: v for k, v in sd.items() if not k.startswith("ip_adapter.3.")}
    save_file(fewer, str(tmp_path / "fewer.safetensors"))
    _one_line_error(lambda: load_ip_adapter(tmp_path / "fewer.safetensors", config),
                    r"has 3 cross-attention layers but the UNet has 4 \(missing ip_adapter.\{3\}\)")
    wide = dict(sd, **{"ip_adapter.1.to_k_ip.weight": np.zeros((48, 32), np.float32)})
    save_file(wide, str(tmp_path / "wide.safetensors"))
    _one_line_error(lambda: load_ip_adapter(tmp_path / "wide.safetensors", config),
                    r"ip_adapter.1.to_k_ip.weight has shape \(48, 32\) but the UNet's .*attn2 needs \(32, 32\)")
    unet_file = os.path.join(sd15.folder, "unet", "diffusion_pytorch_model.safetensors")
    _one_line_error(lambda: load_ip_adapter(unet_file, config), "not an IP-Adapter file")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 10)
    _one_line_error(lambda: load_ip_adapter(broken, config), "broken.safetensors")


def test_pipeline_bad_image_prompts(tiny, tmp_path) -> None:
    """One pipeline: an image prompt before any adapter, an adapter whose encoder does not fit (nothing changes),
    then ``load_ip_adapter`` finding the encoder next to the file, then bad images and scales."""
    m = tiny("sd15")
    pipe = StableDiffusionPipeline.from_pretrained(m.folder)
    _one_line_error(lambda: pipe.build_request("a cat", ip_adapter_image=IP_IMAGE),
                    r"ip_adapter_image needs an IP-Adapter")
    other_encoder = str(tmp_path / "image_encoder")
    save_tiny_encoder(other_encoder, projection_dim=20)
    unet_params = pipe.params["unet"]
    _one_line_error(lambda: pipe.load_ip_adapter(m.files["ip-adapter"], image_encoder=other_encoder),
                    r"reads 24-wide image features but the image encoder .* gives 20 \(projection_dim\)")
    assert pipe.image_prompt is None and pipe.params["unet"] is unet_params
    pipe.load_ip_adapter(m.files["ip-adapter"])
    assert pipe.image_prompt.encoder_path == m.encoder_dir and pipe.image_prompt.adapter.kind == "ip-adapter"
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    _one_line_error(lambda: pipe.build_request("a cat", ip_adapter_image=str(bad)),
                    r"ip_adapter_image '.*broken.png' is not an image file PIL can read")
    _one_line_error(lambda: pipe.build_request("a cat", ip_adapter_image=str(tmp_path / "none.png")),
                    r"ip_adapter_image '.*none.png' does not exist")
    _one_line_error(lambda: pipe.build_request(["a", "b", "c"], ip_adapter_image=[IP_IMAGE, IP_IMAGE]),
                    r"Got 2 ip_adapter_image\(s\) for 3 prompts")
    _one_line_error(lambda: pipe.build_request("a cat", ip_adapter_image=IP_IMAGE, ip_adapter_scale=float("nan")),
                    "ip_adapter_scale must be a finite number")
    req = pipe.build_request(["a", "b"], ip_adapter_image=[IP_IMAGE, IP_IMAGE[::-1]], ip_adapter_scale=0.3,
                             num_images_per_prompt=2)
    assert req.spec.ip_adapter and req.inputs.ip_image.shape == (4, 3, 32, 32)
    np.testing.assert_array_equal(np.asarray(req.inputs.ip_scale), np.full((4,), 0.3, np.float32))


@pytest.mark.parametrize(("extra", "match"), [
    (("--ip-image", "{img}"), "--ip-adapter and --ip-image go together"),
    (("--ip-scale", "0.5"), "--ip-scale apply to image prompts"),
    (("--ip-adapter", "{adapter}", "--ip-image", "{bad}"), r"--ip-image '.*bad.png' is not an image file"),
    (("--ip-adapter", "{tmp}/missing.safetensors", "--ip-image", "{img}"), "--ip-adapter .* does not exist"),
])
def test_cli_bad_image_prompt_flags(tiny, tmp_path, capsys, extra, match) -> None:
    from PIL import Image

    from perflow_jax.cli import main

    m = tiny("sd15")
    Image.fromarray(IP_IMAGE).save(tmp_path / "img.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    fill = dict(img=str(tmp_path / "img.png"), bad=str(tmp_path / "bad.png"), adapter=m.files["ip-adapter"],
                tmp=str(tmp_path))
    argv = ["--no-cache", "sample", "--model", m.folder, "--prompt", "a cat", "--out", str(tmp_path / "out"),
            *(a.format(**fill) for a in extra)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(match, err), err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_no_image_tokens_is_the_plain_program(tiny) -> None:
    """Zero cost when unused: a UNet whose params carry the adapter's layers, called without image tokens,
    lowers to exactly the program of the plain UNet (the *_ip params are never read)."""
    m = tiny("sd15")
    config, params = load_unet(os.path.join(m.folder, "unet"))
    merged = merge_ip_adapter(params, load_ip_adapter(m.files["ip-adapter"], config))
    model = UNet2DConditionModel(config)
    x, t = np.zeros((1, 4, 8, 8), np.float32), np.zeros((1,), np.int32)
    cond = UNetCondition(encoder_hidden_states=np.zeros((1, 3, 32), np.float32))

    def hlo(p) -> str:
        return jax.jit(lambda x: adapter.unet_apply(model, p, x, t, cond)).lower(x).as_text()

    assert hlo(merged) == hlo(params)
