"""The built-in digits model: shipped weights load, both pipelines produce (B, H, W) uint8 images, and every
registered scheduler runs on it."""

from __future__ import annotations

import numpy as np
import pytest

from perflow_jax import schedulers
from perflow_jax.pipelines import digits


@pytest.fixture(scope="module")
def perflow_pipe():
    return digits.DigitsPipeline.from_builtin("perflow")


def test_perflow_pipeline_images(perflow_pipe, tmp_path):
    images = perflow_pipe([0, 3, 7, 7], num_inference_steps=4, seed=0)
    assert images.shape == (4, digits.IMAGE_SIZE, digits.IMAGE_SIZE) and images.dtype == np.uint8
    again = perflow_pipe([0, 3, 7, 7], num_inference_steps=4, seed=0)
    np.testing.assert_array_equal(images, again)  # seeded
    other = perflow_pipe([0, 3, 7, 7], num_inference_steps=4, seed=1, guidance_scale=2.0)  # same compiled fn
    assert not np.array_equal(images, other)
    assert images.std() > 10  # not a blank image
    path = digits.save_grid(images, tmp_path / "grid.png")
    from PIL import Image

    assert Image.open(path).size[0] > 0


def test_teacher_pipeline_and_errors():
    pipe = digits.DigitsPipeline.from_builtin("teacher")
    images = pipe([1, 2], num_inference_steps=2)
    assert images.shape == (2, 8, 8) and images.dtype == np.uint8
    with pytest.raises(ValueError, match="digits 0-9"):
        pipe([11])
    with pytest.raises(ValueError, match="which"):
        digits.DigitsPipeline.from_builtin("student")
    guided = digits.DigitsPipeline.from_builtin("guided")  # CFG-fixed: sampled without guidance by default
    assert guided.default_guidance == 1.0 and guided.scheduler_config["num_time_windows"] == 4
    assert guided([3, 5], num_inference_steps=4).shape == (2, 8, 8)
    with pytest.raises(ValueError, match="uint8"):
        digits.save_grid(np.zeros((2, 8, 8), np.float32), "/tmp/x.png")


@pytest.fixture(scope="module")
def teacher_pipe():
    return digits.DigitsPipeline.from_builtin("teacher")


@pytest.mark.parametrize("scheduler", schedulers.available())
def test_every_scheduler_runs_on_the_builtin_model(perflow_pipe, teacher_pipe, scheduler):
    """Every registered scheduler (multistep DPM++ 2M and UniPC included: the pipeline sizes their history by
    the sample shape) samples the built-in model in 3 steps with guidance and gives finite, non-blank digits:
    PeRFlow on the PeRFlow student, the others on the ε-prediction teacher."""
    pipe = perflow_pipe if scheduler == "perflow" else teacher_pipe
    steps = 4 if scheduler == "perflow" else 3  # the shipped student has 4 windows: at least one step each
    x = pipe.sample_float([0, 3, 7], num_inference_steps=steps, guidance_scale=2.0, scheduler=scheduler)
    assert x.shape == (3, 1, digits.IMAGE_SIZE, digits.IMAGE_SIZE)
    assert np.all(np.isfinite(x)) and x.std() > 0.05
