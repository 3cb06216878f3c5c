"""AnimateDiff (motion modules on SD1.5) against diffusers' PyTorch UNetMotionModel and AnimateDiffPipeline.

Tiny random models: the SD1.5-style pipeline of tests/support/tiny_sd.py and a MotionAdapter for it (2 heads,
8 groups, mid-block module, every parameter perturbed so the zero-initialised ``proj_out`` layers act); 3 frames,
16×16 pixels, 2 steps, so the whole module stays well under 2 minutes on CI.

Tolerances: the motion UNet 1e-5 (float32 end to end; measured ~3e-6 on outputs of magnitude ~2.6, from summation
order in attention/GroupNorm); decoded frames 2e-3, as every pipeline parity test here (float32 noise through two
scheduler steps and the VAE; measured ~2e-6).
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
import torch

from perflow_jax.models import motion_unet as mu
from perflow_jax.models.convert import ConversionError
from perflow_jax.models.unet import UNetConfig
from perflow_jax.pipelines.animatediff import AnimateDiffPipeline
from tests.support.tiny_animatediff import make_tiny_motion_adapter
from tests.support.tiny_sd import make_tiny_pipeline
from tests.support.torch_perflow import TorchPeRFlowScheduler

F, SIZE, STEPS = 3, 16, 2
UNET_TOL, FRAME_TOL = 1e-5, 2e-3
LATENTS = np.random.default_rng(1).standard_normal((1, 4, F, SIZE // 2, SIZE // 2)).astype(np.float32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("animatediff")
    sd = make_tiny_pipeline(str(root / "sd"))
    adapter = make_tiny_motion_adapter(str(root / "mm"))
    return root, sd, adapter


def _torch_pipe(sd, adapter, scheduler):
    from diffusers import AnimateDiffPipeline as TorchAnimateDiff

    return TorchAnimateDiff(vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=sd.unet,
                            motion_adapter=adapter, scheduler=scheduler, feature_extractor=None, image_encoder=None)


def test_motion_unet_matches_diffusers(tiny) -> None:
    from diffusers import UNetMotionModel

    root, sd, adapter = tiny
    cfg, adapter_cfg, params = mu.load_motion_unet(root / "sd" / "unet", root / "mm")
    torch_model = UNetMotionModel.from_unet2d(sd.unet, adapter).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, F, 8, 8, generator=g)
    context = torch.randn(2, 5, 32, generator=g)
    with torch.no_grad():
        ref = torch_model(x, torch.tensor([500, 20]), context.repeat_interleave(F, 0)).sample.numpy()
    model = mu.motion_unet(cfg, mu.motion_spec(cfg, adapter_cfg, F))
    apply = jax.jit(functools.partial(mu.motion_unet_apply, model))
    out = np.asarray(apply(params, x.numpy(), np.array([500, 20]), context.numpy()))
    diff = float(np.abs(out - ref).max())
    print(f"\nmotion UNet max |flax - torch| = {diff:.2e} (max |out| {np.abs(ref).max():.2f})")
    assert out.shape == ref.shape == (2, 4, F, 8, 8)
    assert diff < UNET_TOL


def _original_layout(adapter) -> dict[str, np.ndarray]:
    """The tiny adapter's weights under the original AnimateDiff (mm_sd_v15_v2) names, positions included."""
    back = ((".attn1.", ".attention_blocks.0."), (".attn2.", ".attention_blocks.1."), (".norm1.", ".norms.0."),
            (".norm2.", ".norms.1."), (".norm3.", ".ff_norm."), (".pos_embed.", ".attention_blocks.0.pos_encoder."))
    out = {}
    for key, value in adapter.state_dict().items():
        head, rest = key.split(".motion_modules.", 1)
        index, tail = rest.split(".", 1)
        tail = "." + tail
        if tail.startswith(".transformer_blocks.") and ".pos_embed." in tail:
            # pos_embed is one module per block in diffusers; the original has one per attention block
            out[f"{head}.motion_modules.{index}.temporal_transformer" + tail.replace(
                ".pos_embed.", ".attention_blocks.1.pos_encoder.")] = value.numpy()
        for old, new in back:
            tail = tail.replace(old, new)
        out[f"{head}.motion_modules.{index}.temporal_transformer{tail}"] = value.numpy()
    return out


def test_original_motion_module_layout(tiny, tmp_path) -> None:
    """mm_sd_v15*-style files: the safetensors conversion loads as is, the .ckpt pickle only with allow_pickle;
    both give exactly the diffusers adapter's params."""
    from safetensors.numpy import save_file

    root, _, adapter = tiny
    cfg = UNetConfig.from_json(root / "sd" / "unet")
    adapter_cfg, want = mu.load_motion_adapter(root / "mm", cfg)
    sd = _original_layout(adapter)
    save_file(sd, str(tmp_path / "mm_tiny.safetensors"))
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, str(tmp_path / "mm_tiny.ckpt"))
    got = mu.load_original_motion_module(tmp_path / "mm_tiny.safetensors", cfg, adapter_cfg)
    with pytest.raises(ConversionError, match="pickle"):
        mu.load_original_motion_module(tmp_path / "mm_tiny.ckpt", cfg, adapter_cfg)
    pickled = mu.load_original_motion_module(tmp_path / "mm_tiny.ckpt", cfg, adapter_cfg, allow_pickle=True)
    for tree in (got, pickled):
        assert jax.tree_util.tree_structure(tree) == jax.tree_util.tree_structure(want)
        for a, b in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(want), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("scheduler", ["ddim", "perflow"])
def test_pipeline_matches_diffusers(tiny, scheduler) -> None:
    """Same weights and latents, CFG 3.0: frames within 2e-3 of diffusers' AnimateDiffPipeline with DDIM (2 steps),
    and with TorchPeRFlowScheduler (the PyTorch PeRFlow transcription) built from our PeRFlow config (4 steps, one
    per time window)."""
    from diffusers import DDIMScheduler

    root, sd, adapter = tiny
    ours = AnimateDiffPipeline.from_pretrained(root / "sd", root / "mm", scheduler=scheduler)
    if scheduler == "ddim":
        torch_scheduler = DDIMScheduler.from_config(sd.scheduler.config)
    else:
        torch_scheduler = TorchPeRFlowScheduler.from_config(ours.scheduler.config.to_dict())
    kw = dict(num_frames=F, height=SIZE, width=SIZE, num_inference_steps=STEPS if scheduler == "ddim" else 4,
              guidance_scale=3.0)
    out = ours("a red cat", "dog", latents=LATENTS, **kw)
    with torch.no_grad():
        ref = _torch_pipe(sd, adapter, torch_scheduler)("a red cat", negative_prompt="dog",
                                                        latents=torch.from_numpy(LATENTS), output_type="np",
                                                        **kw).frames[0]
    diff = float(np.abs(out - ref).max())
    print(f"\n[{scheduler}] AnimateDiff frames max |perflow_jax - diffusers| = {diff:.2e}")
    assert out.shape == ref.shape == (F, SIZE, SIZE, 3)
    assert diff < FRAME_TOL
    assert len(ours._programs) == 1


def test_delta_lora_and_motion_modules_compose(tiny, tmp_path) -> None:
    """A PeRFlow ΔW plus a LoRA plus the motion modules: the 4-step run completes with finite frames, its first
    frame differs from the no-ΔW run's, and a second call reuses the compiled program."""
    from safetensors.numpy import save_file

    from perflow_jax import delta as delta_lib
    from perflow_jax.models.components import load_pipeline_components

    root, _, _ = tiny
    comps = load_pipeline_components(str(root / "sd"))
    rng = np.random.default_rng(0)
    dw = {k: 0.02 * rng.standard_normal(v.shape).astype(np.float32)
          for k, v in delta_lib.torch_unet_state_dict(comps.unet_params).items()}
    save_file(dw, str(tmp_path / "delta_weights.safetensors"))
    to_q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    save_file({f"{to_q}.lora_A.weight": 0.1 * rng.standard_normal((2, 32)).astype(np.float32),
               f"{to_q}.lora_B.weight": 0.1 * rng.standard_normal((32, 2)).astype(np.float32)},
              str(tmp_path / "lora.safetensors"))
    kw = dict(num_frames=F, height=SIZE, width=SIZE, num_inference_steps=4, guidance_scale=1.0, latents=LATENTS)
    plain = AnimateDiffPipeline.from_pretrained(root / "sd", root / "mm")("a red cat", **kw)
    pipe = AnimateDiffPipeline.from_pretrained(root / "sd", root / "mm", delta=str(tmp_path),
                                               loras=[(str(tmp_path / "lora.safetensors"), 0.8)])
    out = pipe("a red cat", **kw)
    assert out.shape == (F, SIZE, SIZE, 3) and np.isfinite(out).all()
    first = float(np.abs(out[0] - plain[0]).max())
    print(f"\nΔW + LoRA first frame vs no ΔW: max diff {first:.3f}")
    assert first > 1e-3
    pipe("a blue dog", **kw)
    assert len(pipe._programs) == 1


def test_bad_input(tiny, tmp_path) -> None:
    root, _, _ = tiny
    make_tiny_motion_adapter(str(tmp_path / "other"), block_out_channels=(64, 128))
    with pytest.raises(ValueError, match=r"motion adapter is for a base UNet with block_out_channels \[64, 128\]"):
        AnimateDiffPipeline.from_pretrained(root / "sd", tmp_path / "other")
    pipe = AnimateDiffPipeline.from_pretrained(root / "sd", root / "mm", scheduler="ddim")
    with pytest.raises(ValueError, match="motion_max_seq_length=8"):
        pipe("a cat", num_frames=9, height=SIZE, width=SIZE)
    with pytest.raises(ValueError, match=r"latents must have shape \(1, 4, 3, 8, 8\)"):
        pipe("a cat", num_frames=F, height=SIZE, width=SIZE, latents=LATENTS[:, :, :2])
    bad = LATENTS.copy()
    bad[0, 0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="latents"):
        pipe("a cat", num_frames=F, height=SIZE, width=SIZE, latents=bad)


def test_cli_video_with_motion_adapter(tiny, tmp_path, capsys) -> None:
    """``perflow-jax video --motion-adapter`` writes the frames; mixing SVD and AnimateDiff flags is refused."""
    from perflow_jax.cli import main

    root, _, _ = tiny
    out = tmp_path / "clip.gif"
    assert main(["--no-cache", "video", "--model", str(root / "sd"), "--motion-adapter", str(root / "mm"),
                 "--prompt", "a red cat", "--frames", str(F), "--steps", "4", "--height", str(SIZE), "--width",
                 str(SIZE), "--out", str(out)]) == 0
    assert out.is_file() and (tmp_path / "clip.sheet.png").is_file()
    assert f"wrote {F} frames" in capsys.readouterr().out
    for argv, message in (
            (["--motion-adapter", str(root / "mm"), "--prompt", "x", "--image", "a.png"], "--image is for SVD"),
            (["--motion-adapter", str(root / "mm")], "needs --prompt"),
            (["--image", "a.png", "--prompt", "x"], "--prompt is for AnimateDiff"),
            (["--prompt", "x"], "--prompt is for AnimateDiff")):
        assert main(["video", "--model", str(root / "sd"), *argv, "--out", str(tmp_path / "x.gif")]) != 0
        assert message in capsys.readouterr().err


def test_adapter_config_mismatches_are_one_line_errors(tiny) -> None:
    root, _, _ = tiny
    cfg = UNetConfig.from_json(root / "sd" / "unet")
    layers = mu.MotionAdapterConfig(block_out_channels=(32, 64), motion_layers_per_block=2, motion_norm_num_groups=8)
    with pytest.raises(ValueError, match=r"motion_layers_per_block \[2, 2\], this UNet has layers_per_block \[1, 1\]"):
        mu.motion_spec(cfg, layers, F)
    with pytest.raises(ValueError, match="one entry per block"):
        mu.MotionAdapterConfig(block_out_channels=(32, 64), motion_num_attention_heads=(2, 2, 2))
    _, motion = mu.load_motion_adapter(root / "mm", cfg)
    with pytest.raises(ValueError, match="merge_motion_params needs base UNet params"):
        mu.merge_motion_params(motion, motion)
