"""Write Flax pipeline components as a diffusers-format folder (PyTorch-layout safetensors), without torch.

The folder is what ``DiffusionPipeline.from_pretrained`` reads: ``model_index.json``, ``unet/``, ``vae/``,
``text_encoder/`` (and ``text_encoder_2/`` for SDXL) with ``config.json`` + safetensors under diffusers /
transformers key names, ``tokenizer/`` (``tokenizer_2/``) and ``scheduler/``. Use it to hand a merged model
(single-file checkpoint + PeRFlow ΔW + LoRAs) to PyTorch tools; ``to="flax"`` writes the same folder with
``flax_model.msgpack`` weights instead. Written to a temp folder, then renamed.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from safetensors.numpy import save_file

from perflow_jax.delta import torch_unet_state_dict
from perflow_jax.io import atomic_dir, write_json
from perflow_jax.models.components import PipelineComponents
from perflow_jax.models.convert import torch_state_dict
from perflow_jax.models.keymap import flax_attention_to_torch, rename_torch_attention
from perflow_jax.models.weights_io import FLAX_WEIGHTS, save_flax_checkpoint

__all__ = ["save_pipeline", "torch_state_dict", "vae_torch_state_dict"]

# model_index entries that this writer produces
_WRITTEN = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


def vae_torch_state_dict(params: Mapping, dtype: Any = None) -> dict[str, np.ndarray]:
    """Flax VAE params → diffusers ``AutoencoderKL`` state dict (mid attention as ``to_q``/.../``to_out.0``)."""
    return torch_state_dict(params, key=flax_attention_to_torch, rename=rename_torch_attention, dtype=dtype,
                            what="AutoencoderKL")


def _clip_config(config: Any, projection: bool) -> dict[str, Any]:
    cfg = {k: v for k, v in dataclasses.asdict(config).items() if k != "architectures"}
    legacy = config.eos_token_id == 2  # SD configs: bos 0, pad 1, eos 2
    return {**cfg, "architectures": ["CLIPTextModelWithProjection" if projection else "CLIPTextModel"],
            "model_type": "clip_text_model", "bos_token_id": 0 if legacy else 49406, "pad_token_id": 1}


def _model_index(components: PipelineComponents) -> dict[str, Any]:
    sdxl = components.text_encoder_2_params is not None
    # other components (safety checker, feature extractor, ...) are not written: null them
    index = {k: [None, None] if isinstance(v, list) and k not in _WRITTEN else v
             for k, v in (components.model_index or {}).items()}
    index.setdefault("_class_name", "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline")
    if "requires_safety_checker" in index:
        index["requires_safety_checker"] = False
    index |= {"unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
              "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"]}
    if sdxl:
        index |= {"text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                  "tokenizer_2": ["transformers", "CLIPTokenizer"]}
    if components.scheduler_config is not None:
        index["scheduler"] = ["diffusers", components.scheduler_config.get("_class_name", "DDIMScheduler")]
    else:
        index.pop("scheduler", None)
    return index


def _write_json(obj: Any, path: str) -> None:
    write_json(path, obj, indent=2, sort_keys=True)  # NaN / inf refused: JSON has no such numbers


def _write_model(folder: str, config: dict[str, Any], params: Mapping, to_torch: Callable[..., dict], weights: str,
                 to: str, dtype: Any) -> None:
    """One model folder: ``config.json`` + PyTorch-layout safetensors (diffusers) or ``flax_model.msgpack``."""
    os.makedirs(folder)
    _write_json(config, os.path.join(folder, "config.json"))
    if to == "diffusers":
        save_file(to_torch(params, dtype=dtype), os.path.join(folder, weights), metadata={"format": "pt"})
    else:
        if dtype is not None:
            params = jax.tree_util.tree_map(lambda a: np.asarray(a).astype(dtype), dict(params))
        save_flax_checkpoint(params, os.path.join(folder, FLAX_WEIGHTS))


def save_pipeline(components: PipelineComponents, dst: str | os.PathLike, *, to: str = "diffusers",
                  dtype: Any = None, overwrite: bool = False) -> str:
    """Write `components` as a pipeline folder: ``to="diffusers"`` (PyTorch-layout safetensors, loadable by
    diffusers' ``DiffusionPipeline.from_pretrained`` and by perflow-jax) or ``to="flax"`` (``flax_model.msgpack``
    per model, what ``perflow-jax convert`` writes; loaded as is, without re-layout, by ``load_pipeline_components``).

    Args:
      components: e.g. from :func:`~perflow_jax.models.single_file.load_single_file`, after merging ΔW / LoRAs.
      dst: the folder to create (built in a temp folder next to it, then renamed into place).
      to: ``"diffusers"`` or ``"flax"``.
      dtype: cast all weights to this dtype (e.g. ``np.float16``); default: keep each param's dtype.
      overwrite: replace an existing `dst`; only an empty folder or one perflow-jax wrote (its manifest lists
        every file in it) is replaced, and `dst` may never be, contain or lie inside ``components.path``.

    Returns the folder written. Model configs are written from the components' config dataclasses; tokenizers
    with ``save_pretrained``; safety checker / feature extractor entries of model_index.json are set to null.
    """
    if to not in ("diffusers", "flax"):
        raise ValueError(f"to= must be 'diffusers' or 'flax', got {to!r}.")
    dst = os.path.abspath(os.fspath(dst))
    with atomic_dir(dst, overwrite=overwrite, sources=(components.path,)) as tmp:
        c = components
        _write_model(os.path.join(tmp, "unet"), {"_class_name": "UNet2DConditionModel", **c.unet_config.to_dict()},
                     c.unet_params, torch_unet_state_dict, "diffusion_pytorch_model.safetensors", to, dtype)
        _write_model(os.path.join(tmp, "vae"), {"_class_name": "AutoencoderKL", **dataclasses.asdict(c.vae_config)},
                     c.vae_params, vae_torch_state_dict, "diffusion_pytorch_model.safetensors", to, dtype)
        encoders = [("text_encoder", c.text_encoder_config, c.text_encoder_params, c.tokenizer, False)]
        if c.text_encoder_2_params is not None:
            encoders.append(("text_encoder_2", c.text_encoder_2_config, c.text_encoder_2_params, c.tokenizer_2, True))
        for name, config, params, tokenizer, projection in encoders:
            _write_model(os.path.join(tmp, name), _clip_config(config, projection), params, torch_state_dict,
                         "model.safetensors", to, dtype)
            tokenizer.save_pretrained(os.path.join(tmp, name.replace("text_encoder", "tokenizer")))
        if c.scheduler_config is not None:
            os.makedirs(os.path.join(tmp, "scheduler"))
            _write_json(c.scheduler_config, os.path.join(tmp, "scheduler", "scheduler_config.json"))
        _write_json(_model_index(c), os.path.join(tmp, "model_index.json"))
    return dst
