"""Text-to-image and img2img for SD1.x, SD2.x and SDXL, in named stages, jitted once per shape and sharded.

A generation runs four stages, each a public method that is pure in ``params`` and usable on its own (inside
your own ``jax.jit`` or eagerly):

1. :meth:`~StableDiffusionPipeline.encode_prompt`: token ids → a :class:`~perflow_jax.models.adapter.UNetCondition`;
2. :meth:`~StableDiffusionPipeline.prepare_latents`: seeded noise, given latents, or an encoded and noised image;
3. :meth:`~StableDiffusionPipeline.denoise`: the ``lax.scan`` sampling loop (:func:`perflow_jax.sampling.sample`)
   over the UNet, with or without classifier-free guidance;
4. :meth:`~StableDiffusionPipeline.decode`: VAE decode to images.

:meth:`~StableDiffusionPipeline.program` composes them for one :class:`GenerationSpec`, the frozen record of
everything static about a call (batch, size, steps, img2img start step, CFG on/off, ...). The spec is both what
the program is built from and the key of the compiled-program cache, so prompts, negative prompts, seed and
guidance scale are traced inputs and never recompile. :meth:`~StableDiffusionPipeline.build_request` turns a
user call into a spec plus a :class:`GenerationInputs` of batched global arrays;
:meth:`~StableDiffusionPipeline.generate` compiles (once per spec) and runs the program. ``__call__`` and
``img2img`` are exactly these two steps.

The batch is sharded over a 1-D ``("data",)`` mesh of all devices (all hosts after
:func:`perflow_jax.sharding.initialize_distributed`), params replicated; a batch that does not divide the device
count is padded and trimmed. Image ``i`` of a call always starts from noise drawn with
``fold_in(fold_in(key(seed), i), 0)`` (its VAE posterior sample in img2img from ``fold_in(..., 1)``), so the
same seed gives the same images on 1 or N devices and for any batch split; ancestral schedulers draw their step
noise for the whole padded batch from ``fold_in(key(seed), 2**31)``.

Precision: params and activations in ``dtype`` (e.g. bf16); latents, guidance and the scheduler in float32.
Layouts: latents NCHW ``(B, 4, H/8, W/8)`` like diffusers; returned images NHWC ``(B, H, W, 3)`` like
diffusers' ``output_type="np"``, as uint8 or float in [0, 1].

Building a pipeline changes no global state: JAX's persistent compilation cache is turned on by an explicit
:func:`perflow_jax.enable_compilation_cache` call.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from perflow_jax import delta as delta_lib
from perflow_jax import executable_cache, sampling, schedulers, sharding, values
from perflow_jax.lora import load_lora, merge_loras
from perflow_jax.models import adapter, vae_tiling
from perflow_jax.models.adapter import UNetCondition
from perflow_jax.models.clip import CLIPTextModel, CLIPTextModelWithProjection
from perflow_jax.models.components import PipelineComponents, load_pipeline_components
from perflow_jax.models.ip_adapter import merge_ip_adapter
from perflow_jax.models.single_file import load_single_file
from perflow_jax.models.unet import UNet2DConditionModel
from perflow_jax.models.vae import AutoencoderKL, LatentDistribution, scale_latents, unscale_latents
from perflow_jax.pipelines.defaults import FAMILY_DEFAULTS, model_family, perflow_config_dict
from perflow_jax.pipelines.image_prompt import ImagePrompt, load_image_prompt
from perflow_jax.pipelines.image_prompt import check_scale as check_ip_scale

OUTPUT_TYPES = ("uint8", "float", "latent")  # "latent": the final UNet latents, not decoded
IMAGE_TYPES = ("uint8", "float")
DEFAULT_BATCH_MEMORY = 8 * 2**30  # default_batch_size's budget per device where JAX reports no memory (CPU)
STEP_NOISE_FOLD = 2**31  # fold_in(key(seed), STEP_NOISE_FOLD): the ancestral schedulers' step-noise key


@dataclasses.dataclass(frozen=True)
class GenerationSpec:
    """Everything static about one generation: what :meth:`StableDiffusionPipeline.program` is built from, and
    the key of the pipeline's compiled-program cache (two calls with equal specs share one program).

    Attributes:
      batch: rows per call, padded to a multiple of the device count (see :func:`perflow_jax.sharding.padded_size`).
      height, width: image size in pixels (positive multiples of the VAE's downsampling factor).
      num_inference_steps: the step count the scheduler state is built for.
      start_step: the first step run: 0 for text-to-image; img2img skips the first ``steps · (1 − strength)``.
      use_cfg: classifier-free guidance (an unconditional branch); off for guidance scale ≤ 1, as in diffusers.
      zero_negative: SDXL without a negative prompt: the unconditional text embeddings are zeros.
      has_latents: the inputs carry initial latents (scaled by the scheduler's ``init_noise_sigma``).
      has_image: img2img: the inputs carry init images, encoded by the VAE and noised to ``start_step``.
      output_type: ``"uint8"`` or ``"float"`` (in [0, 1]) images, or ``"latent"``: the scaled latents
        (B, C, H/f, W/f) float32, undecoded (e.g. for :mod:`perflow_jax.pipelines.upscale`).
      ip_adapter: the inputs carry an image prompt (IP-Adapter image and scale).
    """

    batch: int
    height: int
    width: int
    num_inference_steps: int
    start_step: int = 0
    use_cfg: bool = True
    zero_negative: bool = False
    has_latents: bool = False
    has_image: bool = False
    output_type: str = "uint8"
    ip_adapter: bool = False

    def __post_init__(self) -> None:
        _check_output_type(self.output_type)
        if self.has_latents and self.has_image:
            raise ValueError("A generation starts from given latents or from an init image, not both.")
        if self.start_step < 0:
            raise ValueError(f"start_step must be ≥ 0, got {self.start_step}.")


class GenerationInputs(NamedTuple):
    """The batched inputs of one generation (rows = ``spec.batch``; absent parts are None).

    Attributes:
      ids: prompt token ids (B, L), or (B, 2, L) for SDXL's two tokenizers.
      neg_ids: negative-prompt token ids, same shape (the empty prompt when none was given).
      index: (B,) uint32 image index within the call: image i's noise comes from ``fold_in(key(seed), i)``.
      latents: (B, C, H/f, W/f) float32 initial latents, or None for seeded noise.
      image: (B, 3, H, W) float32 init images in [0, 1] (img2img), or None.
      ip_image: (B, 3, S, S) float32 CLIP pixel values of the image prompt (IP-Adapter), or None.
      ip_scale: (B,) float32 weight of the image prompt (traced: changing it never recompiles), or None.
    """

    ids: jax.Array
    neg_ids: jax.Array
    index: jax.Array
    latents: jax.Array | None = None
    image: jax.Array | None = None
    ip_image: jax.Array | None = None
    ip_scale: jax.Array | None = None


class GenerationRequest(NamedTuple):
    """A validated call, ready for :meth:`StableDiffusionPipeline.generate`.

    Attributes:
      spec: the static part (the compiled program's key).
      inputs: batched global arrays, sharded over the mesh's data axis and padded to ``spec.batch``.
      seed: uint32 scalar, replicated.
      guidance_scale: float32 scalar, replicated (a pipeline built on this one may carry a pytree of replicated
        scalars here that its :meth:`~StableDiffusionPipeline.program` reads, e.g. the ControlNet scales).
      num_images: rows before padding (the images returned).
    """

    spec: GenerationSpec
    inputs: GenerationInputs
    seed: jax.Array
    guidance_scale: jax.Array
    num_images: int


@dataclasses.dataclass
class GenerationStats:
    """Timings of the last call: compile (0 when cached) and run seconds, and compiled-program count."""

    compile_seconds: float = 0.0
    run_seconds: float = 0.0
    num_compiled: int = 0


class StableDiffusionPipeline:
    """SD1.x / SD2.x / SDXL text-to-image and img2img with any registered scheduler (PeRFlow by default).

    Build it with :meth:`from_pretrained`, then call :meth:`__call__` (text-to-image) or :meth:`img2img`; or run
    the stages yourself (see the module docstring). Building one never changes global state and never modifies
    the `components` passed in.

    Attributes:
      components: the pipeline's components. On a single-process float32 CPU pipeline this is a shallow copy of
        the ones passed in whose params are read-only NumPy views of :attr:`params` (the device copy *is* host
        memory there), so the weights are held once as soon as the caller drops their own components (as
        :meth:`from_pretrained` does); elsewhere it is the caller's object, untouched.
      params: ``{"unet", "vae", "text_encoder"[, "text_encoder_2"]}`` in ``dtype``, replicated over the mesh.
      stats: :class:`GenerationStats` of the last call.
      executable_cache: store each compiled generation program beside the persistent compilation cache (when it
        is on) and load it in later processes instead of tracing, lowering and compiling it again
        (:mod:`perflow_jax.executable_cache`; off by default, on in the CLI).
    """

    def __init__(self, components: PipelineComponents, scheduler: schedulers.Scheduler, *,
                 dtype: Any = jnp.float32, mesh: Mesh | None = None, decode_chunk_size: int | None = None,
                 attention_implementation: str | None = None, attention_chunk_size: int | None = None,
                 vae_tile_size: int | None = None, executable_cache: bool = False):
        c = components
        self.executable_cache = executable_cache
        self.scheduler = scheduler
        self.family = model_family(c)
        self.defaults = FAMILY_DEFAULTS[self.family]
        self.dtype = jnp.dtype(dtype)
        self.mesh = mesh if mesh is not None else sharding.data_mesh()
        self._replicated = sharding.replicated(self.mesh)
        self._batch = sharding.batch_sharded(self.mesh)
        self.unet = UNet2DConditionModel(c.unet_config, dtype=self.dtype,
                                         attention_implementation=attention_implementation,
                                         attention_chunk_size=attention_chunk_size)
        self.vae = AutoencoderKL(c.vae_config, dtype=self.dtype, decode_chunk_size=decode_chunk_size)
        self.text_encoder = CLIPTextModel(c.text_encoder_config, dtype=self.dtype)
        self.text_encoder_2 = (CLIPTextModelWithProjection(c.text_encoder_2_config, dtype=self.dtype)
                               if c.text_encoder_2_config is not None else None)
        params = {"unet": c.unet_params, "vae": c.vae_params, "text_encoder": c.text_encoder_params}
        if c.text_encoder_2_params is not None:
            params["text_encoder_2"] = c.text_encoder_2_params
        # Cast leaf by leaf (no second full host copy), then replicate.
        self.params = jax.tree_util.tree_map(
            lambda a: sharding.global_array(np.asarray(a, self.dtype), self._replicated), params)
        self.components = self._own_components(c)
        self.vae_scale_factor = 2 ** (len(c.vae_config.block_out_channels) - 1)
        if vae_tile_size is not None:
            values.check_int("vae_tile_size", vae_tile_size, min_value=4 * self.vae_scale_factor)
            if vae_tile_size % (4 * self.vae_scale_factor):
                raise ValueError(f"vae_tile_size must be a multiple of {4 * self.vae_scale_factor} pixels (4 latents), "
                                 f"got {vae_tile_size}.")
        self.vae_tile_size = vae_tile_size
        self.force_zeros_for_empty_prompt = bool(c.model_index.get("force_zeros_for_empty_prompt", True))
        self.image_prompt: ImagePrompt | None = None
        self._states: dict[tuple, Any] = {}
        self._compiled: dict[GenerationSpec, Any] = {}
        self.stats = GenerationStats()

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str, *, base: str | None = None, delta: str | None = None,
                        delta_variant: str | None = None, delta_is_merged: bool = False, delta_base: str | None = None,
                        loras: Sequence[tuple[str, float]] = (), scheduler: str = "perflow",
                        scheduler_overrides: dict[str, Any] | None = None, dtype: Any = jnp.float32,
                        variant: str | None = None, allow_pickle: bool = False, local_files_only: bool = False,
                        ip_adapter: str | None = None, image_encoder: str | None = None,
                        **kwargs: Any) -> StableDiffusionPipeline:
        """Load a model, merge an optional PeRFlow ΔW and LoRAs, and pick a scheduler.

        Args:
          path_or_repo_id: a diffusers-format folder, a Hugging Face repo id (from the local cache, else
            downloaded: only configs, tokenizer files and the weights of `variant`), or a single-file LDM/SGM
            ``.safetensors`` checkpoint (then `base` is required).
          base: for a single file: a diffusers folder of the same family (tokenizers, scheduler, configs).
          delta: PeRFlow ΔW (``delta_weights.safetensors``, its folder, a UNet-format ΔW folder, or a repo id
            such as ``"hansyan/perflow-sd15-delta-weights"``).
          delta_variant: the ΔW folder's weights variant (``"v0-1"``); default: its plain file, else its single
            variant file (several variants are refused, listed).
          delta_is_merged: `delta` holds merged PeRFlow UNet weights (a released pipeline or its ``unet/``);
            ΔW = merged − the UNet of `delta_base`.
          delta_base: with `delta_is_merged`: the pipeline or UNet the merged weights were made from (folder or
            repo id); default: this model's own UNet.
          loras: ``(file, scale)`` pairs in the diffusers/PEFT or kohya layout, merged after ΔW.
          scheduler: registry name (``"perflow"``, ``"ddim"``, ...) or a diffusers class name.
          scheduler_overrides: config fields overriding the model's scheduler config.
          dtype: compute and param dtype (``jnp.bfloat16`` / ``jnp.float16`` halve memory).
          variant: weights variant such as ``"fp16"``.
          allow_pickle: allow ``.bin`` PyTorch pickles (needs torch; only for files you trust).
          local_files_only: never download (as ``HF_HUB_OFFLINE=1``): repo ids must be in the local cache.
          ip_adapter, image_encoder: an IP-Adapter file and its CLIP image encoder folder (see
            :meth:`load_ip_adapter`); it adds to the ΔW- and LoRA-merged UNet.
          kwargs: passed to the constructor (mesh, decode_chunk_size, attention options, executable_cache,
            vae_tile_size: encode and decode images larger than this many pixels in blended tiles, see
            :mod:`perflow_jax.models.vae_tiling`).
        """
        if ip_adapter is None and image_encoder is not None:
            raise ValueError("image_encoder= is only used with ip_adapter=; pass the IP-Adapter file too.")
        components = load_components(path_or_repo_id, base=base, delta=delta, delta_variant=delta_variant,
                                     delta_is_merged=delta_is_merged, delta_base=delta_base, loras=loras,
                                     variant=variant, allow_pickle=allow_pickle, local_files_only=local_files_only)
        if ip_adapter is not None:  # checked before the pipeline is built
            loaded = load_image_prompt(ip_adapter, components.unet_config, image_encoder=image_encoder,
                                       model_path=components.path, dtype=dtype)
        pipe = cls(components, make_scheduler(components, scheduler, scheduler_overrides), dtype=dtype, **kwargs)
        if ip_adapter is not None:
            pipe._set_image_prompt(*loaded)
        return pipe

    def load_ip_adapter(self, path: str | os.PathLike, image_encoder: str | os.PathLike | None = None) -> None:
        """Add an IP-Adapter (``ip-adapter*.safetensors``, IP-Adapter or Plus, released layout) and its CLIP image
        encoder to this pipeline, replacing any loaded before; then pass ``ip_adapter_image=`` (and
        ``ip_adapter_scale=``) to :meth:`__call__` or :meth:`img2img`.

        `image_encoder` defaults to the model's ``image_encoder/`` folder, else the one next to `path`. The
        adapter's ``to_k_ip``/``to_v_ip`` layers join the current UNet params (after any ΔW or LoRA); the
        compiled-program cache is cleared.
        """
        self._set_image_prompt(*load_image_prompt(path, self.components.unet_config, image_encoder=image_encoder,
                                                  model_path=self.components.path, dtype=self.dtype))

    def _set_image_prompt(self, prompt: ImagePrompt, params: dict, unet_ip: dict) -> None:
        put = lambda t: jax.tree_util.tree_map(  # noqa: E731
            lambda a: sharding.global_array(np.asarray(a, self.dtype), self._replicated), t)
        self.params = {**self.params, "unet": merge_ip_adapter(self.params["unet"], put(unet_ip)), **put(params)}
        self.image_prompt = prompt
        self._compiled.clear()

    def _own_components(self, components: PipelineComponents) -> PipelineComponents:
        """`components` with params that share :attr:`params`' memory where the device copy is host memory (one
        process, CPU devices, float32); else `components` itself. Never modifies `components`.

        Converted params are 64-byte-aligned buffers that XLA:CPU adopts without copying, so there the device
        params already share the caller's memory; the views extend that to any other host arrays (e.g. LoRA-merged
        NumPy params), whose copies are then freed once the caller drops `components`.
        """
        if (jax.process_count() > 1 or self.dtype != jnp.float32
                or any(d.platform != "cpu" for d in self.mesh.devices.flat)):
            return components
        view = lambda t: jax.tree_util.tree_map(np.asarray, t)  # noqa: E731  zero-copy, read-only on CPU
        p = self.params
        return dataclasses.replace(
            components, unet_params=view(p["unet"]), vae_params=view(p["vae"]),
            text_encoder_params=view(p["text_encoder"]),
            text_encoder_2_params=view(p["text_encoder_2"]) if "text_encoder_2" in p else None)

    # ------------------------------------------------------------------------------------------------------
    # Calls
    # ------------------------------------------------------------------------------------------------------

    def __call__(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None, *,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None, seed: int = 0,
                 height: int | None = None, width: int | None = None, num_images_per_prompt: int = 1,
                 latents: np.ndarray | None = None, output_type: str = "uint8", first_index: int = 0,
                 ip_adapter_image: Any = None, ip_adapter_scale: float = 1.0) -> np.ndarray:
        """Generate images for `prompt` (NHWC, uint8 or float in [0, 1] with ``output_type="float"``; the scaled
        latents, undecoded, with ``output_type="latent"``).

        ``latents`` (B, 4, H/8, W/8) replaces the seeded initial noise (it is scaled by the scheduler's
        ``init_noise_sigma`` as in diffusers). ``guidance_scale`` ≤ 1 turns classifier-free guidance off, as
        in diffusers. ``first_index`` is the run index of this call's first image (see :meth:`build_request`).
        ``ip_adapter_image`` (one image, or one per prompt: files, PIL images or RGB arrays) is an image prompt
        for the IP-Adapter loaded with :meth:`load_ip_adapter`, weighted by ``ip_adapter_scale`` (traced).
        """
        return self.generate(self.build_request(
            prompt, negative_prompt, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            seed=seed, height=height, width=width, num_images_per_prompt=num_images_per_prompt, latents=latents,
            output_type=output_type, first_index=first_index, ip_adapter_image=ip_adapter_image,
            ip_adapter_scale=ip_adapter_scale))

    def img2img(self, prompt: str | Sequence[str], image: np.ndarray, strength: float = 0.6,
                negative_prompt: str | Sequence[str] | None = None, *, num_inference_steps: int | None = None,
                guidance_scale: float | None = None, seed: int = 0, num_images_per_prompt: int = 1,
                output_type: str = "uint8", first_index: int = 0, ip_adapter_image: Any = None,
                ip_adapter_scale: float = 1.0) -> np.ndarray:
        """Re-generate `image` (NHWC uint8, or float in [0, 1]; one image or one per prompt) from strength·T.

        As in diffusers, the last ``int(steps · strength)`` steps run, starting from the encoded image noised
        to the first of them; the VAE encoding is sampled with the seed. ``ip_adapter_image`` and
        ``ip_adapter_scale`` as in :meth:`__call__`.
        """
        return self.generate(self.build_request(
            prompt, negative_prompt, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            seed=seed, num_images_per_prompt=num_images_per_prompt, image=image, strength=strength,
            output_type=output_type, first_index=first_index, ip_adapter_image=ip_adapter_image,
            ip_adapter_scale=ip_adapter_scale))

    def generate(self, request: GenerationRequest) -> np.ndarray:
        """Run :meth:`program` for ``request.spec`` (compiled on first use, then cached by spec; with
        ``executable_cache=True`` and the compilation cache on, a later process loads the stored executable:
        :mod:`perflow_jax.executable_cache`) and gather the images to the host, padding rows dropped. Updates
        :attr:`stats`."""
        spec = request.spec
        state = self.scheduler_state(spec.num_inference_steps, self.latent_shape(spec))
        args = (self.params, state, request.inputs, request.seed, request.guidance_scale)
        describe = (lambda: self._program_description(spec)) if self.executable_cache else None
        images, self.stats = run_cached(self._compiled, spec, self.program, args, self.mesh, request.num_images,
                                        describe=describe)
        return images

    def _program_description(self, spec: GenerationSpec) -> str:
        """Everything :meth:`program` is built from besides its arguments' avals: the spec, the models (their
        configs, dtypes and attention options), the scheduler, the VAE scaling and the mesh."""
        image_prompt = self.image_prompt
        return repr((type(self).__module__, type(self).__qualname__, spec, self.unet, self.vae, self.text_encoder,
                     self.text_encoder_2, self.scheduler.name, self.scheduler.config, self.components.vae_config,
                     self.mesh, self.vae_tile_size, getattr(self, "controlnets", None),
                     None if image_prompt is None else (image_prompt.adapter, image_prompt.encoder,
                                                        image_prompt.dtype)))

    # ------------------------------------------------------------------------------------------------------
    # Host side: validation, tokenisation, batching
    # ------------------------------------------------------------------------------------------------------

    def build_request(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None, *,
                      num_inference_steps: int | None = None, guidance_scale: float | None = None, seed: int = 0,
                      height: int | None = None, width: int | None = None, num_images_per_prompt: int = 1,
                      latents: np.ndarray | None = None, image: np.ndarray | None = None, strength: float = 1.0,
                      output_type: str = "uint8", first_index: int = 0, ip_adapter_image: Any = None,
                      ip_adapter_scale: float = 1.0) -> GenerationRequest:
        """Validate a call and build its :class:`GenerationRequest` (arguments as :meth:`__call__`; `image` and
        `strength` as :meth:`img2img`). Raises ValueError naming the bad argument; compiles nothing.

        `first_index` numbers this call's images from it: image i draws its noise from
        ``fold_in(key(seed), first_index + i)``. A long run split into calls of any size with the same seed and
        ``first_index`` = the number of images before the call thus gets the images of one big call (except for
        ancestral schedulers, whose step noise is drawn per call)."""
        steps = self.defaults.num_inference_steps if num_inference_steps is None else num_inference_steps
        guidance = self.defaults.guidance_scale if guidance_scale is None else guidance_scale
        prompts = _as_list(prompt, "prompt")
        negatives = None
        if negative_prompt is not None:
            negatives = _as_list(negative_prompt, "negative_prompt")
            if len(negatives) == 1:
                negatives = negatives * len(prompts)
            if len(negatives) != len(prompts):
                raise ValueError(f"Got {len(negatives)} negative prompts for {len(prompts)} prompts; pass one "
                                 "negative prompt or one per prompt.")
        steps = values.check_int("num_inference_steps", steps, min_value=1)
        guidance = values.check_float("guidance_scale", guidance, min_value=0.0)
        values.check_int("seed", seed)  # any int: taken modulo 2**32
        _check_output_type(output_type)
        if isinstance(first_index, bool) or not isinstance(first_index, int | np.integer) or first_index < 0:
            raise ValueError(f"first_index must be an integer ≥ 0, got {first_index!r}.")
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be ≥ 1, got {num_images_per_prompt}.")
        if image is not None and not 0.0 < values.check_float("strength", strength) <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}.")
        if image is not None and latents is not None:
            raise ValueError("Pass latents or an init image, not both.")
        ip_scale = check_ip_scale(ip_adapter_scale)
        if ip_adapter_image is not None and self.image_prompt is None:
            raise ValueError("ip_adapter_image needs an IP-Adapter: load one first (pipe.load_ip_adapter(FILE) or "
                             "from_pretrained(..., ip_adapter=FILE)).")
        per = num_images_per_prompt
        prompts = [p for p in prompts for _ in range(per)]
        negatives = [p for p in negatives for _ in range(per)] if negatives is not None else None
        n = len(prompts)
        if int(first_index) + sharding.padded_size(n, self.mesh) > 2**32:
            raise ValueError(f"first_index {first_index} + {n} images exceeds 2**32 image indices.")

        ip_images = None
        if ip_adapter_image is not None:
            ip_images = self.image_prompt.preprocess(ip_adapter_image, n, per)
        init_images = None
        if image is not None:
            init_images = _prepare_images(image, n)
            height, width = init_images.shape[2:]
        height, width = self._check_size(height, width)
        padded = sharding.padded_size(n, self.mesh)
        latent_shape = self._latent_shape(padded, height, width)
        if latents is not None:
            latents = np.asarray(latents, np.float32)
            if latents.shape != (n, *latent_shape[1:]):
                raise ValueError(f"latents must have shape {(n, *latent_shape[1:])} (NCHW) for {n} images of "
                                 f"{height}×{width}, got {latents.shape}.")

        num_steps = int(self.scheduler_state(steps, latent_shape).timesteps.shape[0])
        start = num_steps - min(int(num_steps * strength), num_steps) if image is not None else 0
        if start >= num_steps:
            raise ValueError(f"strength {strength} with {num_steps} steps leaves no step to run; raise strength "
                             "or num_inference_steps.")
        spec = GenerationSpec(
            batch=padded, height=height, width=width, num_inference_steps=steps, start_step=start,
            # As in diffusers: guidance_scale ≤ 1 means no classifier-free guidance (conditional model only);
            # e.g. guidance_scale=0 is the usual "off" for distilled models, not the unconditional model.
            use_cfg=guidance > 1.0,
            zero_negative=negatives is None and self.family == "sdxl" and self.force_zeros_for_empty_prompt,
            has_latents=latents is not None, has_image=init_images is not None, output_type=output_type,
            ip_adapter=ip_images is not None)

        pad = lambda a: None if a is None else _pad_rows(a, padded)  # noqa: E731
        inputs = GenerationInputs(
            ids=pad(self.tokenize(prompts)), neg_ids=pad(self.tokenize(negatives or [""] * n)),
            index=np.arange(int(first_index), int(first_index) + padded, dtype=np.uint32), latents=pad(latents),
            image=pad(init_images), ip_image=pad(ip_images),
            ip_scale=None if ip_images is None else np.full((padded,), ip_scale, np.float32))
        return GenerationRequest(
            spec=spec, inputs=sharding.global_tree(inputs, self._batch),
            seed=sharding.global_array(np.uint32(seed % 2**32), self._replicated),
            guidance_scale=sharding.global_array(np.float32(guidance), self._replicated), num_images=n)

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        """Token ids (B, L), or (B, 2, L) for SDXL's two tokenizers, padded to the tokenizer's max length."""
        def ids(tok: Any) -> np.ndarray:
            out = tok(list(texts), padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="np")
            return np.asarray(out["input_ids"], np.int32)

        if self.text_encoder_2 is None:
            return ids(self.components.tokenizer)
        return np.stack([ids(self.components.tokenizer), ids(self.components.tokenizer_2)], axis=1)

    def estimate_image_bytes(self, height: int | None = None, width: int | None = None) -> int:
        """An upper estimate of the device memory one image of `height` × `width` takes in a compiled generation
        (float32 activations, classifier-free guidance on), from the UNet and VAE configs; weights not included.

        - UNet: both CFG rows' float32 attention scores at the block with the most ``heads × tokens²`` (tokens:
          latent pixels at that block; a query chunk of ``attention_chunk_size`` if set), plus 48 float32 feature
          maps of the first block (``block_out_channels[0]`` channels at latent resolution);
        - VAE decode: 7 float32 feature maps of the VAE's first block width at full image resolution.

        The larger of the two counts: the stages run one after the other. Against XLA's own count (CPU, float32,
        one image; see docs/pipelines.md): SD1.5 512²: UNet 1.26 GiB (estimate 1.47), VAE 0.88 GiB (0.88);
        SD1.5 768²: UNet 5.82 GiB (6.12), VAE 1.97 GiB (1.97); SDXL 1024²: UNet 1.96 GiB (3.13), VAE 3.50 GiB
        (3.50).
        """
        height, width = self._check_size(height, width)
        c, f = self.components.unet_config, self.vae_scale_factor
        h, w = height // f, width // f
        chunk = self.unet.attention_chunk_size
        scores = 0
        for level, (kind, heads) in enumerate(zip(c.down_block_types, c.per_block("heads"), strict=True)):
            tokens = -(-h // 2**level) * -(-w // 2**level)
            if "CrossAttn" in kind:
                scores = max(scores, heads * min(tokens, chunk or tokens) * tokens)
        unet = 2 * 4 * scores + 2 * 48 * 4 * c.block_out_channels[0] * h * w
        vae = 7 * 4 * self.components.vae_config.block_out_channels[0] * height * width
        return int(max(unet, vae))

    def default_batch_size(self, height: int | None = None, width: int | None = None,
                           budget_bytes: int | None = None) -> int:
        """Images per call that fit `budget_bytes` per device by :meth:`estimate_image_bytes`, times the number
        of devices (at least one per device). The default budget is half the free memory of the fullest device
        where JAX reports it (GPUs, TPUs), else 8 GiB (CPU)."""
        per_image = self.estimate_image_bytes(height, width)
        if budget_bytes is None:
            budget_bytes = DEFAULT_BATCH_MEMORY
            stats = [d.memory_stats() for d in self.mesh.devices.flat if d.process_index == jax.process_index()]
            free = [s["bytes_limit"] - s.get("bytes_in_use", 0) for s in stats if s and "bytes_limit" in s]
            if free:
                budget_bytes = max(min(free), 0) // 2
        return max(1, int(budget_bytes) // per_image) * self.mesh.size

    def latent_shape(self, spec: GenerationSpec) -> tuple[int, int, int, int]:
        """The (batch, channels, H/f, W/f) shape of the latents for `spec`."""
        return self._latent_shape(spec.batch, spec.height, spec.width)

    def scheduler_state(self, num_inference_steps: int, sample_shape: tuple[int, ...]) -> Any:
        """The (cached, replicated) scheduler state for a step count and latent batch shape (multistep
        schedulers size their history by it). Arrays keep their dtypes (float32, int32 timesteps)."""
        key = (num_inference_steps, tuple(sample_shape))
        if key not in self._states:
            state = self.scheduler.set_timesteps(num_inference_steps, sample_shape=tuple(sample_shape))
            self._states[key] = sharding.global_tree(state, self._replicated)
        return self._states[key]

    def _latent_shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
        f = self.vae_scale_factor
        return batch, self.components.unet_config.in_channels, height // f, width // f

    def _check_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        f = self.vae_scale_factor
        default = (self.components.unet_config.sample_size or 64) * f
        height, width = height or default, width or default
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, int | np.integer) or v <= 0 or v % f:
                raise ValueError(f"{name} must be a positive multiple of {f} (the VAE's downsampling factor), "
                                 f"got {v!r}.")
        return int(height), int(width)

    # ------------------------------------------------------------------------------------------------------
    # Device side: the stages (pure in `params`; `spec` and `size` are static under jit)
    # ------------------------------------------------------------------------------------------------------

    def program(self, spec: GenerationSpec) -> Callable[..., jax.Array]:
        """The whole generation for `spec`: ``fn(params, state, inputs, seed, guidance_scale) -> images``, the
        four stages in order. :meth:`generate` jits it with explicit shardings and caches it by `spec`."""

        def program(params: Any, state: Any, inputs: GenerationInputs, seed: jax.Array,
                    guidance_scale: jax.Array) -> jax.Array:
            size = (spec.height, spec.width)
            cond = self.encode_prompt(params, inputs.ids, size)
            uncond = (self.encode_prompt(params, inputs.neg_ids, size, zero_text=spec.zero_negative)
                      if spec.use_cfg else None)
            if spec.ip_adapter:
                cond, uncond = self.encode_image_prompt(params, inputs, cond, uncond)
            x = self.prepare_latents(params, spec, state, inputs, seed)
            x = self.denoise(params, spec, state, x, cond, uncond, guidance_scale, seed)
            return x if spec.output_type == "latent" else self.decode(params, x, spec.output_type)

        return program

    def encode_prompt(self, params: Any, ids: jax.Array, size: tuple[int, int], *, zero_text: bool = False
                      ) -> UNetCondition:
        """Token ids (from :meth:`tokenize`) → the UNet's condition: text embeddings, plus for SDXL the pooled
        text embedding and the time ids of an image of `size` = (height, width).

        `zero_text` (SDXL's convention for an absent negative prompt) zeroes the text embeddings; time ids stay.
        """
        b = ids.shape[0]
        if self.text_encoder_2 is None:
            chex.assert_rank(ids, 2, custom_message="token ids must be (B, L)")
            hidden = self.text_encoder.apply({"params": params["text_encoder"]}, ids).last_hidden_state
            cond = UNetCondition(encoder_hidden_states=hidden)
        else:
            chex.assert_shape(ids, (b, 2, None), custom_message="SDXL token ids must be (B, 2, L)")
            out1 = self.text_encoder.apply({"params": params["text_encoder"]}, ids[:, 0])
            out2 = self.text_encoder_2.apply({"params": params["text_encoder_2"]}, ids[:, 1])
            hidden = jnp.concatenate([out1.hidden_states[-2], out2.hidden_states[-2]], axis=-1)
            cond = UNetCondition(encoder_hidden_states=hidden, text_embeds=out2.text_embeds,
                                 time_ids=adapter.sdxl_time_ids(b, size))
        if zero_text:
            cond = cond._replace(encoder_hidden_states=jnp.zeros_like(cond.encoder_hidden_states),
                                 text_embeds=None if cond.text_embeds is None else jnp.zeros_like(cond.text_embeds))
        return cond

    def encode_image_prompt(self, params: Any, inputs: GenerationInputs, cond: UNetCondition,
                            uncond: UNetCondition | None) -> tuple[UNetCondition, UNetCondition | None]:
        """Add the IP-Adapter image tokens of ``inputs.ip_image`` (weighted by ``inputs.ip_scale``) to `cond`,
        and the unconditional image tokens (diffusers' convention, see :mod:`perflow_jax.pipelines.image_prompt`)
        to `uncond`."""
        if self.image_prompt is None:
            raise ValueError("This pipeline has no IP-Adapter; load one with load_ip_adapter().")
        tokens, neg_tokens = self.image_prompt.encode(params, inputs.ip_image)
        cond = cond._replace(ip_tokens=tokens, ip_scale=inputs.ip_scale)
        if uncond is not None:
            uncond = uncond._replace(ip_tokens=neg_tokens, ip_scale=inputs.ip_scale)
        return cond, uncond

    def prepare_latents(self, params: Any, spec: GenerationSpec, state: Any, inputs: GenerationInputs,
                        seed: jax.Array) -> jax.Array:
        """The float32 latents the loop starts from, (B, C, H/f, W/f): image i's seeded noise (or the given
        latents) times the scheduler's ``init_noise_sigma``; for img2img the VAE-encoded image noised to
        ``spec.start_step`` with that noise."""
        shape = self.latent_shape(spec)
        chex.assert_shape(inputs.index, (shape[0],), custom_message="inputs.index must be (spec.batch,)")
        sigma = self.scheduler.init_noise_sigma(state)
        keys = _image_keys(seed, inputs.index)
        if spec.has_latents:
            chex.assert_shape(inputs.latents, shape, custom_message="inputs.latents must be (B, C, H/f, W/f)")
            x = inputs.latents * sigma
        else:
            x = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), shape[1:]))(keys) * sigma
        if not spec.has_image:
            return x
        chex.assert_shape(inputs.image, (shape[0], 3, spec.height, spec.width),
                          custom_message="inputs.image must be (B, 3, H, W)")
        z0 = encode_images(self.vae, params["vae"], self.components.vae_config, inputs.image, keys,
                           tile=self._vae_tile_latents())
        t = jnp.full((shape[0],), state.timesteps[spec.start_step])
        return self.scheduler.add_noise(z0, x, t, state)

    def model_fn(self, params: Any) -> adapter.ModelFn:
        """The UNet as ``model_fn(x, timesteps, cond) -> float32`` (:func:`perflow_jax.models.adapter.unet_fn`)."""
        return adapter.unet_fn(self.unet, params["unet"])

    def denoise(self, params: Any, spec: GenerationSpec, state: Any, latents: jax.Array, cond: UNetCondition,
                uncond: UNetCondition | None, guidance_scale: jax.typing.ArrayLike, seed: jax.typing.ArrayLike
                ) -> jax.Array:
        """Run the scheduler's steps from ``spec.start_step`` on `latents` (:func:`perflow_jax.sampling.sample`):
        with classifier-free guidance over [uncond; cond] when ``spec.use_cfg``, else the conditional model.
        Ancestral schedulers draw step noise from ``fold_in(key(seed), 2**31)``."""
        model = self.model_fn(params)
        if spec.use_cfg:
            if uncond is None:
                raise ValueError("spec.use_cfg needs an unconditional condition (encode the negative prompt).")
            denoiser = sampling.classifier_free_guidance(model, cond, uncond, guidance_scale)
        else:
            denoiser = sampling.conditional(model, cond)
        key = jax.random.fold_in(jax.random.key(seed), STEP_NOISE_FOLD)
        return sampling.sample(self.scheduler, state, denoiser, latents, key=key, start_step=spec.start_step)

    def decode(self, params: Any, latents: jax.Array, output_type: str = "float") -> jax.Array:
        """UNet latents → NHWC images: float32 in [0, 1], or uint8 with ``output_type="uint8"``."""
        return decode_latents(self.vae, params["vae"], self.components.vae_config, latents, output_type,
                              tile=self._vae_tile_latents())

    def vae_encode(self, params: Any, images: jax.Array) -> LatentDistribution:
        """VAE posterior of images (B, 3, H, W) in [-1, 1]; in blended tiles (:mod:`perflow_jax.models.vae_tiling`)
        when the pipeline has a ``vae_tile_size`` smaller than the image."""
        return vae_posterior(self.vae, params["vae"], images, self._vae_tile_latents())

    def vae_decode(self, params: Any, latents: jax.Array) -> jax.Array:
        """Unscaled latents → images in about [-1, 1]; tiled like :meth:`vae_encode`."""
        return vae_pixels(self.vae, params["vae"], latents, self._vae_tile_latents())

    def _vae_tile_latents(self) -> int | None:
        return None if self.vae_tile_size is None else self.vae_tile_size // self.vae_scale_factor


def vae_posterior(vae: AutoencoderKL, vae_params: Any, images: jax.Array, tile: int | None = None
                  ) -> LatentDistribution:
    """VAE posterior of images (B, 3, H, W) in [-1, 1]; in blended tiles of `tile` latents
    (:mod:`perflow_jax.models.vae_tiling`) when `tile` is given and the image is larger than one tile."""
    if tile is None or max(images.shape[2:]) <= tile * vae.config.downscale_factor:
        return vae.apply({"params": vae_params}, images, method=AutoencoderKL.encode)
    return vae_tiling.tiled_encode(vae, vae_params, images, tile, tile // 4)


def vae_pixels(vae: AutoencoderKL, vae_params: Any, latents: jax.Array, tile: int | None = None) -> jax.Array:
    """Unscaled latents (B, C, h, w) → images in about [-1, 1]; tiled like :func:`vae_posterior`."""
    if tile is None or max(latents.shape[2:]) <= tile:
        return vae.apply({"params": vae_params}, latents, method=AutoencoderKL.decode)
    return vae_tiling.tiled_decode(vae, vae_params, latents, tile, tile // 4)


def encode_images(vae: AutoencoderKL, vae_params: Any, vae_config: Any, images: jax.Array, keys: jax.Array,
                  tile: int | None = None) -> jax.Array:
    """(B, 3, H, W) images in [0, 1] → scaled float32 UNet latents, each a sample of the VAE posterior drawn with
    ``fold_in(keys[i], 1)`` (image i's key; see the module docstring); tiled as :func:`vae_posterior`."""
    dist = vae_posterior(vae, vae_params, images * 2.0 - 1.0, tile)
    enc_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
    z = jax.vmap(_sample_latent)(dist.mean, dist.logvar, enc_keys)
    return scale_latents(z.astype(jnp.float32), vae_config)


def decode_latents(vae: AutoencoderKL, vae_params: Any, vae_config: Any, latents: jax.Array,
                   output_type: str = "float", tile: int | None = None) -> jax.Array:
    """Scaled UNet latents → NHWC images in `vae`'s dtype: float32 in [0, 1], or uint8 with
    ``output_type="uint8"``; tiled as :func:`vae_pixels`."""
    if output_type not in IMAGE_TYPES:
        raise ValueError(f"decode output_type must be 'uint8' or 'float', got {output_type!r}.")
    z = unscale_latents(latents, vae_config).astype(vae.dtype)
    image = vae_pixels(vae, vae_params, z, tile)
    image = jnp.clip(image.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)
    return jnp.round(image * 255).astype(jnp.uint8) if output_type == "uint8" else image


def run_cached(cache: dict, spec: Any, program: Callable[[Any], Callable[..., jax.Array]], args: tuple, mesh: Mesh,
               rows: int, describe: Callable[[], str] | None = None) -> tuple[np.ndarray, GenerationStats]:
    """Run ``program(spec)`` on ``args = (params, state, inputs, seed, guidance_scale)``: jitted with params,
    state, seed and guidance replicated and inputs and output batch-sharded over `mesh`, compiled on first use
    and kept in `cache` by `spec`. With `describe` (everything the program is built from besides its arguments),
    a later process loads the stored executable (:mod:`perflow_jax.executable_cache`). Returns the output's first
    `rows` rows on the host, and the timings."""
    t0 = time.perf_counter()
    compiled = cache.get(spec)
    if compiled is None:
        rep, batch = sharding.replicated(mesh), sharding.batch_sharded(mesh)
        fn = jax.jit(program(spec), in_shardings=(rep, rep, batch, rep, rep), out_shardings=batch)
        if describe is not None:
            compiled = executable_cache.load_or_compile(describe(), args, lambda: fn.lower(*args))
        else:
            compiled = fn.lower(*args).compile()
        cache[spec] = compiled
    t1 = time.perf_counter()
    out = sharding.to_host(compiled(*args))[:rows]
    return out, GenerationStats(t1 - t0, time.perf_counter() - t1, len(cache))


def load_components(path_or_repo_id: str, *, base: str | None = None, delta: str | None = None,
                    delta_variant: str | None = None, delta_is_merged: bool = False, delta_base: str | None = None,
                    loras: Sequence[tuple[str, float]] = (), variant: str | None = None,
                    allow_pickle: bool = False, local_files_only: bool = False) -> PipelineComponents:
    """Components from a diffusers folder / repo id or a single-file checkpoint, then ΔW, then LoRAs (the
    arguments are :meth:`StableDiffusionPipeline.from_pretrained`'s).

    ΔW is merged first because it is defined against the exact base weights (and checked against the whole
    UNet); LoRAs are stacked on whatever model they are loaded into. LoRA scales are checked (finite numbers)
    before anything is loaded.
    """
    loras = [(f, values.check_float(f"The scale of LoRA {f!r}", scale)) for f, scale in loras]
    if delta is None and (delta_variant is not None or delta_is_merged or delta_base is not None):
        raise ValueError("delta_variant, delta_is_merged and delta_base (--delta-variant, --delta-is-merged, "
                         "--delta-base) describe a ΔW: pass delta= (--delta) too, or leave them out.")
    delta_lib.check_delta_options(delta_is_merged, delta_base)
    if os.path.isfile(path_or_repo_id):
        components = load_single_file(path_or_repo_id, base=base)
    else:
        if base is not None:
            raise ValueError("base= is only used with a single-file checkpoint; a diffusers folder has its own "
                             "tokenizers and scheduler.")
        components = load_pipeline_components(path_or_repo_id, variant=variant, allow_pickle=allow_pickle,
                                              local_files_only=local_files_only)
    if delta is not None:
        loaded = delta_lib.read_delta(delta, components.unet_params, variant=delta_variant,
                                      is_merged=delta_is_merged, base=delta_base, local_files_only=local_files_only)
        try:
            components.unet_params = delta_lib.merge(components.unet_params, loaded)
        except ValueError as e:
            raise ValueError(f"ΔW {delta!r}: {e}") from e
    if loras:
        components = merge_loras(components, [(load_lora(f), scale) for f, scale in loras])
    return components


def make_scheduler(components: PipelineComponents, name: str = "perflow",
                   overrides: dict[str, Any] | None = None) -> schedulers.Scheduler:
    """The scheduler for these components: PeRFlow from the model's PeRFlow config or family defaults; any
    other registered scheduler from the model's own ``scheduler_config.json``."""
    overrides = overrides or {}
    resolved = schedulers.resolve_name(name)
    if resolved == "perflow":
        return schedulers.from_config(perflow_config_dict(components), **overrides)
    if components.scheduler_config is None:
        raise FileNotFoundError(f"{components.path!r} has no scheduler/scheduler_config.json to build the "
                                f"{name!r} scheduler from.")
    return schedulers.from_config(components.scheduler_config, name=resolved, **overrides)


# ----------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------


def _as_list(x: str | Sequence[str], what: str) -> list[str]:
    items = [x] if isinstance(x, str) else list(x)
    if not items or not all(isinstance(p, str) for p in items):
        raise ValueError(f"{what} must be a non-empty string or list of strings, got {x!r}.")
    return items


def _check_output_type(output_type: str) -> None:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be 'uint8', 'float' or 'latent', got {output_type!r}.")


def _pad_rows(a: np.ndarray, rows: int) -> np.ndarray:
    """`a` with its last row repeated up to `rows` rows (padding for the device count; trimmed after)."""
    return np.concatenate([a, np.repeat(a[-1:], rows - len(a), axis=0)]) if rows > len(a) else a


def _prepare_images(image: np.ndarray, n: int, what: str = "init image") -> np.ndarray:
    """NHWC uint8/float [0, 1] image(s) → (n, 3, H, W) float32 in [0, 1]; errors name the image as `what`."""
    img = np.asarray(image)
    if img.ndim == 3:
        img = img[None]
    if img.ndim != 4 or img.shape[-1] != 3:
        raise ValueError(f"{what} must be (H, W, 3) or (B, H, W, 3) RGB, got shape {img.shape}"
                         f"{' (convert a grayscale or RGBA image to RGB first)' if img.ndim in (2, 4) else ''}.")
    if img.dtype != np.uint8 and not np.issubdtype(img.dtype, np.floating):
        raise ValueError(f"{what} must be uint8 or float in [0, 1], got dtype {img.dtype}.")
    img = img.astype(np.float32) / 255.0 if img.dtype == np.uint8 else img.astype(np.float32)
    if not np.all(np.isfinite(img)):
        raise ValueError(f"{what} has non-finite values (NaN or inf).")
    if img.shape[0] == 1:
        img = np.repeat(img, n, axis=0)
    if img.shape[0] != n:
        raise ValueError(f"Got {img.shape[0]} {what}s for {n} outputs; pass one image or one per output.")
    return img.transpose(0, 3, 1, 2)


def _image_keys(seed: jax.typing.ArrayLike, index: jax.Array) -> jax.Array:
    """Image i's PRNG key: ``fold_in(key(seed), i)``, whatever the batch split."""
    base = jax.random.key(seed)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(index)


def _sample_latent(mean: jax.Array, logvar: jax.Array, key: jax.Array) -> jax.Array:
    eps = jax.random.normal(key, mean.shape, jnp.float32)
    return mean.astype(jnp.float32) + jnp.exp(0.5 * logvar.astype(jnp.float32)) * eps
