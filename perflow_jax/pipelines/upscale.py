"""The SD ×2 latent upscaler (diffusers' ``StableDiffusionLatentUpscalePipeline``) in named, jitted stages.

Low-resolution SD latents (or images, encoded by the VAE) plus a prompt → latents (or images) of twice the
height and width. The model (``stabilityai/sd-x2-latent-upscaler``) is a k-diffusion denoiser: a K-upscaler UNet
F (:class:`~perflow_jax.models.upscaler_unet.UpscalerUNet`) wrapped in Karras et al.'s preconditioning
(:func:`perflow_jax.schedulers.euler.karras_preconditioning`, σ_data = 1),

    D(x; σ) = x/(σ² + 1) + σ/sqrt(σ² + 1) · F([x/sqrt(σ² + 1), image_cond]; log(σ)/4, text, timestep_cond)[:, :-1],

sampled by the ``euler`` scheduler with ``prediction_type="sample"`` (D is x̂₀; the preconditioned output is
x̂₀ whatever the model's scheduler config says) and classifier-free guidance on D. As in diffusers:

* text: CLIP's last hidden layer *before* the final LayerNorm (``hidden_states[-1]``) for cross-attention, and
  the pooled output for ``timestep_cond``;
* noise-level conditioning at noise level 0 (diffusers keeps the low-res input noise-free): ``image_cond`` is
  the low-res latents upsampled ×2 nearest-neighbour times 1/sqrt(0² + 1), and ``timestep_cond`` is the Fourier
  features of that level (64 cos = 1, then 64 sin = 0) followed by the pooled text embedding;
* ``guidance_scale`` > 1 turns guidance on; ``guidance_scale == 0`` also replaces the prompts by empty ones.

The stages are public and pure in ``params``: :meth:`~LatentUpscalePipeline.encode_prompt`,
:meth:`~LatentUpscalePipeline.encode_image`, :meth:`~LatentUpscalePipeline.condition`,
:meth:`~LatentUpscalePipeline.upscale_latents` (the reusable stage: low-res latents → ×2 latents, e.g. after
text-to-image or multi-view generation) and :meth:`~LatentUpscalePipeline.decode`.
:meth:`~LatentUpscalePipeline.program` composes them for one :class:`UpscaleSpec`, the compiled-program cache
key: prompts, seed and guidance scale are traced, so one program serves every call of a shape. Row i's initial
noise is drawn from ``fold_in(fold_in(key(seed), i), 0)`` and its VAE posterior sample (image input) from
``fold_in(..., 1)``, as in :mod:`perflow_jax.pipelines.stable_diffusion`; the batch is sharded over all devices
like there.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from perflow_jax import sampling, schedulers, sharding, values
from perflow_jax.hub import resolve_model_path
from perflow_jax.io import read_json
from perflow_jax.models.clip import CLIPTextConfig, CLIPTextModel, load_clip_text_model
from perflow_jax.models.components import load_tokenizer, read_model_index
from perflow_jax.models.upscaler_unet import UpscalerUNet, UpscalerUNetConfig, load_upscaler_unet
from perflow_jax.models.vae import AutoencoderKL, VAEConfig, load_vae
from perflow_jax.pipelines.stable_diffusion import (
    GenerationStats,
    _as_list,
    _check_output_type,
    _image_keys,
    _pad_rows,
    _prepare_images,
    decode_latents,
    encode_images,
    run_cached,
)
from perflow_jax.schedulers.euler import karras_preconditioning

__all__ = ["LatentUpscalePipeline", "UpscaleCondition", "UpscaleInputs", "UpscaleRequest", "UpscaleSpec",
           "UpscalerComponents", "load_upscaler_components"]

NOISE_LEVEL_FEATURES = 64  # diffusers: 64 cos + 64 sin Fourier features of the low-res noise level (0)
DEFAULT_STEPS = 75  # diffusers' defaults
DEFAULT_GUIDANCE = 9.0


# ----------------------------------------------------------------------------------------------------------
# Components
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class UpscalerComponents:
    """The upscaler's configs, params (NumPy/JAX arrays), tokenizer and scheduler config."""

    path: str
    unet_config: UpscalerUNetConfig
    unet_params: dict
    vae_config: VAEConfig
    vae_params: dict
    text_encoder_config: CLIPTextConfig
    text_encoder_params: dict
    tokenizer: Any
    scheduler_config: dict[str, Any]


def _check_compatible(c: UpscalerComponents) -> None:
    """The UNet's inputs must fit the VAE's latents and the text encoder's width (one clear error if not)."""
    u, latent, width = c.unet_config, c.vae_config.latent_channels, c.text_encoder_config.hidden_size
    problems = []
    if u.in_channels != 2 * latent:
        problems.append(f"in_channels={u.in_channels} (needs 2 × the VAE's latent_channels {latent})")
    if u.out_channels != latent + 1:
        problems.append(f"out_channels={u.out_channels} (needs latent_channels {latent} + 1)")
    if u.cross_attention_dim != width:
        problems.append(f"cross_attention_dim={u.cross_attention_dim} (needs the text encoder's hidden_size {width})")
    if u.time_cond_proj_dim != 2 * NOISE_LEVEL_FEATURES + width:
        problems.append(f"time_cond_proj_dim={u.time_cond_proj_dim} (needs {2 * NOISE_LEVEL_FEATURES} noise-level "
                        f"features + hidden_size {width})")
    if problems:
        raise ValueError(f"{os.path.join(c.path, 'unet', 'config.json')!r} does not fit this latent upscaler's VAE "
                         f"and text encoder: {'; '.join(problems)}.")


def load_upscaler_components(path_or_repo_id: str | os.PathLike, dtype: Any = None, variant: str | None = None,
                             allow_pickle: bool = False) -> UpscalerComponents:
    """Load a diffusers latent-upscaler folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``,
    ``tokenizer/``, ``scheduler/``) or a repo id in the local Hugging Face cache; nothing is downloaded.

    Raises FileNotFoundError for a missing part, ValueError for a UNet that is not a K-upscaler or does not fit
    the VAE and text encoder, ConversionError for weights that do not match their configs.
    """
    root = resolve_model_path(path_or_repo_id)
    read_model_index(root)
    folders = {}
    for name in ("unet", "vae", "text_encoder", "tokenizer"):
        folders[name] = os.path.join(root, name)
        if not os.path.isdir(folders[name]):
            raise FileNotFoundError(f"{root!r} has no {name}/ folder; a latent upscaler folder (e.g. "
                                    "stabilityai/sd-x2-latent-upscaler) needs unet/, vae/, text_encoder/, tokenizer/ "
                                    "and scheduler/.")
    load = dict(dtype=dtype, variant=variant, allow_pickle=allow_pickle)
    unet_config, unet_params = load_upscaler_unet(folders["unet"], **load)
    vae_config, vae_params = load_vae(folders["vae"], **load)
    te_config, te_params = load_clip_text_model(folders["text_encoder"], with_projection=False, **load)
    tokenizer = load_tokenizer(folders["tokenizer"], max_length=te_config.max_position_embeddings)
    sched = os.path.join(root, "scheduler", "scheduler_config.json")
    if not os.path.isfile(sched):
        raise FileNotFoundError(f"{root!r} has no scheduler/scheduler_config.json (the upscaler's Euler schedule).")
    comps = UpscalerComponents(root, unet_config, unet_params, vae_config, vae_params, te_config, te_params,
                               tokenizer, read_json(sched))
    _check_compatible(comps)
    return comps


# ----------------------------------------------------------------------------------------------------------
# Specs, inputs, condition
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class UpscaleSpec:
    """Everything static about one upscaling call: what :meth:`LatentUpscalePipeline.program` is built from and
    the compiled-program cache key.

    Attributes:
      batch: rows per call, padded to a multiple of the device count.
      height, width: the low-resolution *latent* size (the output latents are twice that).
      num_inference_steps: Euler steps.
      use_cfg: classifier-free guidance (guidance scale > 1).
      from_image: the inputs carry images (encoded by the VAE) instead of latents.
      has_noise: the inputs carry the initial noise instead of drawing it from the seed.
      output_type: ``"latent"`` (scaled ×2 latents), ``"uint8"`` or ``"float"`` images.
    """

    batch: int
    height: int
    width: int
    num_inference_steps: int
    use_cfg: bool = False
    from_image: bool = False
    has_noise: bool = False
    output_type: str = "uint8"

    def __post_init__(self) -> None:
        _check_output_type(self.output_type)


class UpscaleInputs(NamedTuple):
    """Batched inputs (rows = ``spec.batch``; absent parts None).

    Attributes:
      ids, neg_ids: prompt and negative-prompt token ids (B, L).
      index: (B,) uint32 row index: row i's noise comes from ``fold_in(key(seed), i)``.
      low_res: (B, C, h, w) scaled SD latents, or None with `image`.
      image: (B, 3, H, W) float32 images in [0, 1], or None.
      noise: (B, C, 2h, 2w) initial noise (before the scheduler's ``init_noise_sigma``), or None.
    """

    ids: jax.Array
    neg_ids: jax.Array
    index: jax.Array
    low_res: jax.Array | None = None
    image: jax.Array | None = None
    noise: jax.Array | None = None


class UpscaleRequest(NamedTuple):
    """A validated call for :meth:`LatentUpscalePipeline.generate` (see :class:`~perflow_jax.pipelines.
    GenerationRequest`)."""

    spec: UpscaleSpec
    inputs: UpscaleInputs
    seed: jax.Array
    guidance_scale: jax.Array
    num_images: int


class UpscaleCondition(NamedTuple):
    """What the upscaler's UNet is conditioned on, batched like the latents (a pytree).

    Attributes:
      encoder_hidden_states: (B, L, D) CLIP hidden states before the final LayerNorm.
      timestep_cond: (B, 128 + D) noise-level features and the pooled text embedding.
      image_cond: (B, C, 2h, 2w) the low-res latents upsampled ×2 (nearest), scaled for noise level 0.
    """

    encoder_hidden_states: jax.Array
    timestep_cond: jax.Array
    image_cond: jax.Array


# ----------------------------------------------------------------------------------------------------------
# Pipeline
# ----------------------------------------------------------------------------------------------------------


class LatentUpscalePipeline:
    """The SD ×2 latent upscaler: ``pipe(prompt, latents=low_res)`` or ``pipe(prompt, image=images)``.

    Attributes:
      components: the :class:`UpscalerComponents` passed in (never modified).
      params: ``{"unet", "vae", "text_encoder"}`` in ``dtype``, replicated over the mesh.
      scheduler: the ``euler`` scheduler from the model's config, ``prediction_type="sample"``.
      stats: :class:`~perflow_jax.pipelines.GenerationStats` of the last call.
    """

    def __init__(self, components: UpscalerComponents, *, dtype: Any = jnp.float32, mesh: Mesh | None = None,
                 decode_chunk_size: int | None = None, attention_implementation: str | None = None,
                 attention_chunk_size: int | None = None):
        c = components
        _check_compatible(c)
        self.components = c
        self.dtype = jnp.dtype(dtype)
        self.scheduler = schedulers.from_config(c.scheduler_config, name="euler", prediction_type="sample")
        self.mesh = mesh if mesh is not None else sharding.data_mesh()
        self._replicated = sharding.replicated(self.mesh)
        self._batch = sharding.batch_sharded(self.mesh)
        self.unet = UpscalerUNet(c.unet_config, dtype=self.dtype, attention_implementation=attention_implementation,
                                 attention_chunk_size=attention_chunk_size)
        self.vae = AutoencoderKL(c.vae_config, dtype=self.dtype, decode_chunk_size=decode_chunk_size)
        self.text_encoder = CLIPTextModel(c.text_encoder_config, dtype=self.dtype)
        params = {"unet": c.unet_params, "vae": c.vae_params, "text_encoder": c.text_encoder_params}
        self.params = jax.tree_util.tree_map(
            lambda a: sharding.global_array(np.asarray(a, self.dtype), self._replicated), params)
        self.vae_scale_factor = 2 ** (len(c.vae_config.block_out_channels) - 1)
        self._states: dict[int, Any] = {}
        self._compiled: dict[UpscaleSpec, Any] = {}
        self.stats = GenerationStats()

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, *, dtype: Any = jnp.float32,
                        variant: str | None = None, allow_pickle: bool = False, **kwargs: Any
                        ) -> LatentUpscalePipeline:
        """Load a latent-upscaler folder (:func:`load_upscaler_components`); `kwargs` go to the constructor."""
        return cls(load_upscaler_components(path_or_repo_id, variant=variant, allow_pickle=allow_pickle),
                   dtype=dtype, **kwargs)

    # ------------------------------------------------------------------------------------------------------
    # Calls
    # ------------------------------------------------------------------------------------------------------

    def __call__(self, prompt: str | Sequence[str], *, latents: np.ndarray | None = None,
                 image: np.ndarray | None = None, negative_prompt: str | Sequence[str] | None = None,
                 num_inference_steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE, seed: int = 0,
                 noise: np.ndarray | None = None, output_type: str = "uint8", first_index: int = 0) -> np.ndarray:
        """Upscale ×2: `latents` (B, C, h, w) scaled SD latents (e.g. text-to-image before decoding), or `image`
        (B, H, W, 3) uint8 / float in [0, 1] (encoded by the VAE with a posterior sample).

        One prompt for all inputs, one input for all prompts, or one each. Returns ``(B, C, 2h, 2w)`` scaled
        latents for ``output_type="latent"``, else ``(B, 2H, 2W, 3)`` images. `noise` (B, C, 2h, 2w) replaces the
        seeded initial noise (it is scaled by the scheduler's ``init_noise_sigma``, as diffusers' ``latents``).
        """
        return self.generate(self.build_request(
            prompt, latents=latents, image=image, negative_prompt=negative_prompt,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, seed=seed, noise=noise,
            output_type=output_type, first_index=first_index))

    def generate(self, request: UpscaleRequest) -> np.ndarray:
        """Run :meth:`program` for ``request.spec`` (compiled once per spec) and gather the result to the host."""
        state = self.scheduler_state(request.spec.num_inference_steps)
        args = (self.params, state, request.inputs, request.seed, request.guidance_scale)
        out, self.stats = run_cached(self._compiled, request.spec, self.program, args, self.mesh, request.num_images)
        return out

    def build_request(self, prompt: str | Sequence[str], *, latents: np.ndarray | None = None,
                      image: np.ndarray | None = None, negative_prompt: str | Sequence[str] | None = None,
                      num_inference_steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE,
                      seed: int = 0, noise: np.ndarray | None = None, output_type: str = "uint8",
                      first_index: int = 0) -> UpscaleRequest:
        """Validate a call (arguments as :meth:`__call__`) into an :class:`UpscaleRequest`; compiles nothing.
        Raises ValueError naming the bad argument."""
        steps = values.check_int("num_inference_steps", num_inference_steps, min_value=1)
        guidance = values.check_float("guidance_scale", guidance_scale, min_value=0.0)
        values.check_int("seed", seed)
        first_index = values.check_int("first_index", first_index, min_value=0)
        _check_output_type(output_type)
        if (latents is None) == (image is None):
            raise ValueError("Pass the low-resolution input as latents= (B, C, h, w) or image= (B, H, W, 3), "
                             "exactly one of them.")
        prompts = _as_list(prompt, "prompt")
        low_res = images = None
        if latents is not None:
            low_res = self._check_latents(latents)
            count = low_res.shape[0]
        else:
            count = np.asarray(image).shape[0] if np.ndim(image) == 4 else 1
        n = max(count, len(prompts))
        if len(prompts) not in (1, n) or count not in (1, n):
            raise ValueError(f"Got {len(prompts)} prompts for {count} inputs; pass one prompt, one input, or as many "
                             "of each.")
        if guidance == 0:  # diffusers: guidance_scale 0 upscales without the prompt
            prompts = [""]
        prompts = prompts * n if len(prompts) == 1 else prompts
        negatives = [""] * n
        if negative_prompt is not None:
            negatives = _as_list(negative_prompt, "negative_prompt")
            if len(negatives) not in (1, n):
                raise ValueError(f"Got {len(negatives)} negative prompts for {n} outputs; pass one or one per output.")
            negatives = negatives * n if len(negatives) == 1 else negatives
        if low_res is not None:
            low_res = np.repeat(low_res, n, axis=0) if low_res.shape[0] == 1 else low_res
            h, w = low_res.shape[2:]
        else:
            images = _prepare_images(image, n, "image")
            if not np.isfinite(images).all():
                raise ValueError("image has NaN or infinite values.")
            h, w = self._check_image_size(*images.shape[2:])
        c = self.components.vae_config.latent_channels
        if noise is not None:
            noise = np.asarray(noise)
            if noise.shape != (n, c, 2 * h, 2 * w):
                raise ValueError(f"noise must have shape {(n, c, 2 * h, 2 * w)} (NCHW, twice the low-res latent size) "
                                 f"for {n} outputs, got {noise.shape}.")
            noise = noise.astype(np.float32)
            if not np.isfinite(noise).all():
                raise ValueError("noise has NaN or infinite values.")
        padded = sharding.padded_size(n, self.mesh)
        if first_index + padded > 2**32:
            raise ValueError(f"first_index {first_index} + {n} outputs exceeds 2**32 row indices.")
        spec = UpscaleSpec(batch=padded, height=h, width=w, num_inference_steps=steps, use_cfg=guidance > 1.0,
                           from_image=images is not None, has_noise=noise is not None, output_type=output_type)
        pad = lambda a: None if a is None else _pad_rows(a, padded)  # noqa: E731
        inputs = UpscaleInputs(ids=pad(self.tokenize(prompts)), neg_ids=pad(self.tokenize(negatives)),
                               index=np.arange(first_index, first_index + padded, dtype=np.uint32),
                               low_res=pad(low_res), image=pad(images), noise=pad(noise))
        return UpscaleRequest(spec, sharding.global_tree(inputs, self._batch),
                              sharding.global_array(np.uint32(seed % 2**32), self._replicated),
                              sharding.global_array(np.float32(guidance), self._replicated), n)

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        """Token ids (B, L), padded to the tokenizer's max length as diffusers does."""
        tok = self.components.tokenizer
        out = tok(list(texts), padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="np")
        return np.asarray(out["input_ids"], np.int32)

    def scheduler_state(self, num_inference_steps: int) -> Any:
        """The (cached, replicated) Euler state for a step count."""
        if num_inference_steps not in self._states:
            state = self.scheduler.set_timesteps(num_inference_steps)
            self._states[num_inference_steps] = sharding.global_tree(state, self._replicated)
        return self._states[num_inference_steps]

    def _check_latents(self, latents: np.ndarray) -> np.ndarray:
        x = np.asarray(latents)
        x = x[None] if x.ndim == 3 else x
        c, m = self.components.vae_config.latent_channels, self.components.unet_config.size_multiple
        if x.ndim != 4 or x.shape[1] != c:
            raise ValueError(f"latents must be (B, {c}, h, w) or ({c}, h, w) scaled SD latents (NCHW), got shape "
                             f"{np.shape(latents)}.")
        if not np.issubdtype(x.dtype, np.floating) or not np.isfinite(x).all():
            raise ValueError("latents must be finite floating-point numbers.")
        half = max(m // 2, 1)
        if x.shape[2] % half or x.shape[3] % half:
            raise ValueError(f"latents height and width must be multiples of {half} (the upscaler's UNet runs at "
                             f"twice that size, a multiple of {m}), got {x.shape[2]}×{x.shape[3]}.")
        return x.astype(np.float32)

    def _check_image_size(self, height: int, width: int) -> tuple[int, int]:
        f = self.vae_scale_factor
        step = f * max(self.components.unet_config.size_multiple // 2, 1)
        if height % step or width % step:
            raise ValueError(f"image height and width must be multiples of {step} (VAE factor {f} × the upscaler's "
                             f"size multiple), got {height}×{width}.")
        return height // f, width // f

    # ------------------------------------------------------------------------------------------------------
    # Device side: the stages
    # ------------------------------------------------------------------------------------------------------

    def program(self, spec: UpscaleSpec) -> Any:
        """The whole call for `spec`: ``fn(params, state, inputs, seed, guidance_scale) -> latents or images``."""

        def program(params: Any, state: Any, inputs: UpscaleInputs, seed: jax.Array,
                    guidance_scale: jax.Array) -> jax.Array:
            keys = _image_keys(seed, inputs.index)
            low_res = self.encode_image(params, inputs.image, keys) if spec.from_image else inputs.low_res
            cond = self.condition(*self.encode_prompt(params, inputs.ids), low_res)
            uncond = self.condition(*self.encode_prompt(params, inputs.neg_ids), low_res) if spec.use_cfg else None
            x = self.upscale_latents(params, state, cond, uncond, guidance_scale, keys,
                                     inputs.noise if spec.has_noise else None)
            return x if spec.output_type == "latent" else self.decode(params, x, spec.output_type)

        return program

    def encode_prompt(self, params: Any, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Token ids (B, L) → (hidden states before the final LayerNorm (B, L, D), pooled output (B, D))."""
        chex.assert_rank(ids, 2, custom_message="token ids must be (B, L)")
        out = self.text_encoder.apply({"params": params["text_encoder"]}, ids)
        return out.hidden_states[-1], out.pooled_output

    def encode_image(self, params: Any, image: jax.Array, keys: jax.Array) -> jax.Array:
        """(B, 3, H, W) images in [0, 1] → scaled low-res latents, a posterior sample per row's key."""
        return encode_images(self.vae, params["vae"], self.components.vae_config, image, keys)

    def condition(self, hidden: jax.Array, pooled: jax.Array, low_res: jax.Array) -> UpscaleCondition:
        """The UNet's condition for low-res latents (B, C, h, w) at noise level 0 (see the module docstring)."""
        b = low_res.shape[0]
        chex.assert_shape(pooled, (b, None), custom_message="pooled text embeddings must be (B, D)")
        noise_level = jnp.zeros((b,), jnp.float32)
        inv_noise_level = (noise_level**2 + 1) ** -0.5
        level = jnp.concatenate([jnp.ones((b, NOISE_LEVEL_FEATURES)), jnp.zeros((b, NOISE_LEVEL_FEATURES))], axis=-1)
        image_cond = jnp.repeat(jnp.repeat(low_res.astype(jnp.float32), 2, axis=2), 2, axis=3)
        return UpscaleCondition(encoder_hidden_states=hidden,
                                timestep_cond=jnp.concatenate([level.astype(pooled.dtype), pooled], axis=-1),
                                image_cond=image_cond * inv_noise_level[:, None, None, None])

    def denoiser_fn(self, params: Any) -> Any:
        """The preconditioned denoiser ``D(x, σ, cond) -> x̂₀`` (float32) over the UNet; x unscaled, σ (B,)."""

        def fn(x: jax.Array, sigma: jax.Array, cond: UpscaleCondition) -> jax.Array:
            c_skip, c_out, c_in, c_noise = (v[:, None, None, None] if v.ndim else v
                                            for v in karras_preconditioning(sigma))
            model_in = jnp.concatenate([x * c_in, cond.image_cond.astype(x.dtype)], axis=1)
            out = self.unet.apply({"params": params["unet"]}, model_in, c_noise.reshape(-1),
                                  cond.encoder_hidden_states, cond.timestep_cond)
            return c_skip * x + c_out * out.astype(jnp.float32)[:, :-1]

        return fn

    def upscale_latents(self, params: Any, state: Any, cond: UpscaleCondition, uncond: UpscaleCondition | None,
                        guidance_scale: jax.typing.ArrayLike, keys: jax.Array,
                        noise: jax.Array | None = None) -> jax.Array:
        """The reusable stage: Euler sampling of the ×2 latents (B, C, 2h, 2w) under `cond` (from
        :meth:`condition`), with classifier-free guidance when `uncond` is given.

        The initial noise is `noise` or row i's ``normal(fold_in(keys[i], 0))``, times ``init_noise_sigma``.
        """
        shape = cond.image_cond.shape
        chex.assert_shape(keys, (shape[0],), custom_message="keys must be one PRNG key per row")
        if noise is None:
            noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), shape[1:]))(keys)
        chex.assert_shape(noise, shape, custom_message="noise must be (B, C, 2h, 2w)")
        x = noise.astype(jnp.float32) * self.scheduler.init_noise_sigma(state)
        model = self.denoiser_fn(params)
        if uncond is not None:
            model = sampling.guided(model, uncond, guidance_scale)

        def denoise(model_in: jax.Array, timestep: jax.Array, step_index: jax.Array) -> jax.Array:
            del timestep  # the upscaler is conditioned on log(σ)/4, not on the schedule's timestep
            sigma = state.sigmas[step_index]
            # sampling.sample hands over x/sqrt(σ² + 1); D needs x itself (c_skip·x), recovered to ~1 ulp.
            x_t = model_in * jnp.sqrt(sigma**2 + 1)
            return model(x_t, jnp.broadcast_to(sigma, (x_t.shape[0],)), cond)

        return sampling.sample(self.scheduler, state, denoise, x)

    def decode(self, params: Any, latents: jax.Array, output_type: str = "float") -> jax.Array:
        """×2 latents → NHWC images (float32 in [0, 1], or uint8)."""
        return decode_latents(self.vae, params["vae"], self.components.vae_config, latents, output_type)
