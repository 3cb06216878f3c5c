"""`allow_pickle` reaches every model of a pipeline: UNet, VAE and both text encoders.

Each component's weights are re-saved as a PyTorch pickle under the name its library writes
(``diffusion_pytorch_model.bin`` for diffusers models, ``pytorch_model.bin`` for transformers' text encoders).
Without ``allow_pickle`` every such component is refused with the clear error; with ``allow_pickle=True`` the
whole pipeline loads (and converts) to exactly the params read from the original safetensors.
"""

from __future__ import annotations

import os
import re
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from flax import traverse_util  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from perflow_jax.models.components import convert_to_flax, load_pipeline_components  # noqa: E402
from perflow_jax.models.mismatch import ConversionError  # noqa: E402
from tests.support.tiny_sd import make_tiny_pipeline  # noqa: E402

MODELS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model",
          "text_encoder_2": "model"}
PICKLE_NAMES = {"diffusion_pytorch_model": "diffusion_pytorch_model.bin", "model": "pytorch_model.bin"}


def _pickle_component(root: str, name: str) -> str:
    """Replace `name`'s safetensors by the pickle its library would write; returns the pickle's path."""
    stem = MODELS[name]
    src = os.path.join(root, name, f"{stem}.safetensors")
    dst = os.path.join(root, name, PICKLE_NAMES[stem])
    torch.save(load_file(src), dst)
    os.remove(src)
    return dst


def _params(comps) -> dict[str, dict]:
    return {name: traverse_util.flatten_dict(getattr(comps, f"{name}_params")) for name in MODELS}


def _assert_same(got: dict[str, dict], want: dict[str, dict]) -> None:
    for name in MODELS:
        assert set(got[name]) == set(want[name]), name
        for k, v in want[name].items():
            np.testing.assert_array_equal(np.asarray(got[name][k]), np.asarray(v), err_msg=f"{name} {k}")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """An SDXL-style tiny pipeline (both text encoders), its params, and a copy with every model pickled."""
    base = str(tmp_path_factory.mktemp("sdxl"))
    make_tiny_pipeline(base, "sdxl")
    pickled = str(tmp_path_factory.mktemp("pickled") / "sdxl")
    shutil.copytree(base, pickled)
    for name in MODELS:
        _pickle_component(pickled, name)
    return base, pickled, _params(load_pipeline_components(base))


def test_allow_pickle_reaches_every_component(folders, tmp_path) -> None:
    _, pickled, want = folders
    with pytest.raises(ConversionError, match="allow_pickle=True"):
        load_pipeline_components(pickled)
    _assert_same(_params(load_pipeline_components(pickled, allow_pickle=True)), want)
    dst = tmp_path / "flax"
    info = convert_to_flax(pickled, dst, allow_pickle=True, progress=False)
    assert info["components"] == list(MODELS)
    _assert_same(_params(load_pipeline_components(dst)), want)


@pytest.mark.parametrize("name", list(MODELS))
def test_each_pickled_component_is_refused_by_default(folders, tmp_path, name) -> None:
    """Only `name` is a pickle: the default refuses it, naming its file; allow_pickle=True loads it."""
    base, _, want = folders
    root = str(tmp_path / "sdxl")
    shutil.copytree(base, root)
    path = _pickle_component(root, name)
    file = re.escape(os.path.join(name, os.path.basename(path)))
    with pytest.raises(ConversionError, match=f"(?s){file}.*allow_pickle=True"):
        load_pipeline_components(root)
    _assert_same(_params(load_pipeline_components(root, allow_pickle=True)), want)
