"""Text-to-multi-view and reference-image-to-multi-view generation with the multi-view UNet.

A model folder is a diffusers SD2.x pipeline (``text_encoder/``, ``tokenizer/``, ``vae/``, ``scheduler/``)
whose ``unet/`` is a multi-view UNet (:func:`perflow_jax.models.multiview_unet.load_multiview_unet`). N views
per prompt come from camera matrices, or from :func:`orbit_cameras` (elevation, azimuths, distance → 4×4
camera-to-world matrices). Stages as in the SD pipeline: encode_prompt → prepare_latents → denoise (any
registered scheduler, PeRFlow included, with classifier-free guidance over [uncond; cond]) → decode, one jitted
program per (prompts, views, size, steps, reference or not).

PeRFlow ΔW of the base SD family merges into the shared 2D weights only (:func:`merge_base_delta`): the camera
MLP, the reference layers and ``reference_proj`` are not part of the SD UNet and stay as they are; the
multi-view self-attention reuses the 2D ``attn1`` weights, so it takes ΔW with them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from perflow_jax import delta as delta_lib
from perflow_jax import sampling, schedulers, values
from perflow_jax.io import read_json
from perflow_jax.models.clip import CLIPTextModel, load_clip_text_model
from perflow_jax.models.clip_vision import (
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    load_clip_vision_model,
    preprocess_images,
)
from perflow_jax.models.components import PipelineComponents, load_tokenizer, read_model_index
from perflow_jax.models.multiview_unet import MultiViewConfig, load_multiview_unet, multiview_apply
from perflow_jax.models.vae import AutoencoderKL, load_vae
from perflow_jax.pipelines.stable_diffusion import decode_latents, encode_images, make_scheduler

__all__ = ["MultiViewPipeline", "merge_base_delta", "orbit_cameras", "split_base_params"]

_EXTRA_LAYERS = ("class_embedding", "reference_proj")  # top-level params that are not the SD UNet's
_IP_LAYERS = ("to_k_ip", "to_v_ip")


def orbit_cameras(elevation: float, azimuths: Sequence[float], distance: float = 1.0) -> np.ndarray:
    """Camera-to-world 4×4 matrices ``(N, 4, 4)`` float32 for cameras on a sphere of radius `distance` around
    the origin, looking at it, +z up (OpenGL axes: the camera looks down its −z): position
    ``distance·(cos e·cos a, cos e·sin a, sin e)`` for elevation e and each azimuth a, in degrees."""
    elevation = values.check_float("elevation", elevation)
    distance = values.check_float("distance", distance)
    if not -90.0 < elevation < 90.0:
        raise ValueError(f"elevation must be in (-90, 90) degrees (the camera looks at the origin, +z up), got "
                         f"{elevation}.")
    if not distance > 0:
        raise ValueError(f"distance must be positive, got {distance}.")
    azimuths = [values.check_float("azimuth", a) for a in azimuths]
    if not azimuths:
        raise ValueError("orbit_cameras needs at least one azimuth.")
    e = math.radians(elevation)
    out = []
    for a in map(math.radians, azimuths):
        pos = distance * np.array([math.cos(e) * math.cos(a), math.cos(e) * math.sin(a), math.sin(e)])
        back = pos / np.linalg.norm(pos)  # camera +z points away from the target
        right = np.cross([0.0, 0.0, 1.0], back)
        right /= np.linalg.norm(right)
        up = np.cross(back, right)
        m = np.eye(4)
        m[:3, 0], m[:3, 1], m[:3, 2], m[:3, 3] = right, up, back, pos
        out.append(m)
    return np.stack(out).astype(np.float32)


def split_base_params(params: Mapping) -> tuple[dict, dict]:
    """(the SD UNet's params, the multi-view additions: camera MLP, ``*_ip`` layers, ``reference_proj``)."""
    flat = traverse_util.flatten_dict(dict(params))
    extra = {p: v for p, v in flat.items() if p[0] in _EXTRA_LAYERS or any(m in _IP_LAYERS for m in p)}
    base = {p: v for p, v in flat.items() if p not in extra}
    return traverse_util.unflatten_dict(base), traverse_util.unflatten_dict(extra) if extra else {}


def merge_base_delta(params: Mapping, delta: Mapping, scale: float = 1.0) -> dict:
    """W + scale·ΔW on the shared 2D (SD UNet) weights; the multi-view additions are returned untouched.
    `delta` is shaped like the SD UNet (as :func:`perflow_jax.delta.read_delta` gives it)."""
    base, extra = split_base_params(params)
    merged = delta_lib.merge(base, delta, scale)
    return traverse_util.unflatten_dict(traverse_util.flatten_dict(merged) | traverse_util.flatten_dict(extra))


class MultiViewPipeline:
    """N consistent views per prompt, optionally conditioned on a reference image: ``reference="latent"`` models
    see its VAE latents, ``reference="clip"`` models the penultimate hidden states of a CLIP image encoder
    (ImageDream / IP-Adapter Plus style); the unconditional branch of CFG sees zeros of the same shape.

    Build it with :meth:`from_pretrained`, then call it. ``params`` holds ``{"unet", "vae", "text_encoder"}`` and,
    for ``reference="clip"`` models, ``"image_encoder"``.
    """

    def __init__(self, config: MultiViewConfig, params: dict, components: PipelineComponents,
                 scheduler: schedulers.Scheduler, *, dtype: Any = jnp.float32,
                 attention_implementation: str | None = None, attention_chunk_size: int | None = None,
                 image_encoder_config: CLIPVisionConfig | None = None):
        self.config = config
        self.image_encoder = (None if image_encoder_config is None else
                              CLIPVisionModelWithProjection(image_encoder_config, dtype=jnp.dtype(dtype)))
        if self.image_encoder is not None and image_encoder_config.hidden_size != config.reference_channels:
            raise ValueError(f"The image encoder's hidden size is {image_encoder_config.hidden_size} but the model's "
                             f"reference_channels is {config.reference_channels}; pass the encoder it was trained "
                             "with.")
        self.components = components
        self.scheduler = scheduler
        self.dtype = jnp.dtype(dtype)
        self.attention = dict(attention_implementation=attention_implementation,
                              attention_chunk_size=attention_chunk_size)
        # The VAE stays float32 whatever `dtype` (its last layers set the pixels; it is a small part of the cost).
        self.vae = AutoencoderKL(components.vae_config, dtype=jnp.float32)
        self.text_encoder = CLIPTextModel(components.text_encoder_config, dtype=self.dtype)
        self.params = {k: jax.tree_util.tree_map(lambda a, k=k: jnp.asarray(a, jnp.float32 if k == "vae" else
                                                                         self.dtype), v)
                       for k, v in params.items()}
        self.vae_scale_factor = 2 ** (len(components.vae_config.block_out_channels) - 1)
        self._compiled: dict[tuple, Any] = {}

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, delta: str | os.PathLike | None = None,
                        delta_scale: float = 1.0, scheduler: str = "perflow", dtype: Any = jnp.float32,
                        image_encoder: str | os.PathLike | None = None, **kwargs: Any) -> MultiViewPipeline:
        """Load a multi-view model folder, merge an optional PeRFlow ΔW of its base SD family (a file or folder,
        as :func:`perflow_jax.delta.read_delta` takes) into the 2D weights, and pick a scheduler. A
        ``reference="clip"`` model also loads its CLIP image encoder: `image_encoder`, else the folder's
        ``image_encoder/`` (without one, reference images are refused at call time)."""
        root = os.fspath(path)
        index = read_model_index(root)
        config, unet_params = load_multiview_unet(os.path.join(root, "unet"))
        if delta is not None:
            base, _ = split_base_params(unet_params)
            unet_params = merge_base_delta(unet_params, delta_lib.read_delta(delta, base), delta_scale)
        vae_config, vae_params = load_vae(os.path.join(root, "vae"))
        te_config, te_params = load_clip_text_model(os.path.join(root, "text_encoder"), with_projection=False)
        tokenizer = load_tokenizer(os.path.join(root, "tokenizer"), max_length=te_config.max_position_embeddings)
        sched_path = os.path.join(root, "scheduler", "scheduler_config.json")
        components = PipelineComponents(root, "sd", index, config.unet, unet_params, vae_config, vae_params,
                                        te_config, te_params, tokenizer,
                                        read_json(sched_path) if os.path.isfile(sched_path) else None)
        params = {"unet": unet_params, "vae": vae_params, "text_encoder": te_params}
        encoder_config = None
        if image_encoder is not None and config.reference != "clip":
            raise ValueError(f"image_encoder= is for reference='clip' models; this one has "
                             f"reference={config.reference!r}.")
        encoder_dir = os.fspath(image_encoder) if image_encoder is not None else os.path.join(root, "image_encoder")
        if config.reference == "clip" and os.path.isdir(encoder_dir):
            encoder_config, params["image_encoder"] = load_clip_vision_model(encoder_dir)
        elif image_encoder is not None:
            raise ValueError(f"image_encoder {encoder_dir!r} is not a folder; pass a CLIP image_encoder/ folder.")
        return cls(config, params, components, make_scheduler(components, scheduler), dtype=dtype,
                   image_encoder_config=encoder_config, **kwargs)

    # -- host side ------------------------------------------------------------------------------------------

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        tok = self.components.tokenizer
        out = tok(list(texts), padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="np")
        return np.asarray(out["input_ids"], np.int32)

    def __call__(self, prompt: str | Sequence[str], negative_prompt: str = "", *,
                 cameras: np.ndarray | None = None, num_views: int = 4, elevation: float = 15.0,
                 azimuths: Sequence[float] | None = None, distance: float = 1.0,
                 reference_image: np.ndarray | None = None, reference_scale: float = 1.0,
                 num_inference_steps: int = 4, guidance_scale: float = 7.5, seed: int = 0,
                 height: int | None = None, width: int | None = None, output_type: str = "float") -> np.ndarray:
        """``(B·N, H, W, 3)`` images, the N views of each prompt consecutive.

        Args:
          cameras: ``(N, 4, 4)`` (or ``(N, 16)``) camera matrices for every prompt; default
            :func:`orbit_cameras` at `elevation` and `distance` with `azimuths` (default N evenly spaced).
          reference_image: ``(H, W, 3)`` RGB, uint8 or float in [0, 1]. For a ``reference="latent"`` model it
            must have the output size (it is VAE-encoded as it is); for ``reference="clip"`` it is resized and
            center-cropped as CLIP's image processor does (any size).
          guidance_scale: CFG scale (traced); ≤ 1 runs the conditional model alone.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("prompt is empty; pass one or more prompts.")
        steps = values.check_int("num_inference_steps", num_inference_steps, min_value=1)
        guidance = values.check_float("guidance_scale", guidance_scale)
        seed = values.check_seed("seed", seed)
        reference_scale = values.check_float("reference_scale", reference_scale)
        f = self.vae_scale_factor
        sample = self.config.unet.sample_size or 32  # MVDream: 256² images, 32² latents
        sh, sw = sample if isinstance(sample, tuple) else (sample, sample)
        h, w = height or sh * f, width or sw * f
        if h % f or w % f or h <= 0 or w <= 0:
            raise ValueError(f"height and width must be positive multiples of {f}, got {h}x{w}.")
        if cameras is None:
            n = values.check_int("num_views", num_views, min_value=1)
            azimuths = [360.0 * i / n for i in range(n)] if azimuths is None else list(azimuths)
            if len(azimuths) != n:
                raise ValueError(f"Got {len(azimuths)} azimuths for num_views={n}; pass one per view.")
            cameras = orbit_cameras(elevation, azimuths, distance)
        cams = np.asarray(cameras, np.float32)
        if cams.ndim not in (2, 3) or cams.shape[1:] not in ((4, 4), (16,)):
            raise ValueError(f"cameras must be (N, 4, 4) or (N, 16) camera-to-world matrices, got shape {cams.shape}.")
        values.check_finite_arrays([("cameras", cams)], "The camera matrices")
        n = cams.shape[0]
        ref = None
        if reference_image is not None and self.config.reference == "clip":
            if self.image_encoder is None:
                raise ValueError("reference_image needs this reference='clip' model's CLIP image encoder; load the "
                                 "pipeline with image_encoder=DIR (or put it in the model's image_encoder/).")
            values.check_finite_arrays([("reference_image", np.asarray(reference_image, np.float32))],
                                       "The reference image")
            ref = preprocess_images(np.asarray(reference_image), image_size=self.image_encoder.config.image_size)
            ref = np.repeat(ref, len(prompts), axis=0)
        elif reference_image is not None:
            if self.config.reference != "latent":
                raise ValueError(f"reference_image needs a model with reference layers; this one has "
                                 f"reference={self.config.reference!r}.")
            ref = np.asarray(reference_image)
            if ref.shape != (h, w, 3):
                raise ValueError(f"reference_image must be an RGB image of the output size ({h}, {w}, 3), got shape "
                                 f"{ref.shape}.")
            ref = (ref.astype(np.float32) / 255.0 if ref.dtype == np.uint8 else ref.astype(np.float32))
            values.check_finite_arrays([("reference_image", ref)], "The reference image")
            ref = np.repeat(ref.transpose(2, 0, 1)[None], len(prompts), axis=0)
        ids = self.tokenize(prompts)
        neg = self.tokenize([negative_prompt] * len(prompts))
        if output_type not in ("float", "uint8", "latent"):
            raise ValueError(f"output_type must be 'float', 'uint8' or 'latent', got {output_type!r}.")
        shape = (len(prompts) * n, self.config.unet.in_channels, h // f, w // f)
        key = (shape, steps, ref is not None, guidance > 1.0, output_type)
        state = self.scheduler.set_timesteps(steps, sample_shape=shape)
        if key not in self._compiled:
            self._compiled[key] = jax.jit(self._program(n, guidance > 1.0, output_type, shape))
        out = self._compiled[key](self.params, state, ids, neg, np.tile(cams.reshape(n, 16), (len(prompts), 1)),
                                  ref, np.uint32(seed), np.float32(guidance), np.float32(reference_scale))
        return np.asarray(out)

    # -- device side ----------------------------------------------------------------------------------------

    def _program(self, n: int, use_cfg: bool, output_type: str, shape: tuple[int, ...]) -> Any:
        """``fn(params, state, ids, neg_ids, cams, ref, seed, guidance, ref_scale) -> images`` for N = `n` views
        and latents of `shape` (B·N, C, h, w)."""

        def program(params: Any, state: Any, ids: jax.Array, neg_ids: jax.Array, cams: jax.Array,
                    ref: jax.Array | None, seed: jax.Array, guidance: jax.Array, ref_scale: jax.Array) -> jax.Array:
            cond = self.encode_prompt(params, ids, cams, n)
            key = jax.random.key(seed)
            if ref is not None:
                cond["reference"] = self.encode_reference(params, ref, key)
            latents = self.initial_latents(state, shape, key)
            model = self.model_fn(params, n, ref_scale)
            if use_cfg:
                uncond = self.encode_prompt(params, neg_ids, cams, n)
                if ref is not None:
                    uncond["reference"] = jnp.zeros_like(cond["reference"])
                denoiser = sampling.classifier_free_guidance(model, cond, uncond, guidance)
            else:
                denoiser = sampling.conditional(model, cond)
            x = sampling.sample(self.scheduler, state, denoiser, latents, key=jax.random.fold_in(key, 2))
            return x if output_type == "latent" else decode_latents(self.vae, params["vae"],
                                                                    self.components.vae_config, x, output_type)

        return program

    def encode_prompt(self, params: Any, ids: jax.Array, cams: jax.Array, n: int) -> dict:
        """Token ids (B, L) → the condition of the B·N views: text per view (repeated) and cameras."""
        hidden = self.text_encoder.apply({"params": params["text_encoder"]}, ids).last_hidden_state
        return {"text": jnp.repeat(hidden, n, axis=0), "cameras": cams}

    def encode_reference(self, params: Any, ref: jax.Array, key: jax.Array) -> jax.Array:
        """The reference context per sample: VAE latents ``(B, C, h, w)`` (sampled with ``fold_in(key, 1)``) of
        images ``(B, 3, H, W)`` in [0, 1], or CLIP penultimate hidden states ``(B, L, D)`` of pixel values."""
        if self.config.reference == "clip":
            return self.image_encoder.apply({"params": params["image_encoder"]}, ref).penultimate
        keys = jax.random.split(jax.random.fold_in(key, 1), ref.shape[0])
        return encode_images(self.vae, params["vae"], self.components.vae_config, ref, keys)

    def initial_latents(self, state: Any, shape: tuple[int, ...], key: jax.Array) -> jax.Array:
        """Seeded float32 noise of `shape` (B·N, C, h, w) times the scheduler's ``init_noise_sigma``."""
        return sampling.init_latents(jax.random.fold_in(key, 0), shape, self.scheduler, state)

    def model_fn(self, params: Any, n: int, ref_scale: jax.Array) -> sampling.ModelFn:
        """The multi-view UNet as ``model_fn(x, timesteps, cond) -> float32`` for :mod:`perflow_jax.sampling`."""

        def fn(x: jax.Array, timesteps: jax.Array, cond: dict) -> jax.Array:
            out = multiview_apply(self.config, params["unet"], x, timesteps, cond["text"], num_views=n,
                                  cameras=cond["cameras"], reference=cond.get("reference"),
                                  reference_scale=ref_scale, dtype=self.dtype, **self.attention)
            return out.astype(jnp.float32)

        return fn
