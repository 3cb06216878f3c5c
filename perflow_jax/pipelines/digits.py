"""The built-in digits model: a tiny class-conditional pixel-space UNet on scikit-learn's 8×8 digits.

It is the package's embedded default, small enough to train and run on a laptop CPU: the teacher is an
ε-prediction diffusion model and the PeRFlow student is a ΔW over it, both shipped under
``perflow_jax/assets/digits/``. The "prompt" is a class label 0–9; label 10 is the null class used for
classifier-free guidance. The UNet's cross-attention context is a constant zero token (the class enters
through the class embedding), so the model is our ordinary :class:`UNet2DConditionModel`, called through
the one model adapter (:mod:`perflow_jax.models.adapter`) with a class-label condition.

    pipe = DigitsPipeline.from_builtin("perflow")
    images = pipe([7] * 8, num_inference_steps=4)     # (8, 8, 8) uint8
    save_grid(images, "out/sevens.png")
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from perflow_jax import sampling, schedulers, values
from perflow_jax.images import make_grid, save_png
from perflow_jax.models import adapter
from perflow_jax.models.adapter import UNetCondition
from perflow_jax.models.unet import UNet2DConditionModel, UNetConfig

NUM_CLASSES = 10
NULL_CLASS = 10
IMAGE_SIZE = 8
CONTEXT_DIM = 8
ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "digits")
# The shipped students' files in ASSETS: ΔW and scheduler config (written by scripts/train_digits.py ship).
STUDENT_ASSETS = {"perflow": ("perflow_delta.safetensors", "scheduler_config.json"),
                  "guided": ("guided_delta.safetensors", "guided_scheduler_config.json")}
DIGITS_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "digits.npz")

UNET_CONFIG = UNetConfig(
    sample_size=IMAGE_SIZE,
    in_channels=1,
    out_channels=1,
    down_block_types=("DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D"),
    block_out_channels=(16, 32),
    layers_per_block=1,
    norm_num_groups=8,
    cross_attention_dim=CONTEXT_DIM,
    attention_head_dim=4,
    num_class_embeds=NUM_CLASSES + 1,
)

# Images per compiled call when the caller gives no batch size (the CLI's default --batch-size): XLA counts
# about 84 KiB of float32 activations per image with classifier-free guidance (CPU, 4 PeRFlow steps), so a batch
# of 16384 takes about 1.3 GiB. Larger runs go in batches of this size.
DEFAULT_MAX_BATCH = 16384

# The teacher's noise schedule: Stable Diffusion's (scaled_linear; the PeRFlow defaults, so the exported
# scheduler_config.json is the PyTorch pipeline's usual one). ᾱ_T ≈ 0.0047.
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


# ----------------------------------------------------------------------------------------------------------
# Data and model function
# ----------------------------------------------------------------------------------------------------------


def load_digits_data(split: str = "train", seed: int = 0, holdout: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """The 8×8 digits (scikit-learn's copy of the UCI set, shipped as ``pipelines/assets/digits.npz`` so that no
    scikit-learn is needed) as ((N, 1, 8, 8) float32 in [-1, 1], (N,) int32 labels).

    A fixed stratified split keeps `holdout` images out of training ("test") for evaluation; the default split
    (seed 0, 400 held out) is stored in the file, any other one needs scikit-learn.
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}.")
    with np.load(DIGITS_DATA) as z:
        x = (z["images"].astype(np.float32) / 8.0 - 1.0)[:, None]
        y = z["target"].astype(np.int32)
        stored = {"train": z["train"], "test": z["test"]}
    if split == "all":
        return x, y
    if (seed, holdout) == (0, 400):
        idx = stored[split]
        return x[idx], y[idx]
    try:
        from sklearn.model_selection import train_test_split
    except ImportError as e:
        raise ValueError(f"A digits split other than the shipped one (seed=0, holdout=400) needs scikit-learn "
                         f"(pip install scikit-learn); got seed={seed}, holdout={holdout}.") from e
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=holdout, random_state=seed, stratify=y)
    return (x_tr, y_tr) if split == "train" else (x_te, y_te)


UNET = UNet2DConditionModel(UNET_CONFIG)


def condition(labels: jax.typing.ArrayLike) -> UNetCondition:
    """The UNet condition for class `labels` (B,): no text, so the adapter feeds one zero context token."""
    return UNetCondition(class_labels=jnp.asarray(labels))


def model_fn(params: Any, x: jax.Array, timesteps: jax.Array, labels: jax.Array) -> jax.Array:
    """The digits UNet at class `labels`, float32 out (:func:`perflow_jax.models.adapter.unet_apply`)."""
    return adapter.unet_apply(UNET, params, x, timesteps, condition(labels))


# ----------------------------------------------------------------------------------------------------------
# Pipeline
# ----------------------------------------------------------------------------------------------------------


def load_unet_weights(path: str) -> dict:
    """Full UNet weights from PyTorch-layout safetensors (they read exactly like a ΔW file)."""
    from perflow_jax.delta import load_delta
    from perflow_jax.models.unet import unet_param_shapes

    return load_delta(path, unet_param_shapes(UNET_CONFIG))


class DigitsPipeline:
    """Class-conditional digit generation with the teacher or the PeRFlow student (one jit per shape)."""

    def __init__(self, params: Any, scheduler_config: dict[str, Any], default_scheduler: str = "perflow",
                 default_guidance: float = 1.0):
        self.params = params
        self.scheduler_config = dict(scheduler_config)
        self.default_scheduler = default_scheduler
        self.default_guidance = values.check_float("default_guidance", default_guidance, min_value=0.0)
        self._jitted: dict[tuple, Any] = {}

    @classmethod
    def from_builtin(cls, which: str = "perflow", assets: str = ASSETS) -> DigitsPipeline:
        """Load the shipped weights: "perflow" (the default student: teacher + ΔW merged), "guided" (the
        CFG-fixed student, distilled from the teacher at guidance w and sampled without CFG) or "teacher"."""
        from perflow_jax.delta import load_delta, merge

        if which not in ("perflow", "guided", "teacher"):
            raise ValueError(f"which must be 'perflow', 'guided' or 'teacher', got {which!r}.")
        teacher = load_unet_weights(os.path.join(assets, "teacher.safetensors"))
        with open(os.path.join(assets, "model_index.json"), encoding="utf-8") as f:
            index = json.load(f)
        if which == "teacher":
            return cls(teacher, index["teacher_scheduler"], "ddim", index.get("teacher_guidance", 1.0))
        delta_file, sched_file = STUDENT_ASSETS[which]
        delta = load_delta(os.path.join(assets, delta_file), teacher)
        with open(os.path.join(assets, sched_file), encoding="utf-8") as f:
            sched = json.load(f)
        return cls(merge(teacher, delta), sched, "perflow", index.get(f"{which}_guidance", 1.0))

    def make_scheduler(self, name: str) -> schedulers.Scheduler:
        """The named scheduler over this model's noise schedule (PeRFlow settings from its config)."""
        if name == "perflow":
            return schedulers.from_config(self.scheduler_config, name="perflow")
        base = {k: self.scheduler_config[k] for k in ("num_train_timesteps", "beta_start", "beta_end",
                                                      "beta_schedule") if k in self.scheduler_config}
        extra = dict(clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing") if name == "ddim" else {}
        return schedulers.get(name, **base, **extra)

    def _sampler(self, scheduler: str, steps: int, batch: int):
        key = (scheduler, steps, batch)
        if key not in self._jitted:
            sched = self.make_scheduler(scheduler)
            shape = (batch, 1, IMAGE_SIZE, IMAGE_SIZE)
            state = sched.set_timesteps(steps, sample_shape=shape)  # multistep schedulers size history by it

            @jax.jit
            def run(params, labels, guidance, seed):
                null = jnp.full_like(labels, NULL_CLASS)
                denoise = sampling.classifier_free_guidance(adapter.unet_fn(UNET, params), condition(labels),
                                                            condition(null), guidance)
                x = sampling.init_latents(jax.random.key(seed), shape, sched, state)
                return sampling.sample(sched, state, denoise, x, key=jax.random.key(seed + 1))

            self._jitted[key] = run
        return self._jitted[key]

    def sample_float(self, labels: Sequence[int], num_inference_steps: int = 4, guidance_scale: float | None = None,
                     seed: int = 0, scheduler: str | None = None) -> np.ndarray:
        """Samples in [-1, 1] as float32 (B, 1, 8, 8) (for evaluation).

        Numbers are checked before anything compiles: `labels` integers 0–9, `num_inference_steps` an int ≥ 1
        (NumPy integers too), `guidance_scale` a finite number ≥ 0 (as in the SD pipeline; the digits model
        always mixes u + w·(c − u), so 0 is the unconditional model), `seed` an int in [0, 2**32).
        """
        raw = np.asarray(labels).reshape(-1)
        if raw.size == 0 or raw.dtype.kind not in "iu" or raw.min() < 0 or raw.max() >= NUM_CLASSES:
            raise ValueError(f"labels must be a non-empty sequence of digits 0-9, got {raw.tolist()}.")
        labels = raw.astype(np.int32)
        num_inference_steps = values.check_int("num_inference_steps", num_inference_steps, min_value=1)
        guidance = (self.default_guidance if guidance_scale is None
                    else values.check_float("guidance_scale", guidance_scale, min_value=0.0))
        seed = values.check_seed("seed", seed)
        scheduler = scheduler or self.default_scheduler
        run = self._sampler(scheduler, num_inference_steps, labels.size)
        x = run(self.params, jnp.asarray(labels), jnp.float32(guidance), jnp.uint32(seed))
        return np.asarray(x, np.float32)

    def __call__(self, labels: Sequence[int], num_inference_steps: int = 4, guidance_scale: float | None = None,
                 seed: int = 0, scheduler: str | None = None) -> np.ndarray:
        """Generate one 8×8 digit per label; returns (B, H, W) uint8 (0 = background, 255 = ink)."""
        x = self.sample_float(labels, num_inference_steps, guidance_scale, seed, scheduler)
        return to_uint8(x)


def to_uint8(x: np.ndarray) -> np.ndarray:
    """[-1, 1] (B, 1, H, W) → (B, H, W) uint8."""
    return np.clip(np.round((np.asarray(x)[:, 0] + 1.0) * 127.5), 0, 255).astype(np.uint8)


def save_grid(images: np.ndarray, path: str | os.PathLike, ncol: int | None = None, scale: int = 8,
              pad: int = 1) -> str:
    """Write (B, H, W) uint8 digits as one PNG grid, `scale`× enlarged on black (atomic). Returns the path."""
    images = np.asarray(images)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"save_grid needs (B, H, W) uint8 images, got {images.shape} {images.dtype}.")
    grid = make_grid(images, ncols=ncol or min(len(images), 10), pad=pad, fill=0)
    return save_png(np.kron(grid, np.ones((scale, scale), np.uint8)), path)
