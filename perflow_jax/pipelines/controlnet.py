"""ControlNet text-to-image and img2img (SD1.x, SD2.x, SDXL): the Stable Diffusion stages with control images.

:class:`StableDiffusionControlNetPipeline` is a :class:`~perflow_jax.pipelines.stable_diffusion.
StableDiffusionPipeline` with one or more ControlNets. Its program runs the same stages (encode_prompt →
prepare_latents → denoise → decode); only the denoiser differs: at every step each ControlNet sees the scaled
latents, the timestep, the text condition and its control image, and the sum of the nets' residuals enters the
UNet through :class:`~perflow_jax.models.adapter.UNetCondition` (``down_residuals`` / ``mid_residual``).

As in diffusers' ``StableDiffusion(XL)ControlNet(Img2Img)Pipeline``:

- with classifier-free guidance the nets run on the [uncond; cond] batch with the control images repeated, except
  in guess mode, where they run on the conditional half only and the unconditional half gets zero residuals;
- net k's residuals are scaled by ``controlnet_conditioning_scale[k]`` at step i when
  ``start_k ≤ i/n`` and ``(i+1)/n ≤ end_k`` (``control_guidance_start/end``, n the steps run), else by 0;
- guess mode also scales the residuals from 0.1 to 1 (log scale), and is on for nets with
  ``global_pool_conditions`` (judged by the first net).

Control images, conditioning scales and the per-step keep table are traced inputs: one compiled program per
:class:`ControlSpec` (shapes, step count, net count, guess mode, CFG on/off), whatever the images and scales.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from perflow_jax import sampling, schedulers, sharding, values
from perflow_jax.hub import resolve_model_path
from perflow_jax.models.adapter import ModelFn, UNetCondition
from perflow_jax.models.components import PipelineComponents
from perflow_jax.models.config_io import CONFIG_NAME
from perflow_jax.models.controlnet import (
    ControlNetConfig,
    ControlNetModel,
    check_compatible,
    controlnet_apply,
    load_controlnet,
)
from perflow_jax.models.controlnet_single_file import load_controlnet_single_file
from perflow_jax.models.unet import UNetConfig
from perflow_jax.pipelines import refiner
from perflow_jax.pipelines.stable_diffusion import (
    STEP_NOISE_FOLD,
    GenerationInputs,
    GenerationRequest,
    GenerationSpec,
    StableDiffusionPipeline,
    _pad_rows,
    _prepare_images,
    load_components,
    make_scheduler,
)

__all__ = ["ControlInputs", "ControlScalars", "ControlSpec", "StableDiffusionControlNetPipeline", "control_keep",
           "load_controlnets"]

Scales = float | Sequence[float]


@dataclasses.dataclass(frozen=True)
class ControlSpec(GenerationSpec):
    """A :class:`GenerationSpec` with the static part of the control: the number of nets and guess mode."""

    num_controlnets: int = 1
    guess_mode: bool = False


class ControlInputs(NamedTuple):
    """Batched inputs: the Stable Diffusion ones, and one (B, 3, H, W) float32 control image batch per net."""

    base: GenerationInputs
    images: tuple[jax.Array, ...]


class ControlScalars(NamedTuple):
    """Replicated traced scalars: the guidance scale, each net's conditioning scale (N,), and the keep table
    (steps, N) of 1/0 per step of the schedule and net (``control_guidance_start/end``)."""

    guidance_scale: jax.Array
    scales: jax.Array
    keep: jax.Array


def control_keep(num_steps: int, start_step: int, starts: Sequence[float], ends: Sequence[float]) -> np.ndarray:
    """The (num_steps, N) float32 table of whether net k acts at schedule step s: diffusers' rule over the
    ``n = num_steps − start_step`` steps run, step s being the i = s − start_step-th (rows before start_step
    are never used)."""
    n = num_steps - start_step
    keep = np.zeros((num_steps, len(starts)), np.float32)
    for i in range(n):
        keep[start_step + i] = [1.0 - float(i / n < s or (i + 1) / n > e) for s, e in zip(starts, ends, strict=True)]
    return keep


def load_controlnets(paths: Sequence[str], unet_config: UNetConfig, *, dtype: Any = None,
                     variant: str | None = None, allow_pickle: bool = False) -> list[tuple[ControlNetConfig, dict]]:
    """``(config, params)`` of each ControlNet: a diffusers folder (or a repo id in the local Hugging Face cache),
    or an original single file (:mod:`perflow_jax.models.controlnet_single_file`) whose config is the
    ``config.json`` beside it if there is one, else the base model's `unet_config` with ControlNet defaults."""
    out = []
    for path in paths:
        if os.path.isfile(path):
            beside = os.path.join(os.path.dirname(os.path.abspath(path)), CONFIG_NAME)
            config = beside if os.path.isfile(beside) else unet_config
            out.append(load_controlnet_single_file(path, config, dtype=dtype, allow_pickle=allow_pickle))
        else:
            out.append(load_controlnet(resolve_model_path(path), dtype=dtype, variant=variant,
                                       allow_pickle=allow_pickle))
    return out


class StableDiffusionControlNetPipeline(StableDiffusionPipeline):
    """Text-to-image and img2img with one or more ControlNets (see the module docstring).

    Attributes (besides the base pipeline's):
      controlnets: the Flax ControlNet modules, one per net.
      params: the base params plus ``"controlnets"``, a tuple of each net's params (replicated).
    """

    def __init__(self, components: PipelineComponents, scheduler: schedulers.Scheduler,
                 controlnets: Sequence[tuple[ControlNetConfig, dict]], **kwargs: Any):
        if not controlnets:
            raise ValueError("A ControlNet pipeline needs at least one ControlNet.")
        for k, (config, _) in enumerate(controlnets):
            check_compatible(config, components.unet_config, what=f"ControlNet {k}")
        super().__init__(components, scheduler, **kwargs)
        self.controlnets = tuple(
            ControlNetModel(config, dtype=self.dtype, attention_implementation=self.unet.attention_implementation,
                            attention_chunk_size=self.unet.attention_chunk_size) for config, _ in controlnets)
        self.params = {**self.params, "controlnets": tuple(
            jax.tree_util.tree_map(lambda a: sharding.global_array(np.asarray(a, self.dtype), self._replicated), p)
            for _, p in controlnets)}
        for k, net in enumerate(self.controlnets):
            if net.config.image_factor != self.vae_scale_factor:
                raise ValueError(f"ControlNet {k} downsamples control images {net.config.image_factor}× but this "
                                 f"model's VAE {self.vae_scale_factor}×; it belongs to another model family.")

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str, *, controlnets: Sequence[str] = (), base: str | None = None,
                        delta: str | None = None, delta_variant: str | None = None, delta_is_merged: bool = False,
                        delta_base: str | None = None, loras: Sequence[tuple[str, float]] = (),
                        scheduler: str = "perflow", scheduler_overrides: dict[str, Any] | None = None,
                        dtype: Any = jnp.float32, variant: str | None = None, allow_pickle: bool = False,
                        local_files_only: bool = False, ip_adapter: str | None = None,
                        image_encoder: str | None = None, **kwargs: Any) -> StableDiffusionControlNetPipeline:
        """As :meth:`StableDiffusionPipeline.from_pretrained` (ΔW and LoRAs merge into the UNet only; an
        IP-Adapter joins it), plus `controlnets`: one per net, each a diffusers ControlNet folder, a cached repo id
        or an original single file (see :func:`load_controlnets`)."""
        if ip_adapter is None and image_encoder is not None:
            raise ValueError("image_encoder= is only used with ip_adapter=; pass the IP-Adapter file too.")
        components = load_components(path_or_repo_id, base=base, delta=delta, delta_variant=delta_variant,
                                     delta_is_merged=delta_is_merged, delta_base=delta_base, loras=loras,
                                     variant=variant, allow_pickle=allow_pickle, local_files_only=local_files_only)
        nets = load_controlnets(list(controlnets), components.unet_config, variant=variant,
                                allow_pickle=allow_pickle)
        pipe = cls(components, make_scheduler(components, scheduler, scheduler_overrides), nets, dtype=dtype,
                   **kwargs)
        if ip_adapter is not None:
            pipe.load_ip_adapter(ip_adapter, image_encoder=image_encoder)
        return pipe

    @classmethod
    def from_pipeline(cls, pipe: StableDiffusionPipeline, controlnets: Sequence[str], **kwargs: Any
                      ) -> StableDiffusionControlNetPipeline:
        """A ControlNet pipeline on `pipe`'s components (its ΔW/LoRA-merged UNet, VAE, text encoders) and
        scheduler, e.g. a Tile ControlNet refiner after text-to-image. `kwargs` go to the constructor (default:
        `pipe`'s dtype and mesh)."""
        nets = load_controlnets(list(controlnets), pipe.components.unet_config)
        kwargs = {"dtype": pipe.dtype, "mesh": pipe.mesh, **kwargs}
        return cls(pipe.components, pipe.scheduler, nets, **kwargs)

    # ------------------------------------------------------------------------------------------------------
    # Calls
    # ------------------------------------------------------------------------------------------------------

    def __call__(self, prompt: str | Sequence[str], control_image: Any = None,  # type: ignore[override]
                 negative_prompt: str | Sequence[str] | None = None, *, controlnet_conditioning_scale: Scales = 1.0,
                 control_guidance_start: Scales = 0.0, control_guidance_end: Scales = 1.0, guess_mode: bool = False,
                 **kwargs: Any) -> np.ndarray:
        """Text-to-image under `control_image` (NHWC uint8 or float in [0, 1]; one image or one per output; a
        list of those with several nets). Other arguments as :meth:`StableDiffusionPipeline.__call__`; the
        image size defaults to the control image's."""
        return self.generate(self.build_control_request(
            prompt, negative_prompt, control_image, controlnet_conditioning_scale, control_guidance_start,
            control_guidance_end, guess_mode, **kwargs))

    def img2img(self, prompt: str | Sequence[str], image: np.ndarray, control_image: Any = None,  # type: ignore[override]
                strength: float = 0.8, negative_prompt: str | Sequence[str] | None = None, *,
                controlnet_conditioning_scale: Scales = 0.8, control_guidance_start: Scales = 0.0,
                control_guidance_end: Scales = 1.0, guess_mode: bool = False, **kwargs: Any) -> np.ndarray:
        """img2img (as :meth:`StableDiffusionPipeline.img2img`) under `control_image`; strength and conditioning
        scale default to 0.8, as in diffusers' ``StableDiffusionControlNetImg2ImgPipeline``."""
        return self.generate(self.build_control_request(
            prompt, negative_prompt, control_image, controlnet_conditioning_scale, control_guidance_start,
            control_guidance_end, guess_mode, image=image, strength=strength, **kwargs))

    def refine(self, images: np.ndarray, prompt: str | Sequence[str],
               negative_prompt: str | Sequence[str] | None = None, *, scale: float = 2,
               strength: float = refiner.DEFAULT_STRENGTH, **kwargs: Any) -> np.ndarray:
        """PeRFlow-Refiner: upscale `images` by `scale` with this pipeline's (Tile) ControlNet
        (:func:`perflow_jax.pipelines.refiner.refine`)."""
        return refiner.refine(self, images, prompt, negative_prompt, scale=scale, strength=strength, **kwargs)

    # ------------------------------------------------------------------------------------------------------
    # Host side
    # ------------------------------------------------------------------------------------------------------

    def build_control_request(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None,
                              control_image: Any, controlnet_conditioning_scale: Scales = 1.0,
                              control_guidance_start: Scales = 0.0, control_guidance_end: Scales = 1.0,
                              guess_mode: bool = False, **kwargs: Any) -> GenerationRequest:
        """Validate a call and build its request: the base request (:meth:`build_request`) with a
        :class:`ControlSpec`, :class:`ControlInputs` and :class:`ControlScalars`. Raises ValueError naming the
        bad argument; compiles nothing."""
        n_nets = len(self.controlnets)
        images = self._control_images(control_image, n_nets)
        scales = _per_net(controlnet_conditioning_scale, n_nets, "controlnet_conditioning_scale")
        starts = _per_net(control_guidance_start, n_nets, "control_guidance_start")
        ends = _per_net(control_guidance_end, n_nets, "control_guidance_end")
        for s, e in zip(starts, ends, strict=True):
            if not 0.0 <= s < e <= 1.0:
                raise ValueError(f"control_guidance_start {s} and control_guidance_end {e} must satisfy "
                                 "0 ≤ start < end ≤ 1 (fractions of the steps).")
        if not isinstance(guess_mode, bool):
            raise ValueError(f"guess_mode must be True or False, got {guess_mode!r}.")
        if kwargs.get("image") is None and kwargs.get("height") is None and kwargs.get("width") is None:
            first = _prepare_images(images[0], 1 if np.ndim(images[0]) == 3 else len(images[0]),
                                    "control image" if n_nets == 1 else "control image 0")
            kwargs.update(height=first.shape[2], width=first.shape[3])  # the output size defaults to the image's
        request = self.build_request(prompt, negative_prompt, **kwargs)
        spec = request.spec
        n = request.num_images
        control = []
        for k, img in enumerate(images):
            what = "control image" if n_nets == 1 else f"control image {k}"
            arr = _prepare_images(img, n, what)
            if arr.shape[1:] != (3, spec.height, spec.width):
                raise ValueError(f"{what} is {arr.shape[2]}×{arr.shape[3]} (H×W) but the output is "
                                 f"{spec.height}×{spec.width}; resize the control image to the output size.")
            control.append(_pad_rows(arr, spec.batch))
        state = self.scheduler_state(spec.num_inference_steps, self.latent_shape(spec))
        keep = control_keep(int(state.timesteps.shape[0]), spec.start_step, starts, ends)
        pooled = self.controlnets[0].config.global_pool_conditions
        cspec = ControlSpec(**dataclasses.asdict(spec), num_controlnets=n_nets, guess_mode=guess_mode or pooled)
        rep = self._replicated
        scalars = ControlScalars(request.guidance_scale, sharding.global_array(np.asarray(scales, np.float32), rep),
                                 sharding.global_array(keep, rep))
        inputs = ControlInputs(request.inputs, tuple(sharding.global_array(c, self._batch) for c in control))
        return request._replace(spec=cspec, inputs=inputs, guidance_scale=scalars)

    def _control_images(self, control_image: Any, n_nets: int) -> list[Any]:
        """One control image (batch) per net: a list with several nets, the image itself with one."""
        if control_image is None:
            raise ValueError("control_image is required: one image (or batch) per ControlNet.")
        if n_nets == 1:
            items = [control_image] if not isinstance(control_image, list | tuple) else list(control_image)
            if len(items) != 1:
                items = [np.stack([np.asarray(i) for i in items])]  # a list of images is one batch
        else:
            if not isinstance(control_image, list | tuple) or len(control_image) != n_nets:
                raise ValueError(f"With {n_nets} ControlNets, control_image must be a list of {n_nets} images "
                                 "(or batches), one per net.")
            items = list(control_image)
        return items

    # ------------------------------------------------------------------------------------------------------
    # Device side
    # ------------------------------------------------------------------------------------------------------

    def program(self, spec: GenerationSpec) -> Callable[..., jax.Array]:
        """``fn(params, state, inputs: ControlInputs, seed, scalars: ControlScalars) -> images``: the base stages
        with :meth:`denoise_controlled` in place of the plain denoiser."""
        if not isinstance(spec, ControlSpec):
            return super().program(spec)

        def program(params: Any, state: Any, inputs: ControlInputs, seed: jax.Array,
                    scalars: ControlScalars) -> jax.Array:
            size = (spec.height, spec.width)
            cond = self.encode_prompt(params, inputs.base.ids, size)
            uncond = (self.encode_prompt(params, inputs.base.neg_ids, size, zero_text=spec.zero_negative)
                      if spec.use_cfg else None)
            if spec.ip_adapter:
                cond, uncond = self.encode_image_prompt(params, inputs.base, cond, uncond)
            x = self.prepare_latents(params, spec, state, inputs.base, seed)
            x = self.denoise_controlled(params, spec, state, x, cond, uncond, inputs.images, scalars, seed)
            return x if spec.output_type == "latent" else self.decode(params, x, spec.output_type)

        return program

    def controlled_model_fn(self, params: Any, images: Sequence[jax.Array], scales: jax.Array, guess_mode: bool,
                            cond_half_only: bool) -> ModelFn:
        """The UNet with the ControlNets' summed residuals: ``model_fn(x, timesteps, cond)``.

        `images` are batched like the latents the caller passes without CFG; with ``cond_half_only`` (guess mode
        with CFG) `x` is the [uncond; cond] batch, the nets see its second half and the first gets zeros; else
        (CFG without guess mode) the images are repeated to the batch of `x`. `scales` (N,) are traced.
        """

        def fn(x: jax.Array, timesteps: jax.Array, cond: UNetCondition) -> jax.Array:
            b = x.shape[0]
            cx, ct, ccond = x, timesteps, cond
            if cond_half_only:
                half = lambda a: a[b // 2:]  # noqa: E731
                cx, ct, ccond = half(x), half(timesteps), jax.tree_util.tree_map(half, cond)
            down, mid = None, None
            for k, (net, p, img) in enumerate(zip(self.controlnets, params["controlnets"], images, strict=True)):
                img = jnp.concatenate([img] * (cx.shape[0] // img.shape[0]), axis=0).astype(self.dtype)
                d, m = controlnet_apply(net, p, cx, ct, ccond, img, scales[k], guess_mode)
                down = d if down is None else tuple(a + c for a, c in zip(down, d, strict=True))
                mid = m if mid is None else mid + m
            if cond_half_only:
                down = tuple(jnp.concatenate([jnp.zeros_like(a), a]) for a in down)
                mid = jnp.concatenate([jnp.zeros_like(mid), mid])
            return self.model_fn(params)(x, timesteps, cond._replace(down_residuals=down, mid_residual=mid))

        return fn

    def denoise_controlled(self, params: Any, spec: ControlSpec, state: Any, latents: jax.Array,
                           cond: UNetCondition, uncond: UNetCondition | None, images: Sequence[jax.Array],
                           scalars: ControlScalars, seed: jax.typing.ArrayLike) -> jax.Array:
        """:meth:`StableDiffusionPipeline.denoise` with the ControlNets: net k's scale at step i is
        ``scales[k] · keep[i, k]`` (all traced)."""
        if spec.use_cfg and uncond is None:
            raise ValueError("spec.use_cfg needs an unconditional condition (encode the negative prompt).")

        def denoise(x: jax.Array, timestep: jax.Array, step_index: jax.Array) -> jax.Array:
            step_scales = scalars.scales * scalars.keep[step_index]
            model = self.controlled_model_fn(params, images, step_scales, spec.guess_mode,
                                             cond_half_only=spec.guess_mode and spec.use_cfg)
            if spec.use_cfg:
                return sampling.guided(model, uncond, scalars.guidance_scale)(x, timestep, cond)
            return sampling.conditional(model, cond)(x, timestep, step_index)

        key = jax.random.fold_in(jax.random.key(seed), STEP_NOISE_FOLD)
        return sampling.sample(self.scheduler, state, denoise, latents, key=key, start_step=spec.start_step)


def _per_net(value: Scales, n: int, name: str) -> list[float]:
    """A number for every net: one number for all, or a list of n."""
    items = list(value) if isinstance(value, list | tuple) else [value] * n
    if len(items) == 1 and n > 1:
        items = items * n
    if len(items) != n:
        raise ValueError(f"{name} has {len(items)} values for {n} ControlNets; pass one value or one per net.")
    return [values.check_float(name, v) for v in items]
