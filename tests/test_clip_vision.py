"""Parity of the Flax CLIP image encoder and preprocessing with transformers (tiny random configs)."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
import torch

from perflow_jax.images import read_image
from perflow_jax.models.clip_vision import (
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    load_clip_vision_model,
    preprocess_images,
)
from perflow_jax.models.mismatch import ConversionError
from tests.support.tiny_ip_adapter import save_tiny_encoder

# float32 on both sides: only the accumulation order of matmuls and reductions differs (~1e-7 relative on O(1)
# activations), so 1e-5 absolute catches any real math difference.
ATOL = 1e-5


@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
def test_vision_encoder_matches_transformers(tmp_path, act):
    ref = save_tiny_encoder(str(tmp_path), hidden_act=act)
    config, params = load_clip_vision_model(tmp_path)
    assert config.hidden_act == act and config.num_positions == 17
    pixels = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(pixels), output_hidden_states=True)
    got = jax.jit(CLIPVisionModelWithProjection(config).apply)({"params": params}, pixels)
    np.testing.assert_allclose(got.image_embeds, want.image_embeds.numpy(), atol=ATOL, rtol=0)
    np.testing.assert_allclose(got.penultimate, want.hidden_states[-2].numpy(), atol=ATOL, rtol=0)
    np.testing.assert_allclose(got.last_hidden_state, want.last_hidden_state.numpy(), atol=ATOL, rtol=0)
    assert len(got.hidden_states) == len(want.hidden_states) == 4
    for g, w in zip(got.hidden_states, want.hidden_states, strict=True):
        np.testing.assert_allclose(g, w.numpy(), atol=ATOL, rtol=0)


def test_load_refuses_weights_of_another_config(tmp_path):
    save_tiny_encoder(str(tmp_path))
    cfg = os.path.join(tmp_path, "config.json")
    text = open(cfg).read().replace('"projection_dim": 24', '"projection_dim": 20')
    with open(cfg, "w") as f:
        f.write(text)
    with pytest.raises(ConversionError, match="visual_projection"):
        load_clip_vision_model(tmp_path)


@pytest.mark.parametrize("shape", [(40, 56, 3), (61, 33, 3), (32, 32, 3)])
def test_preprocess_matches_clip_image_processor(shape):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image = np.random.default_rng(1).integers(0, 256, size=shape, dtype=np.uint8)
    want = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})(
        image, return_tensors="np").pixel_values
    got = preprocess_images(image, image_size=32)
    # Same PIL bicubic resize on uint8 pixels; rescale and normalise differ only in float64 vs float32 rounding.
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    assert got.shape == (1, 3, 32, 32) and got.dtype == np.float32


def test_read_image_errors_name_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"--ip-image .*broken\.png' is not an image file PIL can read") as e:
        read_image(bad, "--ip-image")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="image .*missing.png' does not exist"):
        read_image(tmp_path / "missing.png")


def test_config_checks():
    with pytest.raises(ValueError, match="patch_size"):
        CLIPVisionConfig(image_size=30, patch_size=8)
    full = {"vision_config": {"hidden_size": 64, "num_attention_heads": 4}}  # a CLIPModel config
    assert CLIPVisionConfig.from_dict(full).hidden_size == 64
