"""IP-Adapter and IP-Adapter Plus: tiny random adapters in the released layout, loaded by diffusers
(``load_ip_adapter`` from a local folder) and by perflow_jax, for SD1.5-style and SDXL-style UNets.

Tolerances: the UNet output is compared at 1e-5 (float32 on both sides; only matmul/reduction order differs,
~1e-7 relative on O(1) activations); generated images at 2e-3 like the other pipeline parity tests (4 sampler
steps through the tiny VAE amplify float32 rounding; still far below one 8-bit level, 3.9e-3).
"""

from __future__ import annotations

import os

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
    tokens = image_projection(ip.config).apply({"params": ip.projection_params}, feat)
    with torch.no_grad():
        ref_tokens = pipe.unet.encoder_hid_proj.image_projection_layers[0](torch.from_numpy(feat)).numpy()
    np.testing.assert_allclose(tokens, ref_tokens, atol=UNET_TOL, rtol=0)
    merged = merge_ip_adapter(params, ip)
    cond = cond._replace(ip_tokens=tokens, ip_scale=np.full((b,), 0.7, np.float32))
    got = jax.jit(adapter.unet_fn(UNet2DConditionModel(config), merged))(x, t, cond)
    diff = _max_diff(got, want)
    print(f"\n[{family}/{kind}] UNet max |perflow_jax - diffusers| = {diff:.2e}")
    assert diff < UNET_TOL
    assert _max_diff(got, adapter.unet_apply(UNet2DConditionModel(config), params, x, t,
                                             cond._replace(ip_tokens=None, ip_scale=None))) > 1e-3


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
def test_images_match_diffusers(tiny, family: str, kind: str) -> None:
    """The whole image-prompt path (preprocessing, image encoder, projection, CFG with diffusers' unconditional
    image tokens, decoupled attention) against diffusers' pipeline: DDIM, CFG 3.0, scale 0.6, same latents."""
    from diffusers import DDIMScheduler
    from PIL import Image

    m = tiny(family)
    ref_pipe = m.load_torch(kind, 0.6)
    ref_pipe.scheduler = DDIMScheduler.from_pretrained(m.folder, subfolder="scheduler")
    kw = dict(num_inference_steps=STEPS, guidance_scale=3.0, height=H, width=W)
    with torch.no_grad():
        ref = ref_pipe(["a cat"], ip_adapter_image=Image.fromarray(IP_IMAGE), latents=torch.from_numpy(LATENTS),
                       output_type="np", **kw).images
    pipe = _pipe(m, kind)
    ours = pipe(["a cat"], ip_adapter_image=IP_IMAGE, ip_adapter_scale=0.6, latents=LATENTS, output_type="float",
                **kw)
    diff = _max_diff(ours, ref)
    print(f"\n[{family}/{kind}] images max |perflow_jax - diffusers| = {diff:.2e}")
    assert np.std(ref) > 0.02
    assert diff < IMAGE_TOL
    # The scale is traced (no recompile); scale 0 is the model without the image prompt.
    compiled = pipe.stats.num_compiled
    off = pipe(["a cat"], ip_adapter_image=IP_IMAGE, ip_adapter_scale=0.0, latents=LATENTS, output_type="float",
               **kw)
    assert pipe.stats.num_compiled == compiled
    plain = pipe(["a cat"], latents=LATENTS, output_type="float", **kw)
    assert _max_diff(off, plain) < 1e-6 and _max_diff(ours, plain) > 1e-2
