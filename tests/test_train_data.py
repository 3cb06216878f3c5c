"""Training from real data, end to end: prepare → train (Grain streaming) → ΔW that loads into diffusers and
samples with ``perflow-jax sample --delta``; kill-and-resume sees the same batches; online encoding; EMA warm-up.

The tiny SD1/SDXL teachers are random diffusers models (tests/support/tiny_sd.py) at 16x16 pixels (8x8 latents);
the data are 24 captioned images in a folder plus a webdataset .tar of 12 with one corrupt image.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
import torch

from perflow_jax import cli
from perflow_jax.models.adapter import UNetCondition
from perflow_jax.training import prepare as prep
from perflow_jax.training import train as train_lib
from perflow_jax.training.data import Stream
from tests.support.tiny_data import write_image_folder, write_webdataset
from tests.support.tiny_sd import make_tiny_pipeline

RES = 16
CONFIGS = os.path.join(os.path.dirname(__file__), os.pardir, "configs")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_data")
    write_image_folder(str(root / "images"), 24)
    write_webdataset(str(root / "shard.tar"), 12, corrupt=(5,))
    return root


def _prepared(root, family: str, storage: str = "bfloat16"):
    model = root / family
    if not model.exists():
        make_tiny_pipeline(str(model), family)
    out = root / f"prep_{family}_{storage}"
    if not out.exists():
        report = prep.prepare(str(model), [str(root / "images"), str(root / "shard.tar")], str(out), resolution=RES,
                              batch_size=12, storage_dtype=storage, progress=False)
        assert report["records"] == 35 and report["skipped"] == 1
    return model, out


def _overrides(model, data, out, *extra):
    """The recipe's config, shrunk to the tiny model: 10 steps of batch 4, one teacher step per window."""
    return [f"output_dir={out}", f"model.unet_config={model}/unet/config.json", "model.dtype=float32",
            f"teacher.weights={model}/unet/diffusion_pytorch_model.safetensors", f"data.path={data}",
            "data.workers=2", "train.steps=10", "train.batch_size=4", "train.grad_accum=1", "train.warmup_steps=2",
            "train.checkpoint_every=3", "train.log_every=5", "train.progress=false", "solver.num_steps=1", *extra]


def _check_delta_in_diffusers(model, out, params=None):
    """ΔW keys and shapes are exactly diffusers' UNet state dict; teacher + ΔW loads strictly; with `params`
    (the exported EMA weights) the PyTorch UNet matches our student on one input."""
    from diffusers import UNet2DConditionModel
    from safetensors.numpy import load_file

    unet = UNet2DConditionModel.from_pretrained(str(model / "unet")).eval()
    sd = unet.state_dict()
    delta = load_file(str(out / "delta_weights.safetensors"))
    assert set(delta) == set(sd)
    assert all(delta[k].shape == tuple(sd[k].shape) for k in sd)
    assert max(np.abs(v).max() for v in delta.values()) > 0  # training moved the weights
    missing, unexpected = unet.load_state_dict({k: sd[k] + torch.from_numpy(delta[k]) for k in sd}, strict=True)
    assert not missing and not unexpected
    assert os.path.isfile(out / "scheduler_config.json")
    return unet


def _sample_cli(model, out, tmp_path):
    images = tmp_path / "samples"
    assert cli.main(["--no-cache", "sample", "--model", str(model), "--delta", str(out), "--prompt", "a red cat",
                     "--num-images", "1", "--steps", "4", "--height", str(RES), "--width", str(RES), "--out",
                     str(images)]) == 0
    assert any(f.endswith(".png") and f != "grid.png" for f in os.listdir(images))


@pytest.mark.slow(reason="prepare, then three 10-step runs of the tiny SD1 UNet (straight, killed, resumed)")
def test_sd15_prepare_train_resume_export_runs_in_diffusers(root, tmp_path):
    model, data = _prepared(root, "sd15")
    cfg_path = os.path.join(CONFIGS, "sd15_perflow.yaml")

    def run(out, callback=None):
        cfg = train_lib.load_config(cfg_path, _overrides(model, data, out))
        seen = {}
        res = train_lib.train(cfg, callback=callback, batch_callback=lambda s, ids: seen.__setitem__(s, ids.tolist()))
        return res, seen

    straight, seen_straight = run(tmp_path / "straight")
    assert sorted(seen_straight) == list(range(1, 11))
    ids = [i for s in range(1, 11) for i in seen_straight[s]]
    assert all(i % prep.ID_STRIDE < 24 or i // prep.ID_STRIDE == 1 for i in ids)  # real record ids
    epoch = 35 // 4 * 4  # first epoch: 8 batches of distinct records
    assert len(set(ids[:epoch])) == epoch

    kill_at = int(np.random.default_rng().integers(2, 10))  # a random step; checkpoints every 3 steps

    def kill(step, loss):
        if step == kill_at:
            raise KeyboardInterrupt(f"simulated kill at step {kill_at}")

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed", kill)
    resumed, seen_resumed = run(tmp_path / "killed")
    assert resumed["resumed_from"] == (kill_at - 1) // 3 * 3, kill_at  # the kill comes before step k is saved
    assert {s: seen_straight[s] for s in seen_resumed} == seen_resumed, f"killed at {kill_at}"
    for a, b in zip(jax.tree_util.tree_leaves(straight["params"]), jax.tree_util.tree_leaves(resumed["params"]),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"killed at {kill_at}")

    # The exported EMA weights run in PyTorch: diffusers' UNet with teacher + ΔW equals our student.
    out = tmp_path / "straight"
    unet = _check_delta_in_diffusers(model, out)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    text = rng.standard_normal((2, 16, 32)).astype(np.float32)
    ucfg = train_lib.unet_config(train_lib.load_config(cfg_path, _overrides(model, data, out)))
    apply = train_lib.make_apply_fn(ucfg, np.float32)

    ours = np.asarray(apply(straight["params"], x, np.asarray([500.0, 20.0], np.float32),
                            UNetCondition(encoder_hidden_states=text)))
    with torch.no_grad():
        theirs = unet(torch.from_numpy(x), torch.tensor([500.0, 20.0]), torch.from_numpy(text)).sample.numpy()
    err = np.abs(ours - theirs).max()
    print(f"student (JAX, EMA) vs diffusers UNet + ΔW: max abs {err:.2e}")
    assert err <= 1e-4  # float32 UNet parity of this suite (tests/test_unet.py) on O(1) outputs
    _sample_cli(model, out, tmp_path)


@pytest.mark.slow(reason="prepare and a 10-step run of the tiny SDXL UNet through the CLI")
def test_sdxl_prepare_train_export_runs_in_diffusers(root, tmp_path, capsys):
    model, data = _prepared(root, "sdxl")
    out = tmp_path / "xl"
    assert cli.main(["--no-cache", "train", "--config", os.path.join(CONFIGS, "sdxl_perflow.yaml"),
                     *_overrides(model, data, out)]) == 0
    assert '"final_loss"' in capsys.readouterr().out
    _check_delta_in_diffusers(model, out)
    _sample_cli(model, out, tmp_path)


def test_online_stream_equals_prepared_stream(root, tmp_path):
    """data.kind=online encodes the same records the prepared folder holds: same ids, same latents (1e-5: float32
    encoders on both sides; the latent noise is keyed by the step alone)."""
    model, _ = _prepared(root, "sd15")
    folder = str(root / "images")
    data = tmp_path / "prep_folder"
    prep.prepare(str(model), [folder], str(data), resolution=RES, storage_dtype="float32", progress=False)
    base = _overrides(model, data, tmp_path / "unused", "data.workers=1")
    prepared = train_lib.load_config(os.path.join(CONFIGS, "sd15_perflow.yaml"), [*base, "data.kind=prepared"])
    online = train_lib.load_config(os.path.join(CONFIGS, "sd15_perflow.yaml"),
                                   [*base, "data.kind=online", f"data.path={folder}", f"data.model={model}",
                                    f"data.image_size={RES}"])
    from perflow_jax import sharding

    mesh = sharding.data_mesh()
    a, b = Stream(prepared, mesh), Stream(online, mesh)
    np.testing.assert_allclose(np.asarray(a.null_cond.encoder_hidden_states),
                               np.asarray(b.null_cond.encoder_hidden_states), atol=1e-5, rtol=0)
    for step in range(3):
        (xa, ca, ia), (xb, cb, ib) = a.next(step), b.next(step)
        np.testing.assert_array_equal(ia, ib)
        assert xa.shape == (1, 4, 4, 8, 8)
        np.testing.assert_allclose(np.asarray(xa), np.asarray(xb), atol=1e-5, rtol=0)
        np.testing.assert_allclose(np.asarray(ca.encoder_hidden_states), np.asarray(cb.encoder_hidden_states),
                                   atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="data.model"):
        Stream(train_lib.load_config(None, [*base[:1], "data.kind=online", f"data.path={folder}"]), mesh)
    with pytest.raises(ValueError, match="not a prepared data set"):
        Stream(train_lib.load_config(None, [*base[:1], "data.kind=prepared", f"data.path={folder}"]), mesh)


def test_ema_warmup_is_the_reference_schedule():
    """min((1 + s) / (10 + s), decay) at 0-based step s (0 at s = 0) = diffusers' EMAModel.get_decay(s + 1),
    the reference's EMA."""
    from diffusers.training_utils import EMAModel

    ema = EMAModel(torch.nn.Linear(1, 1).parameters(), decay=0.9999, use_ema_warmup=False)
    for s in (0, 1, 5, 100, 5000, 200000):
        ours = float(train_lib.ema_decay_at(np.int32(s), 0.9999, True))
        assert ours == pytest.approx(ema.get_decay(s + 1), rel=1e-6), s
        assert ours == pytest.approx(min((1 + s) / (10 + s), 0.9999) if s else 0.0, rel=1e-6)
    assert float(train_lib.ema_decay_at(np.int32(3), 0.999, False)) == pytest.approx(0.999)
