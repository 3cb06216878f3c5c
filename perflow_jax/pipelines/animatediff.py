"""AnimateDiff text → video (diffusers' ``AnimateDiffPipeline``) on an SD1.5 model, accelerated by the PeRFlow ΔW.

The SD1.5 side is a :class:`~perflow_jax.pipelines.stable_diffusion.StableDiffusionPipeline` (text encoder, VAE,
scheduler; the PeRFlow ΔW merged into the base UNet, then LoRAs), the motion modules a diffusers
``MotionAdapter`` (:mod:`perflow_jax.models.motion_unet`) joined to that merged UNet. Stages, as in diffusers:

* encode_prompt: the CLIP text embeddings of the prompt (and negative prompt), shared by all frames;
* prepare latents: ``(1, C, F, H/8, W/8)`` standard normal noise times ``init_noise_sigma``;
* denoise: any of our schedulers in :func:`perflow_jax.sampling.sample` on the motion UNet, with classifier-free
  guidance (one batched [uncond; cond] call; traced scale) when ``guidance_scale > 1``;
* decode: the frames' latents through the SD VAE ``decode_chunk_size`` frames at a time, to [0, 1].

:meth:`AnimateDiffPipeline.program` is one jitted program per (size, frames, steps, guidance on/off, chunk).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from perflow_jax import sampling, sharding, values
from perflow_jax.models.motion_unet import (
    MotionAdapterConfig,
    load_motion_adapter,
    merge_motion_params,
    motion_spec,
    motion_unet,
    motion_unet_apply,
)
from perflow_jax.pipelines.stable_diffusion import StableDiffusionPipeline

__all__ = ["AnimateDiffPipeline", "AnimateDiffSpec"]


@dataclasses.dataclass(frozen=True)
class AnimateDiffSpec:
    """What one compiled program is specialised on (the program cache key)."""

    height: int
    width: int
    num_frames: int
    num_inference_steps: int
    guidance: bool


class AnimateDiffPipeline:
    """Text-to-video with AnimateDiff motion modules on an SD1.5 pipeline, torch-free.

    Attributes:
      base: the SD1.5 pipeline (its ``params["unet"]`` hold the ΔW- and LoRA-merged base UNet).
      adapter: the motion adapter's config; ``params["unet"]`` here is the base UNet plus its motion modules.
    """

    def __init__(self, base: StableDiffusionPipeline, adapter: MotionAdapterConfig, motion_params: dict):
        if base.text_encoder_2 is not None:
            raise ValueError("AnimateDiff motion adapters here are for SD1.x/SD2.x UNets; this model is SDXL.")
        motion_spec(base.components.unet_config, adapter, 1)  # a one-line error for an adapter of another base
        self.base, self.adapter = base, adapter
        put = lambda a: sharding.global_array(np.asarray(a, base.dtype), base._replicated)  # noqa: E731
        self.params = {**base.params, "unet": merge_motion_params(base.params["unet"],
                                                                   jax.tree_util.tree_map(put, motion_params))}
        self.scheduler = base.scheduler
        self._programs: dict[AnimateDiffSpec, Any] = {}

    @classmethod
    def from_pretrained(cls, model: str | os.PathLike, motion_adapter: str | os.PathLike, *,
                        delta: str | None = None, loras: Sequence[tuple[str, float]] = (),
                        scheduler: str = "perflow", dtype: Any = jnp.float32, decode_chunk_size: int | None = None,
                        **kwargs: Any) -> AnimateDiffPipeline:
        """Load the SD1.5 model (ΔW, then LoRAs merged into its UNet; `kwargs` as
        :meth:`StableDiffusionPipeline.from_pretrained`) and a diffusers ``MotionAdapter`` folder."""
        base = StableDiffusionPipeline.from_pretrained(os.fspath(model), delta=delta, loras=loras,
                                                       scheduler=scheduler, dtype=dtype,
                                                       decode_chunk_size=decode_chunk_size, **kwargs)
        adapter_cfg = MotionAdapterConfig.from_json(motion_adapter)
        motion_spec(base.components.unet_config, adapter_cfg, 1)  # refuse another base before reading weights
        adapter_cfg, motion = load_motion_adapter(motion_adapter, base.components.unet_config, dtype=dtype)
        return cls(base, adapter_cfg, motion)

    # -- the whole program ------------------------------------------------------------------------------------

    def program(self, spec: AnimateDiffSpec) -> Any:
        """The jitted ``(params, ids, neg_ids, latents, guidance_scale, state) -> frames`` for `spec`."""
        if spec not in self._programs:
            self._programs[spec] = jax.jit(functools.partial(self._run, spec))
        return self._programs[spec]

    def denoise(self, spec: AnimateDiffSpec, params: dict, latents: jax.Array, context: jax.Array,
                uncontext: jax.Array | None, guidance_scale: jax.Array, state: Any) -> jax.Array:
        """The sampling loop on ``(1, C, F, h, w)`` latents with the motion UNet."""
        unet = motion_unet(self.base.components.unet_config,
                           motion_spec(self.base.components.unet_config, self.adapter, spec.num_frames),
                           self.base.dtype)

        def model_fn(x: jax.Array, t: jax.Array, ctx: jax.Array) -> jax.Array:
            return motion_unet_apply(unet, params["unet"], x.astype(self.base.dtype), t, ctx).astype(jnp.float32)

        if spec.guidance:
            fn = sampling.classifier_free_guidance(model_fn, context, uncontext, guidance_scale)
        else:
            fn = sampling.conditional(model_fn, context)
        return sampling.sample(self.scheduler, state, fn, latents)

    def decode(self, params: dict, latents: jax.Array) -> jax.Array:
        """``(1, C, F, h, w)`` latents → ``(F, H, W, 3)`` float32 frames in [0, 1] (the VAE decodes
        ``decode_chunk_size`` frames at a time when the base pipeline has one)."""
        frames = jnp.transpose(latents[0], (1, 0, 2, 3))
        return self.base.decode(params, frames, "float")

    def _run(self, spec: AnimateDiffSpec, params: dict, ids: jax.Array, neg_ids: jax.Array, latents: jax.Array,
             guidance_scale: jax.Array, state: Any) -> jax.Array:
        size = (spec.height, spec.width)
        context = self.base.encode_prompt(params, ids, size).encoder_hidden_states
        uncontext = self.base.encode_prompt(params, neg_ids, size).encoder_hidden_states if spec.guidance else None
        x = self.denoise(spec, params, latents, context, uncontext, guidance_scale, state)
        return self.decode(params, x)

    def __call__(self, prompt: str, negative_prompt: str = "", *, num_frames: int = 16,
                 num_inference_steps: int = 4, guidance_scale: float = 7.5, height: int | None = None,
                 width: int | None = None, seed: int = 0, latents: np.ndarray | None = None) -> np.ndarray:
        """Generate ``(num_frames, H, W, 3)`` float32 frames in [0, 1] for `prompt`.

        `latents` ``(1, C, F, H/8, W/8)`` (unscaled standard normal, as diffusers' ``latents=``) replaces the draw
        from `seed` (key ``fold_in(key(seed), 0)``). ``guidance_scale`` ≤ 1 turns guidance off.
        """
        if not isinstance(prompt, str) or not isinstance(negative_prompt, str):
            raise ValueError("AnimateDiff prompt and negative_prompt must be strings (one video per call).")
        frames = values.check_int("num_frames", num_frames, min_value=1)
        motion_spec(self.base.components.unet_config, self.adapter, frames)
        steps = values.check_int("num_inference_steps", num_inference_steps, min_value=1)
        scale = values.check_float("guidance_scale", guidance_scale)
        seed = values.check_seed("seed", seed)
        h, w = self.base._check_size(height, width)
        f = self.base.vae_scale_factor
        shape = (1, self.base.components.unet_config.in_channels, frames, h // f, w // f)
        if latents is None:
            latents = jax.random.normal(jax.random.fold_in(jax.random.key(seed), 0), shape, jnp.float32)
        if tuple(np.shape(latents)) != shape:
            raise ValueError(f"latents must have shape {shape} (B, C, F, H/{f}, W/{f}) for this size and frame count, "
                             f"got {np.shape(latents)}.")
        values.check_finite_arrays([("latents", latents)], "AnimateDiffPipeline")
        state = self.base.scheduler_state(steps, shape)
        latents = jnp.asarray(latents, jnp.float32) * self.scheduler.init_noise_sigma(state)
        spec = AnimateDiffSpec(h, w, frames, steps, scale > 1)
        ids, neg_ids = (jnp.asarray(self.base.tokenize([t])) for t in (prompt, negative_prompt))
        out = self.program(spec)(self.params, ids, neg_ids, latents, jnp.float32(scale), state)
        return np.asarray(out)
