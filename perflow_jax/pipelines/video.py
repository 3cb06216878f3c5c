"""Stable Video Diffusion image → video (diffusers' ``StableVideoDiffusionPipeline``) in named, jitted stages.

One conditioning image (RGB, sides multiples of 8) → ``num_frames`` frames of the same size. As in diffusers:

* :meth:`~VideoPipeline.encode_image`: the CLIP ``image_embeds`` of the image (anti-aliased 224×224 resize,
  :mod:`~perflow_jax.pipelines.video_conditioning`) as a one-token context; the unconditional context is zeros;
* :meth:`~VideoPipeline.encode_condition`: noise augmentation in *pixel* space,
  ``image + noise_aug_strength · ε``, *then* the VAE posterior mode; those latents are repeated over frames and
  concatenated to the sample along channels at every step (zeros for the unconditional half);
* :func:`added_time_ids`: ``[fps − 1, motion_bucket_id, noise_aug_strength]`` (SVD was trained on fps − 1);
* :meth:`~VideoPipeline.denoise`: the model's scheduler (``euler`` with Karras σ, v-prediction, 0.25·ln σ
  timesteps) in :func:`perflow_jax.sampling.sample`; guidance is per frame,
  ``linspace(min_guidance_scale, max_guidance_scale, num_frames)``, with [uncond; cond] batched in one UNet
  call (:func:`perflow_jax.sampling.classifier_free_guidance`), on when ``max_guidance_scale > 1``;
* :meth:`~VideoPipeline.decode`: latents / scaling_factor decoded ``decode_chunk_size`` frames at a time, each
  chunk as its own clip (:func:`~perflow_jax.models.vae_temporal.decode_frames`), to [0, 1].

:meth:`~VideoPipeline.program` composes the stages into one jitted program per (shape, frames, steps, chunk,
guidance on/off); fps, motion bucket, augmentation strength and guidance scales are traced. Scheduler math is
float32 whatever the model dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from perflow_jax import sampling, schedulers, values
from perflow_jax.io import read_json
from perflow_jax.models.clip_vision import (
    CLIP_MEAN,
    CLIP_STD,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    load_clip_vision_model,
)
from perflow_jax.models.layers import AttentionImpl
from perflow_jax.models.unet_spatiotemporal import (
    SpatioTemporalUNetConfig,
    UNetSpatioTemporalConditionModel,
    load_unet_spatiotemporal,
)
from perflow_jax.models.vae_temporal import (
    AutoencoderKLTemporalDecoder,
    TemporalVAEConfig,
    decode_frames,
    load_temporal_vae,
)
from perflow_jax.pipelines.video_conditioning import check_image, clip_pixels, vae_pixels

__all__ = ["VideoPipeline", "VideoSpec", "added_time_ids", "frame_guidance_scales"]


def added_time_ids(fps: Any, motion_bucket_id: Any, noise_aug_strength: Any) -> jax.Array:
    """SVD's micro-conditioning ``(1, 3)`` float32: ``[fps − 1, motion_bucket_id, noise_aug_strength]``."""
    return jnp.stack([jnp.asarray(fps, jnp.float32) - 1, jnp.asarray(motion_bucket_id, jnp.float32),
                      jnp.asarray(noise_aug_strength, jnp.float32)])[None]


def frame_guidance_scales(min_scale: Any, max_scale: Any, num_frames: int) -> jax.Array:
    """The guidance scale of each frame, ``linspace(min, max, num_frames)`` as ``(1, F)`` float32 (first frame
    `min_scale`, last `max_scale`), as diffusers' ``torch.linspace``."""
    lo, hi = jnp.asarray(min_scale, jnp.float32), jnp.asarray(max_scale, jnp.float32)
    if num_frames == 1:
        return lo[None, None]
    # torch.linspace's float32 rule: the first half from the start, the second half from the end.
    i = jnp.arange(num_frames, dtype=jnp.float32)
    step = (hi - lo) / (num_frames - 1)
    half = num_frames // 2
    return jnp.where(jnp.arange(num_frames) < half, lo + step * i, hi - step * (num_frames - 1 - i))[None]


@dataclasses.dataclass(frozen=True)
class VideoSpec:
    """What one compiled program is specialised on (the program cache key)."""

    height: int
    width: int
    num_frames: int
    num_inference_steps: int
    decode_chunk_size: int
    guidance: bool


class VideoPipeline:
    """SVD image-to-video from a diffusers ``StableVideoDiffusionPipeline`` folder (``unet/``, ``vae/``,
    ``image_encoder/``, ``scheduler/``, ``feature_extractor/``), torch-free.

    Attributes:
      dtype: model compute dtype (e.g. ``jnp.bfloat16``); the scheduler and guidance math stay float32.
      attention_implementation: the UNet's attention kernel (None, ``'xla'`` or ``'cudnn'``).
    """

    def __init__(self, unet_config: SpatioTemporalUNetConfig, vae_config: TemporalVAEConfig,
                 encoder_config: CLIPVisionConfig, scheduler_config: dict[str, Any], params: dict[str, Any], *,
                 image_mean: tuple[float, ...] = CLIP_MEAN, image_std: tuple[float, ...] = CLIP_STD,
                 dtype: Any = jnp.float32, attention_implementation: AttentionImpl = None):
        self.unet_config, self.vae_config, self.encoder_config = unet_config, vae_config, encoder_config
        self.scheduler = schedulers.from_config(scheduler_config)
        self.params = params
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        self.dtype = dtype
        self.unet = UNetSpatioTemporalConditionModel(unet_config, dtype, attention_implementation)
        self.encoder = CLIPVisionModelWithProjection(encoder_config, dtype)
        self._programs: dict[VideoSpec, Any] = {}

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, dtype: Any = jnp.float32, variant: str | None = None,
                        attention_implementation: AttentionImpl = None) -> VideoPipeline:
        """Load every component (params cast to `dtype`; the VAE stays float32, as diffusers' force_upcast)."""
        folder = os.fspath(folder)
        if not os.path.isdir(os.path.join(folder, "unet")):
            raise FileNotFoundError(f"{folder} is not an SVD pipeline folder (no unet/ inside).")
        unet_cfg, unet = load_unet_spatiotemporal(os.path.join(folder, "unet"), dtype, variant)
        vae_cfg, vae = load_temporal_vae(os.path.join(folder, "vae"), jnp.float32, variant)
        enc_cfg, enc = load_clip_vision_model(os.path.join(folder, "image_encoder"), dtype, variant)
        sched = read_json(os.path.join(folder, "scheduler", "scheduler_config.json"))
        fe_path = os.path.join(folder, "feature_extractor", "preprocessor_config.json")
        fe = read_json(fe_path) if os.path.exists(fe_path) else {}
        return cls(unet_cfg, vae_cfg, enc_cfg, sched, {"unet": unet, "vae": vae, "image_encoder": enc},
                   image_mean=tuple(fe.get("image_mean", CLIP_MEAN)), image_std=tuple(fe.get("image_std", CLIP_STD)),
                   dtype=dtype, attention_implementation=attention_implementation)

    # -- stages (pure in params) ----------------------------------------------------------------------------

    def encode_image(self, params: dict, image: jax.Array) -> jax.Array:
        """``(1, H, W, 3)`` [0, 1] → the CLIP image embedding as a context ``(1, 1, projection_dim)``."""
        pixels = clip_pixels(image, self.image_mean, self.image_std, self.encoder_config.image_size)
        out = self.encoder.apply({"params": params["image_encoder"]}, pixels.astype(self.dtype))
        return out.image_embeds[:, None, :]

    def encode_condition(self, params: dict, image: jax.Array, aug_noise: jax.Array,
                         noise_aug_strength: jax.Array) -> jax.Array:
        """Noise-augment the image in pixel space, then encode it: the VAE posterior mode ``(1, C, h, w)``
        (unscaled, as diffusers)."""
        pixels = vae_pixels(image) + jnp.asarray(noise_aug_strength, jnp.float32) * aug_noise.astype(jnp.float32)
        vae = AutoencoderKLTemporalDecoder(self.vae_config)
        return vae.apply({"params": params["vae"]}, pixels, method=AutoencoderKLTemporalDecoder.encode).mode()

    def denoise(self, params: dict, latents: jax.Array, context: jax.Array, image_latents: jax.Array,
                time_ids: jax.Array, guidance_scales: jax.Array | None, state: Any) -> jax.Array:
        """The sampling loop on ``(1, F, C, h, w)`` latents; `guidance_scales` ``(1, F)`` or None (no CFG)."""
        frames = latents.shape[1]
        cond_latents = jnp.repeat(image_latents[:, None], frames, axis=1).astype(self.dtype)

        def model_fn(x: jax.Array, t: jax.Array, cond: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
            ctx, img, ids = cond
            sample = jnp.concatenate([x.astype(self.dtype), img], axis=2)
            return self.unet.apply({"params": params["unet"]}, sample, t, ctx, ids)

        cond = (context.astype(self.dtype), cond_latents, time_ids)
        if guidance_scales is None:
            fn = sampling.conditional(model_fn, cond)
        else:
            uncond = (jnp.zeros_like(cond[0]), jnp.zeros_like(cond_latents), time_ids)
            fn = sampling.classifier_free_guidance(model_fn, cond, uncond, guidance_scales)
        return sampling.sample(self.scheduler, state, fn, latents)

    def decode(self, params: dict, latents: jax.Array, chunk_size: int) -> jax.Array:
        """``(1, F, C, h, w)`` latents → ``(F, H, W, 3)`` float32 frames in [0, 1]."""
        z = latents[0].astype(jnp.float32) / self.vae_config.scaling_factor
        frames = decode_frames(self.vae_config, params["vae"], z, chunk_size)
        return jnp.clip(jnp.transpose(frames, (0, 2, 3, 1)) / 2 + 0.5, 0.0, 1.0)

    # -- the whole program ------------------------------------------------------------------------------------

    def program(self, spec: VideoSpec) -> Any:
        """The jitted ``(params, image, latents, aug_noise, scalars, state) -> frames`` for `spec`."""
        if spec not in self._programs:
            self._programs[spec] = jax.jit(functools.partial(self._run, spec))
        return self._programs[spec]

    def _run(self, spec: VideoSpec, params: dict, image: jax.Array, latents: jax.Array, aug_noise: jax.Array,
             scalars: jax.Array, state: Any) -> jax.Array:
        fps, motion, strength, lo, hi = (scalars[i] for i in range(5))
        context = self.encode_image(params, image)
        image_latents = self.encode_condition(params, image, aug_noise, strength).astype(self.dtype)
        scales = frame_guidance_scales(lo, hi, spec.num_frames) if spec.guidance else None
        x = self.denoise(params, latents, context, image_latents, added_time_ids(fps, motion, strength), scales,
                         state)
        return self.decode(params, x, spec.decode_chunk_size)

    def __call__(self, image: np.ndarray, *, num_frames: int | None = None, num_inference_steps: int = 25,
                 fps: int = 7, motion_bucket_id: int = 127, noise_aug_strength: float = 0.02,
                 min_guidance_scale: float = 1.0, max_guidance_scale: float = 3.0,
                 decode_chunk_size: int | None = None, seed: int = 0, latents: np.ndarray | None = None,
                 aug_noise: np.ndarray | None = None) -> np.ndarray:
        """Generate ``(num_frames, H, W, 3)`` float32 frames in [0, 1] from an RGB ``(H, W, 3)`` image.

        `latents` ``(1, F, C, H/8, W/8)`` (unscaled standard normal, as diffusers' ``latents=``) and
        `aug_noise` ``(1, 3, H, W)`` replace the draws from `seed` (key ``fold_in(key(seed), 0)`` and ``1``).
        ``decode_chunk_size`` defaults to all frames at once.
        """
        pixels = check_image(image)
        h, w = pixels.shape[:2]
        frames = values.check_int("num_frames", self.unet_config.num_frames if num_frames is None else num_frames,
                                  min_value=1)
        steps = values.check_int("num_inference_steps", num_inference_steps, min_value=1)
        chunk = values.check_int("decode_chunk_size", frames if decode_chunk_size is None else decode_chunk_size,
                                 min_value=1)
        seed = values.check_seed("seed", seed)
        scalars = [values.check_float(n, v) for n, v in (
            ("fps", fps), ("motion_bucket_id", motion_bucket_id), ("noise_aug_strength", noise_aug_strength),
            ("min_guidance_scale", min_guidance_scale), ("max_guidance_scale", max_guidance_scale))]
        if scalars[0] < 1:
            raise ValueError(f"fps must be at least 1 (the model is conditioned on fps − 1), got {fps}.")
        f = 2 ** (len(self.vae_config.block_out_channels) - 1)
        shape = (1, frames, self.unet_config.out_channels, h // f, w // f)
        state = self.scheduler.set_timesteps(steps)
        key = jax.random.key(seed)
        if latents is None:
            latents = jax.random.normal(jax.random.fold_in(key, 0), shape, jnp.float32)
        if aug_noise is None:
            aug_noise = jax.random.normal(jax.random.fold_in(key, 1), (1, 3, h, w), jnp.float32)
        for name, arr, want in (("latents", latents, shape), ("aug_noise", aug_noise, (1, 3, h, w))):
            if tuple(np.shape(arr)) != want:
                raise ValueError(f"{name} must have shape {want} for this image and frame count, got {np.shape(arr)}.")
        values.check_finite_arrays([("latents", latents), ("aug_noise", aug_noise)], "VideoPipeline")
        latents = jnp.asarray(latents, jnp.float32) * self.scheduler.init_noise_sigma(state)
        spec = VideoSpec(h, w, frames, steps, chunk, scalars[4] > 1)
        out = self.program(spec)(self.params, jnp.asarray(pixels)[None], latents, jnp.asarray(aug_noise),
                                 jnp.asarray(scalars, jnp.float32), state)
        return np.asarray(out)
