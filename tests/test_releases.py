"""The released PeRFlow layouts, loaded by path: a ΔW UNet folder holding only variant files (as
``hansyan/perflow-sd15-delta-weights``: ``diffusion_pytorch_model.v0-1.safetensors``), the merged pipelines
(a whole pipeline whose UNet is W_base + ΔW, shipped with a DEIS scheduler config), and the model card's
``prediction_type="epsilon"``. Every layout is written by PyTorch diffusers ``save_pretrained``.

Tolerances: ΔW and merged weights are compared with PyTorch computing the same float32 sums and differences
(W + ΔW, merged − base, other + (merged − base)), in the same order, so they agree to ≤ 1e-6 (in practice to
the last bit); the ΔW read from a file is a re-layout and must be exact.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from flax import traverse_util

from perflow_jax import delta as delta_lib
from perflow_jax import schedulers
from perflow_jax.cli import main as cli_main
from perflow_jax.models.components import load_pipeline_components
from perflow_jax.models.convert import torch_to_flax
from perflow_jax.models.unet import load_unet
from perflow_jax.pipelines import load_components
from perflow_jax.pipelines.defaults import perflow_config_dict
from perflow_jax.pipelines.stable_diffusion import make_scheduler
from tests.support.tiny_sd import _unet, make_tiny_pipeline

TOL = 1e-6  # float32 sums/differences done in the same order on both sides


def _delta_sd(unet: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: 0.01 * torch.randn(v.shape, generator=g) for k, v in unet.state_dict().items()}


def _save_delta_unet(folder, delta: dict[str, torch.Tensor], variant: str) -> None:
    """ΔW as a UNet folder, the way the release was made: a UNet holding ΔW, save_pretrained(variant=...)."""
    unet = _unet("sd15", 0)
    unet.load_state_dict(delta)
    unet.save_pretrained(folder, variant=variant)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A tiny SD1.5 base pipeline, another model of the family, ΔW folders with one and with two variants, and
    a merged pipeline (base + ΔW) carrying a DEIS scheduler config, as the released pipelines do."""
    from diffusers import DEISMultistepScheduler

    root = tmp_path_factory.mktemp("release")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    base = make_tiny_pipeline(str(root / "base"), "sd15", seed=0)
    make_tiny_pipeline(str(root / "other"), "sd15", seed=7)
    base_sd = {k: v.clone() for k, v in base.unet.state_dict().items()}
    d1, d0 = _delta_sd(base.unet, 1), _delta_sd(base.unet, 2)
    _save_delta_unet(root / "delta-single", d1, "v0-1")
    _save_delta_unet(root / "delta-multi", d0, "v0-0")
    _save_delta_unet(root / "delta-multi", d1, "v0-1")
    deis = DEISMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    merged = make_tiny_pipeline(str(root / "merged"), "sd15", seed=0, scheduler=deis)
    merged.unet.load_state_dict({k: base_sd[k] + d1[k] for k in base_sd})
    merged.save_pretrained(root / "merged")
    torch.set_num_threads(threads)
    return root, base_sd, {k: v.numpy() for k, v in d1.items()}, {k: v.numpy() for k, v in d0.items()}


def _flat(tree) -> dict:
    return traverse_util.flatten_dict(dict(tree))


def _max_diff(got, want_torch_sd: dict[str, np.ndarray], like) -> float:
    want = _flat(torch_to_flax(want_torch_sd, like))
    got = _flat(got)
    assert set(got) == set(want)
    return max(float(np.max(np.abs(np.asarray(got[k], np.float32) - want[k]))) for k in want)


def test_single_variant_folder_is_picked(release) -> None:
    root, base_sd, d1, _ = release
    assert sorted(p.name for p in (root / "delta-single").iterdir()) == [
        "config.json", "diffusion_pytorch_model.v0-1.safetensors"]
    _, params = load_unet(root / "base" / "unet")
    dw = delta_lib.load_delta(root / "delta-single", params)
    assert _max_diff(dw, d1, params) == 0.0  # a re-layout
    comps = load_components(str(root / "base"), delta=str(root / "delta-single"))
    diff = _max_diff(comps.unet_params, {k: (v + torch.from_numpy(d1[k])).numpy() for k, v in base_sd.items()},
                     params)
    print(f"base + ΔW (single variant picked) vs PyTorch: max abs diff {diff:.1e}")
    assert diff <= TOL


def test_several_variants_refused_then_chosen(release, tmp_path, capsys) -> None:
    root, _, d1, d0 = release
    _, params = load_unet(root / "base" / "unet")
    with pytest.raises(FileNotFoundError, match=r"holds the ΔW variants \['v0-0', 'v0-1'\].*--delta-variant"):
        delta_lib.load_delta(root / "delta-multi", params)
    assert _max_diff(delta_lib.load_delta(root / "delta-multi", params, variant="v0-0"), d0, params) == 0.0
    assert _max_diff(delta_lib.load_delta(root / "delta-multi", params, variant="v0-1"), d1, params) == 0.0
    # The CLI: one line naming the variants, then --delta-variant works.
    args = ["--no-cache", "convert", str(root / "base"), str(tmp_path / "flax"), "--delta", str(root / "delta-multi")]
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "converting" not in err  # refused before any work
    assert len(err.splitlines()) == 1 and "['v0-0', 'v0-1']" in err and "--delta-variant" in err
    assert cli_main(args + ["--delta-variant", "v0-0"]) == 0
    _, merged = load_unet(tmp_path / "flax" / "unet")
    _, base_params = load_unet(root / "base" / "unet")
    assert _max_diff(delta_lib.extract(merged, base_params), d0, params) <= TOL
    with pytest.raises(FileNotFoundError, match=r"diffusion_pytorch_model\.v9\.safetensors"):
        delta_lib.load_delta(root / "delta-multi", params, variant="v9")


def test_merged_weights_give_delta(release) -> None:
    """ΔW = merged − base against PyTorch, applied to another model of the family (the reference's
    ``load_delta_weights_into_unet`` on a merged folder); without --delta-base the model is the base."""
    root, base_sd, d1, _ = release
    from diffusers import UNet2DConditionModel

    merged_sd = UNet2DConditionModel.from_pretrained(root / "merged" / "unet").state_dict()
    other_sd = UNet2DConditionModel.from_pretrained(root / "other" / "unet").state_dict()
    _, base_params = load_unet(root / "base" / "unet")
    dw = delta_lib.load_merged_delta(root / "merged", base_params)  # the pipeline folder: its unet/ is read
    want_dw = {k: (merged_sd[k] - base_sd[k]).numpy() for k in base_sd}
    diff_dw = _max_diff(dw, want_dw, base_params)
    comps = load_components(str(root / "other"), delta=str(root / "merged" / "unet"), delta_is_merged=True,
                            delta_base=str(root / "base"))
    want = {k: (other_sd[k] + (merged_sd[k] - base_sd[k])).numpy() for k in other_sd}
    diff_other = _max_diff(comps.unet_params, want, base_params)
    same = delta_lib.merge(base_params, delta_lib.read_delta(root / "merged", base_params, is_merged=True))
    diff_same = _max_diff(same, {k: v.numpy() for k, v in merged_sd.items()}, base_params)
    print(f"merged − base vs PyTorch {diff_dw:.1e}; other + (merged − base) {diff_other:.1e}; "
          f"base + (merged − base) vs merged {diff_same:.1e}")
    assert diff_dw <= TOL and diff_other <= TOL and diff_same <= TOL
    assert _max_diff(dw, d1, base_params) <= 1e-6  # (base + ΔW) − base recovers ΔW up to float32 rounding
    # A merged folder read as ΔW would add whole weights: the flag is what says which it is.
    with pytest.raises(ValueError, match="only used with --delta-is-merged"):
        load_components(str(root / "other"), delta=str(root / "merged"), delta_base=str(root / "base"))
    with pytest.raises(ValueError, match="pass delta="):
        load_components(str(root / "other"), delta_is_merged=True)


@pytest.fixture(scope="module")
def merged_components(release):
    return load_pipeline_components(release[0] / "merged")


def test_released_pipeline_with_deis_config_uses_family_defaults(merged_components) -> None:
    comps = merged_components
    assert comps.scheduler_config["_class_name"] == "DEISMultistepScheduler"
    sc = comps.scheduler_config
    assert perflow_config_dict(comps) == {
        "_class_name": "PeRFlowScheduler", "num_train_timesteps": sc["num_train_timesteps"],
        "beta_start": sc["beta_start"], "beta_end": sc["beta_end"], "beta_schedule": sc["beta_schedule"],
        "trained_betas": None, "prediction_type": "diff_eps", "num_time_windows": 4}
    sched = make_scheduler(comps)
    assert sched.name == "perflow" and sched.config.prediction_type == "diff_eps"
    with pytest.raises(FileNotFoundError, match=r"No model folder of .* has weights of variant 'v0-fix' \(unet, vae"):
        load_pipeline_components(comps.path, variant="v0-fix")
    assert sched.config == schedulers.get("perflow", beta_start=0.00085, beta_end=0.012,
                                          beta_schedule="scaled_linear", prediction_type="diff_eps").config


def test_epsilon_is_perflows_old_name_for_diff_eps(merged_components) -> None:
    with pytest.warns(UserWarning, match="old name for 'diff_eps'") as record:
        old = schedulers.get("perflow", prediction_type="epsilon", num_time_windows=4)
    assert len(record) == 1 and "\n" not in str(record[0].message)
    new = schedulers.get("perflow", prediction_type="diff_eps", num_time_windows=4)
    assert old.config == new.config and old.config.to_dict()["prediction_type"] == "diff_eps"
    # The model card's call: PeRFlowScheduler.from_config(pipe.scheduler.config, prediction_type="epsilon").
    comps = merged_components
    with pytest.warns(UserWarning, match="old name"):
        assert make_scheduler(comps, "perflow", {"prediction_type": "epsilon"}).config == make_scheduler(comps).config
    x, out = np.linspace(-1, 1, 16, dtype=np.float32).reshape(1, 1, 4, 4), np.full((1, 1, 4, 4), 0.3, np.float32)
    s_old, s_new = old.set_timesteps(4), new.set_timesteps(4)
    assert np.array_equal(old.step(s_old, out, 1, x)[0], new.step(s_new, out, 1, x)[0])


def test_epsilon_alias_is_perflow_only() -> None:
    """Other schedulers keep ε's meaning, and PeRFlow's own names stay refused there."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in ("ddim", "euler", "dpmpp_2m"):
            assert schedulers.get(name, prediction_type="epsilon").config.prediction_type == "epsilon"
    for name in ("ddim", "euler"):
        with pytest.raises(ValueError, match="prediction_type 'diff_eps'"):
            schedulers.get(name, prediction_type="diff_eps")
    with pytest.raises(ValueError, match="prediction_type 'v_prediction'"):
        schedulers.get("perflow", prediction_type="v_prediction")
