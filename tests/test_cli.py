"""The `perflow-jax` command end to end: sample from a diffusers folder and from a single-file checkpoint with
a ΔW and a LoRA, convert to a diffusers folder, and one-line errors with exit status 2."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import save_file

from perflow_jax import delta as delta_lib
from perflow_jax.cli import main
from perflow_jax.io import MANIFEST
from perflow_jax.models.components import load_pipeline_components
from perflow_jax.pipelines import load_components
from tests.support.tiny_sd import make_tiny_pipeline
from tests.test_lora import write_kohya
from tests.test_single_file import write_ldm_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny SD1-style diffusers folder, the same model as one LDM single file, a kohya LoRA and a ΔW."""
    root = tmp_path_factory.mktemp("cli")
    torch.set_num_threads(1)
    pipe = make_tiny_pipeline(str(root / "sd"), "sd15")
    write_ldm_checkpoint(pipe, "sd15", str(root / "model.safetensors"))
    write_kohya(pipe, str(root / "lora.safetensors"), sgm=False)
    rng = np.random.default_rng(0)
    save_file({k: 0.01 * rng.standard_normal(v.shape).astype(np.float32) for k, v in pipe.unet.state_dict().items()},
              str(root / "delta_weights.safetensors"))
    return root


def test_sample_writes_pngs_and_grid(tiny, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    rc = main(["sample", "--model", str(tiny / "sd"), "--prompt", "a cat", "the dog", "--num-images", "2",
               "--batch-size", "2", "--steps", "4", "--height", "32", "--width", "32", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "compile" in printed and "run" in printed and "4 images" in printed
    names = sorted(os.listdir(out))
    assert names == [MANIFEST, "grid.png", "image_0000.png", "image_0001.png", "image_0002.png", "image_0003.png"]
    img = np.asarray(Image.open(out / "image_0000.png"))
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8 and img.std() > 0
    assert np.asarray(Image.open(out / "grid.png")).shape[:2] == (2 + 2 * 34, 2 + 2 * 34)


def test_single_file_delta_lora_convert_and_sample(tiny, tmp_path, capsys) -> None:
    """`convert --to diffusers` of single file + ΔW + LoRA equals load_components; sample runs from the file."""
    lora = f"{tiny / 'lora.safetensors'}:0.5"
    rc = main(["convert", str(tiny / "model.safetensors"), str(tmp_path / "merged"), "--to", "diffusers",
               "--base", str(tiny / "sd"), "--delta", str(tiny), "--lora", lora])
    assert rc == 0, capsys.readouterr().err
    written = load_pipeline_components(str(tmp_path / "merged"))
    want = load_components(str(tiny / "model.safetensors"), base=str(tiny / "sd"), delta=str(tiny),
                           loras=[(str(tiny / "lora.safetensors"), 0.5)])
    got_sd, want_sd = (delta_lib.torch_unet_state_dict(c.unet_params) for c in (written, want))
    assert set(got_sd) == set(want_sd) and all(np.array_equal(got_sd[k], want_sd[k]) for k in want_sd)
    base_sd = delta_lib.torch_unet_state_dict(load_pipeline_components(str(tiny / "sd")).unet_params)
    assert max(float(np.abs(want_sd[k] - base_sd[k]).max()) for k in base_sd) > 1e-3  # ΔW and LoRA did apply

    rc = main(["sample", "--model", str(tiny / "model.safetensors"), "--base", str(tiny / "sd"), "--lora", lora,
               "--prompt", "a cat", "--num-images", "2", "--steps", "4", "--height", "32", "--width", "32",
               "--out", str(tmp_path / "o")])  # same shapes as the test above: the compiled program is reused
    assert rc == 0 and os.path.isfile(tmp_path / "o" / "grid.png")


@pytest.mark.parametrize("argv,message", [
    (["sample", "--model", "{tiny}/model.safetensors", "--prompt", "x", "--out", "{tmp}"], "base"),
    (["sample", "--model", "{tiny}/sd", "--prompt", "x", "--height", "31", "--out", "{tmp}"], "multiple of"),
    (["sample", "--model", "{tiny}/sd", "--prompt", "x", "--lora", "{tiny}/nope.safetensors", "--out", "{tmp}"],
     "nope.safetensors"),
    (["convert", "{tiny}/model.safetensors", "{tmp}/x", "--to", "diffusers"], "base"),
])
def test_errors_are_one_line_exit_2(tiny, tmp_path, capsys, argv, message) -> None:
    argv = [a.format(tiny=tiny, tmp=tmp_path / "o") for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("perflow-jax") and message in err and "\n" not in err


def test_default_batches_do_not_change_the_images(tiny, tmp_path, capsys, monkeypatch) -> None:
    """Without --batch-size, a run split into batches by the memory estimate gives the images of one call:
    image i keeps its index in the run (first_index), so its noise does not depend on the split."""
    from perflow_jax.pipelines import stable_diffusion as sd

    argv = ["sample", "--model", str(tiny / "sd"), "--prompt", "a cat", "--num-images", "2", "--steps", "4",
            "--height", "32", "--width", "32", "--seed", "3"]
    assert main([*argv, "--out", str(tmp_path / "one")]) == 0
    assert " batches of " not in capsys.readouterr().out
    monkeypatch.setattr(sd, "DEFAULT_BATCH_MEMORY", 1)  # the estimate now fits one image per call
    assert main([*argv, "--out", str(tmp_path / "split")]) == 0
    assert "in 2 batches of up to 1" in capsys.readouterr().out
    for name in ("image_0000.png", "image_0001.png"):
        a, b = (np.asarray(Image.open(tmp_path / d / name), np.int16) for d in ("one", "split"))
        assert np.abs(a - b).max() <= 1, name  # batch 1 vs 2 programs: float rounding at most


def test_digits_twice_into_the_same_out(tmp_path, capsys) -> None:
    """`bash scripts/run.sh` twice in a row: the second run replaces the first run's images; a smaller rerun
    leaves none of them behind; the user's own files are never touched."""
    out = tmp_path / "digits"
    argv = ["sample", "--model", "digits", "--prompt", "0", "1", "--num-images", "2", "--steps", "4", "--out", str(out)]
    assert main(argv) == 0
    (out / "notes.txt").write_text("mine")
    first = {n: (out / n).read_bytes() for n in os.listdir(out) if n.endswith(".png")}
    assert main(argv) == 0
    assert {n: (out / n).read_bytes() for n in os.listdir(out) if n.endswith(".png")} == first
    assert main([*argv[:5], *argv[6:]]) == 0  # prompt "0" only: 2 images instead of 4
    assert sorted(os.listdir(out)) == [MANIFEST, "grid.png", "image_0000.png", "image_0001.png", "notes.txt"]
    assert (out / "notes.txt").read_text() == "mine"
    capsys.readouterr()
