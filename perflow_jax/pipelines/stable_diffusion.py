"""Text-to-image and img2img for SD1.x, SD2.x and SDXL, jitted once per shape and sharded over devices.

One compiled program per (batch, height, width, steps, img2img start step, CFG on/off): prompts, negative
prompts, seed and guidance scale are traced inputs and never recompile. The batch is sharded over a 1-D
``("data",)`` mesh of all devices (all hosts after ``jax.distributed.initialize()``), params replicated;
a batch that does not divide the device count is padded and trimmed. Image ``i`` of a call always starts
from noise drawn with ``fold_in(PRNGKey(seed), i)``, so the same seed gives the same images on 1 or N
devices and for any batch split.

Precision: params and activations in ``dtype`` (e.g. bf16); latents, guidance and the scheduler in float32.
Layouts: latents NCHW ``(B, 4, H/8, W/8)`` like diffusers; returned images NHWC ``(B, H, W, 3)`` like
diffusers' ``output_type="np"``, as uint8 or float in [0, 1].
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from perflow_jax import sampling, schedulers
from perflow_jax.compilation_cache import enable_compilation_cache
from perflow_jax.models.clip import CLIPTextModel, CLIPTextModelWithProjection
from perflow_jax.models.components import PipelineComponents, load_pipeline_components
from perflow_jax.models.unet import UNet2DConditionModel
from perflow_jax.models.vae import AutoencoderKL, scale_latents, unscale_latents
from perflow_jax.pipelines.defaults import FAMILY_DEFAULTS, model_family, perflow_config_dict


@dataclasses.dataclass
class GenerationStats:
    """Timings of the last call: compile (0 when cached) and run seconds, and compiled-program count."""

    compile_seconds: float = 0.0
    run_seconds: float = 0.0
    num_compiled: int = 0


class StableDiffusionPipeline:
    """SD1.x / SD2.x / SDXL text-to-image and img2img with any registered scheduler (PeRFlow by default).

    Build it with :meth:`from_pretrained`, then call :meth:`__call__` (text-to-image) or :meth:`img2img`.
    """

    def __init__(self, components: PipelineComponents, scheduler: schedulers.Scheduler, *,
                 dtype: Any = jnp.float32, mesh: Mesh | None = None, decode_chunk_size: int | None = None,
                 attention_implementation: str | None = None, attention_chunk_size: int | None = None,
                 compilation_cache: bool | str = True):
        if compilation_cache:
            enable_compilation_cache(compilation_cache if isinstance(compilation_cache, str) else None)
        self.components = components
        self.scheduler = scheduler
        self.family = model_family(components)
        self.defaults = FAMILY_DEFAULTS[self.family]
        self.dtype = jnp.dtype(dtype)
        self.mesh = mesh if mesh is not None else Mesh(np.array(jax.devices()), ("data",))
        self._replicated = NamedSharding(self.mesh, P())
        self._batch = NamedSharding(self.mesh, P("data"))
        c = components
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
        self.params = self._replicate(params)
        self._share_host_params()
        self.vae_scale_factor = 2 ** (len(c.vae_config.block_out_channels) - 1)
        self.force_zeros_for_empty_prompt = bool(c.model_index.get("force_zeros_for_empty_prompt", True))
        self._states: dict[tuple, Any] = {}
        self._compiled: dict[tuple, Any] = {}
        self.stats = GenerationStats()

    # ------------------------------------------------------------------------------------------------------
    # Construction
    # ------------------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str, *, base: str | None = None, delta: str | None = None,
                        loras: Sequence[tuple[str, float]] = (), scheduler: str = "perflow",
                        scheduler_overrides: dict[str, Any] | None = None, dtype: Any = jnp.float32,
                        variant: str | None = None, allow_pickle: bool = False,
                        **kwargs: Any) -> StableDiffusionPipeline:
        """Load a model, merge an optional PeRFlow ΔW and LoRAs, and pick a scheduler.

        Args:
          path_or_repo_id: a diffusers-format folder, a repo id in the local Hugging Face cache, or a
            single-file LDM/SGM ``.safetensors`` checkpoint (then `base` is required).
          base: for a single file: a diffusers folder of the same family (tokenizers, scheduler, configs).
          delta: PeRFlow ΔW (``delta_weights.safetensors``, its folder, or a UNet-format ΔW folder).
          loras: ``(file, scale)`` pairs in the diffusers/PEFT or kohya layout, merged after ΔW.
          scheduler: registry name (``"perflow"``, ``"ddim"``, ...) or a diffusers class name.
          scheduler_overrides: config fields overriding the model's scheduler config.
          dtype: compute and param dtype (``jnp.bfloat16`` / ``jnp.float16`` halve memory).
          variant: weights variant such as ``"fp16"``.
          allow_pickle: allow ``.bin`` PyTorch pickles (needs torch; only for files you trust).
          kwargs: passed to the constructor (mesh, decode_chunk_size, attention options, compilation_cache).
        """
        components = load_components(path_or_repo_id, base=base, delta=delta, loras=loras, variant=variant,
                                     allow_pickle=allow_pickle)
        return cls(components, make_scheduler(components, scheduler, scheduler_overrides), dtype=dtype, **kwargs)

    def _replicate(self, tree: Any) -> Any:
        """`tree` in the compute dtype, replicated over the mesh (cast leaf by leaf: no second full host copy)."""
        return jax.tree_util.tree_map(lambda a: _global_array(np.asarray(a, self.dtype), self._replicated), tree)

    def _share_host_params(self) -> None:
        """Hold the weights once where the device copy *is* host memory (one process, CPU devices, float32).

        ``components`` params then become read-only NumPy views of ``self.params`` (same values), so that the
        original host trees can be freed: otherwise a CPU process keeps every weight twice. Elsewhere the
        device copy lives in device memory and ``components`` keeps its own host copy for LoRA merging, export
        and building further pipelines.
        """
        if (jax.process_count() > 1 or self.dtype != jnp.float32
                or any(d.platform != "cpu" for d in self.mesh.devices.flat)):
            return
        view = lambda t: jax.tree_util.tree_map(np.asarray, t)  # noqa: E731  zero-copy on CPU
        c = self.components
        c.unet_params, c.vae_params = view(self.params["unet"]), view(self.params["vae"])
        c.text_encoder_params = view(self.params["text_encoder"])
        if "text_encoder_2" in self.params:
            c.text_encoder_2_params = view(self.params["text_encoder_2"])

    # ------------------------------------------------------------------------------------------------------
    # Public API
    # ------------------------------------------------------------------------------------------------------

    def __call__(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None, *,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None, seed: int = 0,
                 height: int | None = None, width: int | None = None, num_images_per_prompt: int = 1,
                 latents: np.ndarray | None = None, output_type: str = "uint8") -> np.ndarray:
        """Generate images for `prompt` (NHWC, uint8 or float in [0, 1] with ``output_type="float"``).

        ``latents`` (B, 4, H/8, W/8) replaces the seeded initial noise (it is scaled by the scheduler's
        ``init_noise_sigma`` as in diffusers). ``guidance_scale`` ≤ 1 turns classifier-free guidance off, as
        in diffusers.
        """
        return self._generate(prompt, negative_prompt, num_inference_steps, guidance_scale, seed, height, width,
                              num_images_per_prompt, latents, None, 1.0, output_type)

    def img2img(self, prompt: str | Sequence[str], image: np.ndarray, strength: float = 0.6,
                negative_prompt: str | Sequence[str] | None = None, *, num_inference_steps: int | None = None,
                guidance_scale: float | None = None, seed: int = 0, num_images_per_prompt: int = 1,
                output_type: str = "uint8") -> np.ndarray:
        """Re-generate `image` (NHWC uint8, or float in [0, 1]; one image or one per prompt) from strength·T.

        As in diffusers, the last ``int(steps · strength)`` steps run, starting from the encoded image noised
        to the first of them; the VAE encoding is sampled with the seed.
        """
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}.")
        return self._generate(prompt, negative_prompt, num_inference_steps, guidance_scale, seed, None, None,
                              num_images_per_prompt, None, image, strength, output_type)

    def scheduler_state(self, num_inference_steps: int, sample_shape: tuple[int, ...]) -> Any:
        """The (cached, replicated) scheduler state for a step count and latent batch shape (multistep
        schedulers size their history by it)."""
        key = (num_inference_steps, tuple(sample_shape))
        if key not in self._states:
            state = self.scheduler.set_timesteps(num_inference_steps, sample_shape=tuple(sample_shape))
            self._states[key] = self._replicate(state)
        return self._states[key]

    # ------------------------------------------------------------------------------------------------------
    # Host side: validation, tokenisation, batching
    # ------------------------------------------------------------------------------------------------------

    def _generate(self, prompt, negative_prompt, steps, guidance, seed, height, width, per_prompt, latents,
                  image, strength, output_type) -> np.ndarray:
        steps = self.defaults.num_inference_steps if steps is None else steps
        guidance = self.defaults.guidance_scale if guidance is None else guidance
        prompts = _as_list(prompt, "prompt")
        if negative_prompt is not None:
            negatives = _as_list(negative_prompt, "negative_prompt")
            if len(negatives) == 1:
                negatives = negatives * len(prompts)
            if len(negatives) != len(prompts):
                raise ValueError(f"Got {len(negatives)} negative prompts for {len(prompts)} prompts; pass one "
                                 "negative prompt or one per prompt.")
        else:
            negatives = None
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"num_inference_steps must be an integer ≥ 1, got {steps!r}.")
        if not np.isfinite(guidance) or guidance < 0:
            raise ValueError(f"guidance_scale must be a finite number ≥ 0, got {guidance!r}.")
        if output_type not in ("uint8", "float"):
            raise ValueError(f"output_type must be 'uint8' or 'float', got {output_type!r}.")
        if per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be ≥ 1, got {per_prompt}.")
        prompts = [p for p in prompts for _ in range(per_prompt)]
        negatives = [p for p in negatives for _ in range(per_prompt)] if negatives is not None else None
        n = len(prompts)

        init_images = None
        if image is not None:
            init_images = _prepare_images(image, n)
            height, width = init_images.shape[2:]
        height, width = self._check_size(height, width)
        f = self.vae_scale_factor
        latent_shape = (self.components.unet_config.in_channels, height // f, width // f)
        if latents is not None:
            latents = np.asarray(latents, np.float32)
            if latents.shape != (n, *latent_shape):
                raise ValueError(f"latents must have shape {(n, *latent_shape)} (NCHW) for {n} images of "
                                 f"{height}×{width}, got {latents.shape}.")

        ndev = self.mesh.devices.size
        padded = -(-n // ndev) * ndev
        state = self.scheduler_state(steps, (padded, *latent_shape))
        num_steps = int(state.timesteps.shape[0])
        start = num_steps - min(int(num_steps * strength), num_steps) if image is not None else 0
        if start >= num_steps:
            raise ValueError(f"strength {strength} with {num_steps} steps leaves no step to run; raise strength "
                             "or num_inference_steps.")
        # As in diffusers: guidance_scale ≤ 1 means no classifier-free guidance (conditional model only);
        # e.g. guidance_scale=0 is the usual "off" for distilled models, not the unconditional model.
        use_cfg = guidance > 1.0
        zero_negative = negatives is None and self.family == "sdxl" and self.force_zeros_for_empty_prompt
        if negatives is None:
            negatives = [""] * n

        pad = lambda a: np.concatenate([a, np.repeat(a[-1:], padded - n, axis=0)]) if padded > n else a  # noqa
        inputs = {
            "ids": pad(self._tokenize(prompts)),
            "neg_ids": pad(self._tokenize(negatives)),
            "index": np.arange(padded, dtype=np.uint32),
        }
        if latents is not None:
            inputs["latents"] = pad(latents)
        if init_images is not None:
            inputs["image"] = pad(init_images)
        inputs = {k: _global_array(v, self._batch) for k, v in inputs.items()}
        scalars = {"seed": np.uint32(seed % 2**32), "guidance": np.float32(guidance),
                   "size": np.array([height, width], np.float32)}
        scalars = {k: _global_array(np.asarray(v), self._replicated) for k, v in scalars.items()}

        key = (padded, height, width, num_steps, start, use_cfg, zero_negative, tuple(sorted(inputs)),
               output_type)
        t0 = time.perf_counter()
        compiled = self._compiled.get(key)
        if compiled is None:
            fn = jax.jit(self._program(latent_shape, start, use_cfg, zero_negative, output_type),
                         out_shardings=self._batch)
            compiled = fn.lower(self.params, state, inputs, scalars).compile()
            self._compiled[key] = compiled
        t1 = time.perf_counter()
        out = compiled(self.params, state, inputs, scalars)
        images = _to_host(out)[:n]
        t2 = time.perf_counter()
        self.stats = GenerationStats(t1 - t0, t2 - t1, len(self._compiled))
        return images

    def _check_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        f = self.vae_scale_factor
        default = (self.components.unet_config.sample_size or 64) * f
        height, width = height or default, width or default
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, int | np.integer) or v <= 0 or v % f:
                raise ValueError(f"{name} must be a positive multiple of {f} (the VAE's downsampling factor), "
                                 f"got {v!r}.")
        return int(height), int(width)

    def _tokenize(self, texts: list[str]) -> np.ndarray:
        """(B, L) ids, or (B, 2, L) for SDXL's two tokenizers."""
        def ids(tok) -> np.ndarray:
            out = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="np")
            return np.asarray(out["input_ids"], np.int32)

        if self.text_encoder_2 is None:
            return ids(self.components.tokenizer)
        return np.stack([ids(self.components.tokenizer), ids(self.components.tokenizer_2)], axis=1)

    # ------------------------------------------------------------------------------------------------------
    # Device side: the jitted program
    # ------------------------------------------------------------------------------------------------------

    def _program(self, latent_shape: tuple[int, ...], start: int, use_cfg: bool, zero_negative: bool,
                 output_type: str):
        """The whole generation as one function of (params, scheduler state, batched inputs, scalars)."""
        sched = self.scheduler

        def program(params, state, inputs, scalars):
            cond = self._encode_prompt(params, inputs["ids"], scalars["size"])
            if use_cfg:
                uncond = self._encode_prompt(params, inputs["neg_ids"], scalars["size"])
                if zero_negative:  # SDXL: no negative prompt → zero embeddings (diffusers' default)
                    uncond = {**uncond, "encoder_hidden_states": jnp.zeros_like(uncond["encoder_hidden_states"]),
                              "text_embeds": jnp.zeros_like(uncond["text_embeds"])}

            base = jax.random.key(scalars["seed"])
            keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(inputs["index"])
            b = inputs["ids"].shape[0]
            if "latents" in inputs:
                x = inputs["latents"] * sched.init_noise_sigma(state)
            else:
                x = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), latent_shape))(keys)
                x = x * sched.init_noise_sigma(state)
            if "image" in inputs:
                enc_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
                dist = self.vae.apply({"params": params["vae"]}, inputs["image"] * 2.0 - 1.0,
                                      method=AutoencoderKL.encode)
                z = jax.vmap(lambda m, lv, k: _sample_latent(m, lv, k))(dist.mean, dist.logvar, enc_keys)
                z0 = scale_latents(z.astype(jnp.float32), self.components.vae_config)
                x = sched.add_noise(z0, x, jnp.full((b,), state.timesteps[start]), state)

            def model_fn(xb, t, ctx):
                return self.unet.apply({"params": params["unet"]}, xb, t, ctx["encoder_hidden_states"],
                                       added_cond_kwargs=_added_cond(ctx))

            if use_cfg:
                denoise = sampling.classifier_free_guidance(model_fn, cond, uncond, scalars["guidance"])
            else:
                def denoise(xb, t, i):
                    return model_fn(xb, jnp.broadcast_to(t, (xb.shape[0],)), cond).astype(jnp.float32)

            # Ancestral schedulers draw step noise for the whole (padded) batch from one seed-derived key.
            x = sampling.sample(sched, state, denoise, x, key=jax.random.fold_in(base, 2**31), start_step=start)
            image = self.vae.apply({"params": params["vae"]}, unscale_latents(x, self.components.vae_config)
                                   .astype(self.dtype), method=AutoencoderKL.decode)
            image = jnp.clip(image.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)
            return jnp.round(image * 255).astype(jnp.uint8) if output_type == "uint8" else image

        return program

    def _encode_prompt(self, params: dict, ids: jax.Array, size: jax.Array) -> dict[str, jax.Array]:
        """Token ids → the UNet's conditioning: text embeddings (+ SDXL pooled embeds and time ids)."""
        if self.text_encoder_2 is None:
            out = self.text_encoder.apply({"params": params["text_encoder"]}, ids)
            return {"encoder_hidden_states": out.last_hidden_state}
        out1 = self.text_encoder.apply({"params": params["text_encoder"]}, ids[:, 0])
        out2 = self.text_encoder_2.apply({"params": params["text_encoder_2"]}, ids[:, 1])
        hidden = jnp.concatenate([out1.hidden_states[-2], out2.hidden_states[-2]], axis=-1)
        b = ids.shape[0]
        # add_time_ids = original size + crop top-left (0, 0) + target size, all (height, width).
        time_ids = jnp.concatenate([size, jnp.zeros(2, jnp.float32), size])
        return {"encoder_hidden_states": hidden, "text_embeds": out2.text_embeds,
                "time_ids": jnp.broadcast_to(time_ids, (b, 6))}


def load_components(path_or_repo_id: str, *, base: str | None = None, delta: str | None = None,
                    loras: Sequence[tuple[str, float]] = (), variant: str | None = None,
                    allow_pickle: bool = False) -> PipelineComponents:
    """Components from a diffusers folder / cached repo id or a single-file checkpoint, then ΔW, then LoRAs.

    ΔW is merged first because it is defined against the exact base weights (and checked against the whole
    UNet); LoRAs are stacked on whatever model they are loaded into.
    """
    import os

    if os.path.isfile(path_or_repo_id):
        from perflow_jax.models.single_file import load_single_file

        components = load_single_file(path_or_repo_id, base=base)
    else:
        if base is not None:
            raise ValueError("base= is only used with a single-file checkpoint; a diffusers folder has its own "
                             "tokenizers and scheduler.")
        components = load_pipeline_components(path_or_repo_id, variant=variant, allow_pickle=allow_pickle)
    if delta is not None:
        from perflow_jax import delta as delta_lib

        components.unet_params = delta_lib.merge(components.unet_params,
                                                 delta_lib.load_delta(delta, components.unet_params))
    if loras:
        from perflow_jax.lora import load_lora, merge_loras

        components = merge_loras(components, [(load_lora(f), float(scale)) for f, scale in loras])
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


def _prepare_images(image: np.ndarray, n: int) -> np.ndarray:
    """NHWC uint8/float [0, 1] image(s) → (n, 3, H, W) float32 in [0, 1]."""
    img = np.asarray(image)
    if img.ndim == 3:
        img = img[None]
    if img.ndim != 4 or img.shape[-1] != 3:
        raise ValueError(f"init image must be (H, W, 3) or (B, H, W, 3) RGB, got shape {img.shape}.")
    img = img.astype(np.float32) / 255.0 if img.dtype == np.uint8 else img.astype(np.float32)
    if img.shape[0] == 1:
        img = np.repeat(img, n, axis=0)
    if img.shape[0] != n:
        raise ValueError(f"Got {img.shape[0]} init images for {n} outputs; pass one image or one per output.")
    return img.transpose(0, 3, 1, 2)


def _sample_latent(mean: jax.Array, logvar: jax.Array, key: jax.Array) -> jax.Array:
    eps = jax.random.normal(key, mean.shape, jnp.float32)
    return mean.astype(jnp.float32) + jnp.exp(0.5 * logvar.astype(jnp.float32)) * eps


def _added_cond(ctx: dict[str, jax.Array]) -> dict[str, jax.Array] | None:
    if "text_embeds" not in ctx:
        return None
    return {"text_embeds": ctx["text_embeds"], "time_ids": ctx["time_ids"]}


def _global_array(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global jax.Array from host data every process holds in full (works on one or many hosts)."""
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def _to_host(x: jax.Array) -> np.ndarray:
    """Gather a (possibly multi-host) sharded array to a NumPy array on every host."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
