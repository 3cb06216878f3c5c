"""Parity of the Flax CLIP text encoders with transformers' PyTorch models (tiny random configs)."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from perflow_jax.models.clip import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    load_clip_text_model,
)
from perflow_jax.models.mismatch import ConversionError

# float32 on both sides; the only differences are accumulation order in matmuls / reductions, ~1e-7 relative
# on O(1) activations, so 1e-5 absolute leaves ample margin while catching any real math difference.
ATOL = 1e-5
VOCAB, BOS, EOS = 1000, 989, 990

# Each row has the EOS id in it (twice in row 0: pooling must take the first one), and a token id above EOS
# so the legacy rule (argmax of the ids) and the modern rule (first EOS) pick different positions.
INPUT_IDS = np.array(
    [
        [BOS, 5, 17, EOS, EOS, 1, 995, 4],
        [BOS, 500, 2, 7, EOS, 9, 997, 1],
    ],
    dtype=np.int64,
)
INPUT_IDS_LEGACY = np.array(  # legacy configs: EOS is the highest id in each row
    [
        [BOS, 5, 17, EOS, 2, 1, 3, 4],
        [BOS, 500, 2, 7, 8, EOS, 1, 1],
    ],
    dtype=np.int64,
)


def _torch_model(tmp_path, *, projection: bool, hidden_act: str, eos_token_id: int, seed: int = 0, **save_kw):
    """A tiny random transformers text encoder saved with save_pretrained; returns (model, folder)."""
    torch.manual_seed(seed)
    cfg = transformers.CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=16, hidden_act=hidden_act, projection_dim=16, layer_norm_eps=1e-5,
        bos_token_id=BOS, eos_token_id=eos_token_id, pad_token_id=1,
    )
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    model = cls(cfg).eval()
    with torch.no_grad():  # randomise all params (LayerNorm scale/bias too) so no term is trivially 1 or 0
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    folder = tmp_path / f"clip_{'proj' if projection else 'plain'}_{hidden_act}_{eos_token_id}"
    model.save_pretrained(folder, **save_kw)
    return model, str(folder)


def _max_diff(a: torch.Tensor, b: jax.Array) -> float:
    return float(np.max(np.abs(a.numpy() - np.asarray(b, dtype=np.float32))))


def _compare(torch_model, folder: str, ids: np.ndarray, projection: bool, attention_mask=None) -> dict:
    config, params = load_clip_text_model(folder)
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)
    mask_j = None if attention_mask is None else jnp.asarray(attention_mask)
    out = jax.jit(model.apply)({"params": params}, jnp.asarray(ids, jnp.int32), mask_j)
    with torch.no_grad():
        mask_t = None if attention_mask is None else torch.tensor(attention_mask)
        ref = torch_model(torch.tensor(ids), attention_mask=mask_t, output_hidden_states=True)

    diffs = {"last_hidden_state": _max_diff(ref.last_hidden_state, out.last_hidden_state)}
    assert len(out.hidden_states) == len(ref.hidden_states) == config.num_hidden_layers + 1
    for i, (r, o) in enumerate(zip(ref.hidden_states, out.hidden_states, strict=True)):
        diffs[f"hidden_states[{i}]"] = _max_diff(r, o)
    if projection:
        diffs["text_embeds"] = _max_diff(ref.text_embeds, out.text_embeds)
        # transformers' WithProjection output has no pooled field: compare with its inner text model.
        with torch.no_grad():
            pooled = torch_model.text_model(torch.tensor(ids), attention_mask=mask_t).pooler_output
    else:
        assert out.text_embeds is None
        pooled = ref.pooler_output
    diffs["pooled_output"] = _max_diff(pooled, out.pooled_output)
    print(f"max abs diffs ({os.path.basename(folder)}):", {k: f"{v:.2e}" for k, v in diffs.items()})
    for name, d in diffs.items():
        assert d <= ATOL, f"{name}: max abs diff {d:.3e} > {ATOL}"
    return diffs


@pytest.mark.parametrize(
    "projection, hidden_act, eos_token_id, ids",
    [
        (False, "quick_gelu", EOS, INPUT_IDS),  # SD1-style encoder, modern EOS rule
        (False, "quick_gelu", 2, INPUT_IDS_LEGACY),  # SD1's original config: legacy argmax rule
        (True, "gelu", EOS, INPUT_IDS),  # SDXL text_encoder_2 style (OpenCLIP gelu + projection)
    ],
)
def test_parity(tmp_path, projection, hidden_act, eos_token_id, ids):
    model, folder = _torch_model(tmp_path, projection=projection, hidden_act=hidden_act,
                                 eos_token_id=eos_token_id)
    _compare(model, folder, ids, projection)


def test_pooling_rules_pick_different_tokens():
    """Guard that the test inputs really distinguish the legacy and modern EOS rules."""
    modern = (INPUT_IDS == EOS).argmax(-1)
    legacy = INPUT_IDS.argmax(-1)
    assert not np.array_equal(modern, legacy)
    assert not np.array_equal((INPUT_IDS_LEGACY == 2).argmax(-1), INPUT_IDS_LEGACY.argmax(-1))


def test_parity_with_padding_mask(tmp_path):
    model, folder = _torch_model(tmp_path, projection=False, hidden_act="quick_gelu", eos_token_id=EOS)
    mask = np.array([[1] * 8, [1] * 6 + [0] * 2], dtype=np.int64)
    _compare(model, folder, INPUT_IDS, projection=False, attention_mask=mask)


def test_sharded_checkpoint_and_auto_projection(tmp_path):
    model, folder = _torch_model(tmp_path, projection=True, hidden_act="gelu", eos_token_id=EOS,
                                 max_shard_size="20KB")
    assert os.path.isfile(os.path.join(folder, "model.safetensors.index.json"))
    _compare(model, folder, INPUT_IDS, projection=True)
    # Explicitly without projection: the projection weight is dropped, the rest still loads strictly.
    _, params = load_clip_text_model(folder, with_projection=False)
    assert "text_projection" not in params


def test_param_names_follow_former_flax_clip(tmp_path):
    _, folder = _torch_model(tmp_path, projection=True, hidden_act="gelu", eos_token_id=EOS)
    _, params = load_clip_text_model(folder)
    tm = params["text_model"]
    assert tm["embeddings"]["token_embedding"]["embedding"].shape == (VOCAB, 32)
    assert tm["encoder"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"].shape == (32, 32)
    assert set(tm["encoder"]["layers"]["2"]) == {"self_attn", "layer_norm1", "mlp", "layer_norm2"}
    assert set(tm["final_layer_norm"]) == {"scale", "bias"}
    assert set(params["text_projection"]) == {"kernel"}


def test_low_precision_compute(tmp_path):
    model, folder = _torch_model(tmp_path, projection=False, hidden_act="quick_gelu", eos_token_id=EOS)
    config, params = load_clip_text_model(folder, dtype=jnp.bfloat16)
    model_bf16 = CLIPTextModel(config, dtype=jnp.bfloat16)
    out = model_bf16.apply({"params": params}, jnp.asarray(INPUT_IDS, jnp.int32))
    assert out.last_hidden_state.dtype == jnp.bfloat16
    with torch.no_grad():
        ref = model(torch.tensor(INPUT_IDS)).last_hidden_state
    assert _max_diff(ref, out.last_hidden_state) < 0.1  # bf16 has ~3 significant digits


# ----------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------


def _edit_weights(folder: str, edit) -> None:
    path = os.path.join(folder, "model.safetensors")
    # transformers writes "text_model."-prefixed keys up to 5.x's early releases and bare ones later; the
    # loader reads both, and the edits below use the bare names.
    sd = {k.removeprefix("text_model."): v for k, v in load_file(path).items()}
    edit(sd)
    save_file(sd, path, metadata={"format": "pt"})


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda sd: sd.pop("encoder.layers.1.mlp.fc2.bias"), r"missing .*layers/1/mlp/fc2/bias"),
        (lambda sd: sd.update({"encoder.layers.0.extra.weight": np.zeros(3, np.float32)}),
         r"unexpected .*encoder\.layers\.0\.extra\.weight"),
        (lambda sd: sd.update({"final_layer_norm.weight": np.zeros(31, np.float32)}),
         r"mis-shaped.*final_layer_norm\.weight"),
    ],
    ids=["missing", "unexpected", "misshaped"],
)
def test_bad_weights_raise(tmp_path, edit, match):
    _, folder = _torch_model(tmp_path, projection=False, hidden_act="quick_gelu", eos_token_id=EOS)
    _edit_weights(folder, edit)
    with pytest.raises(ConversionError, match=f"(?s){match}"):
        load_clip_text_model(folder)


def test_config_from_dict_ignores_unknown_keys():
    d = {"hidden_size": 64, "num_attention_heads": 8, "foo": 1, "architectures": ["X"]}
    cfg = CLIPTextConfig.from_dict(d)
    assert cfg.hidden_size == 64 and cfg.architectures == ("X",)


@pytest.mark.parametrize(
    "d, match",
    [
        ({"hidden_act": "relu"}, "Unsupported CLIP hidden_act 'relu'"),
        ({"hidden_size": 30, "num_attention_heads": 4}, "not divisible"),
        ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive integer"),
        ({"text_config": {}, "vision_config": {}}, "full CLIPModel config"),
    ],
)
def test_unsupported_config_raises(d, match):
    with pytest.raises(ValueError, match=match):
        CLIPTextConfig.from_dict(d)


def test_missing_files_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_clip_text_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 32, "num_attention_heads": 4}))
    with pytest.raises(FileNotFoundError, match="model.fp16.safetensors"):
        load_clip_text_model(tmp_path, variant="fp16")


def test_too_long_sequence_raises(tmp_path):
    _, folder = _torch_model(tmp_path, projection=False, hidden_act="quick_gelu", eos_token_id=EOS)
    config, params = load_clip_text_model(folder)
    with pytest.raises(ValueError, match="exceeds max_position_embeddings 16"):
        CLIPTextModel(config).apply({"params": params}, jnp.zeros((1, 17), jnp.int32))
