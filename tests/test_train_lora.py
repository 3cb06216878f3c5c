"""LoRA-PeRFlow: the exported LoRA read by our loader and by diffusers (load_lora_weights + fuse_lora) gives the
same UNet as the trainer's own merge, and ``train.lora_rank`` trains only the factors on the reference's
targets and exports them next to the ΔW.

Tolerance 1e-5 absolute on the weights: each side adds the float32 product up @ down (a rank-4 sum) to the same
float32 weight, in a different order of operations (PyTorch B @ A in torch layout vs. Flax down @ up).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import peft  # noqa: F401  (diffusers needs peft to load LoRAs; a test dependency)
import pytest
from flax import traverse_util

from perflow_jax import delta as delta_lib
from perflow_jax.cli import main
from perflow_jax.lora import load_lora, merge_loras
from perflow_jax.models.components import load_pipeline_components
from perflow_jax.models.unet import UNetConfig, init_unet_params
from perflow_jax.training import lora_factors
from perflow_jax.training import train as train_lib
from tests.support.tiny_sd import make_tiny_pipeline


def _random_factors(params, rank, seed):
    """LoRA factors with random (not zero) up, so the merge is a real change to every target."""
    lora = lora_factors.init_lora(params, rank, jax.random.key(seed))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda a: jnp.asarray(rng.standard_normal(a.shape) * 0.1, jnp.float32), lora)


def test_export_round_trip_with_diffusers(tmp_path):
    from diffusers import DiffusionPipeline

    folder = str(tmp_path / "sd15")
    make_tiny_pipeline(folder, "sd15")
    comps = load_pipeline_components(folder)
    lora = _random_factors(comps.unet_params, 4, 0)
    names = set(lora_factors.target_paths(comps.unet_params).values())
    # every kind of target the reference adapts is present in the tiny UNet
    for t in ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
              "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"):
        assert any(n == t or n.endswith("." + t) for n in names), t
    path = lora_factors.export(lora, str(tmp_path / "lora"))

    ours = merge_loras(comps, [(load_lora(path), 1.0)]).unet_params
    trainer = lora_factors.merge(comps.unet_params, lora)
    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.load_lora_weights(path)
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()
    want = {k: v.numpy() for k, v in pipe.unet.state_dict().items()}
    got = delta_lib.torch_unet_state_dict(ours)
    assert set(got) == set(want)
    diffs = {k: float(np.max(np.abs(got[k] - want[k]))) for k in want}
    changed = [k for k in want if not np.allclose(want[k], delta_lib.torch_unet_state_dict(comps.unet_params)[k])]
    assert len(changed) == len(names)  # diffusers adapted exactly the layers we did
    assert max(diffs.values()) <= 1e-5, max(diffs.items(), key=lambda kv: kv[1])
    print(f"LoRA export: diffusers fuse_lora vs our loader, max |diff| {max(diffs.values()):.1e} over {len(changed)} "
          f"adapted weights")
    flat_ours, flat_trainer = (traverse_util.flatten_dict(p) for p in (ours, trainer))
    for k in flat_ours:
        np.testing.assert_allclose(np.asarray(flat_trainer[k]), np.asarray(flat_ours[k]), rtol=0, atol=1e-5)

    # `perflow-jax sample --lora` reads the exported file (the loader above) and generates with it
    rc = main(["sample", "--model", folder, "--lora", path, "--prompt", "a cat", "--num-images", "1", "--steps", "4",
               "--height", "32", "--width", "32", "--out", str(tmp_path / "samples")])
    assert rc == 0 and os.path.isfile(tmp_path / "samples" / "image_0000.png")


TINY_ATTN = UNetConfig(sample_size=8, in_channels=1, out_channels=1,
                       down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(8, 16),
                       layers_per_block=1, norm_num_groups=4, cross_attention_dim=4, attention_head_dim=2)


@pytest.mark.parametrize("rank", [2])
def test_lora_training_trains_only_factors(tmp_path, rank):
    import json

    (tmp_path / "unet.json").write_text(json.dumps(TINY_ATTN.to_dict()))
    cfg = train_lib.load_config(None, [
        "model.kind=unet", f"model.unet_config={tmp_path / 'unet.json'}", f"output_dir={tmp_path / 'run'}",
        "teacher.weights=x", "perflow.num_time_windows=2", "perflow.prediction_type=velocity", "solver.num_steps=2",
        "train.steps=3", "train.batch_size=4", "train.learning_rate=1e-2", "train.warmup_steps=0",
        "train.ema_decay=0", "train.log_every=1", "train.progress=false", "data.kind=npz", "data.path=unused",
        f"train.lora_rank={rank}", "train.remat=full"])
    rng = np.random.default_rng(0)
    ds = train_lib.ArrayDataset(np.tanh(rng.standard_normal((8, 1, 8, 8))).astype(np.float32),
                                {"encoder_hidden_states": rng.standard_normal((8, 3, 4)).astype(np.float32)},
                                {"encoder_hidden_states": np.zeros((3, 4), np.float32)})
    teacher = init_unet_params(TINY_ATTN, jax.random.key(0))
    res = train_lib.train(cfg, ds, teacher_params=teacher)
    factors = traverse_util.flatten_dict(res["params"])
    assert {p[-1] for p in factors} == {"down", "up"}
    assert {p[:-1] for p in factors} == set(lora_factors.target_paths(teacher))
    assert all(a.shape[-1 if p[-1] == "down" else 0] == rank for p, a in factors.items())
    assert any(np.abs(np.asarray(a)).max() > 0 for p, a in factors.items() if p[-1] == "up")  # it trained
    # ΔW is the merged student minus the teacher: nonzero only on the adapted kernels
    delta = delta_lib.load_delta(res["delta_path"], teacher)
    adapted = {p + ("kernel",) for p in lora_factors.target_paths(teacher)}
    for path, d in traverse_util.flatten_dict(delta).items():
        if path not in adapted:
            assert not np.any(np.asarray(d)), path
    lora = load_lora(res["lora_path"])
    assert len(lora.modules) == len(adapted) and all(m.rank == rank for m in lora.modules.values())
