"""LoRA-PeRFlow: train only low-rank factors on the reference's target layers and export them as a
diffusers/PEFT LoRA.

The reference trains PeRFlow as a PEFT LoRA (``LoraConfig(r=64, target_modules=[...])``) over the attention
projections, the transformer ``proj_in``/``proj_out``, the feed-forward layers, the resnet convs and
``time_emb_proj``, and the up/down-sample convs (:data:`TARGETS`; a layer is adapted when its diffusers module
name is a target or ends with ``"." + target``, as PEFT matches). Here the factors are a nested dict that
mirrors the UNet's Flax param paths (``{..., "conv1": {"down": ..., "up": ...}}``) and the student is the
teacher with ``W + (α / r) · up ∘ down`` merged into each adapted kernel, which equals PEFT's
``base(x) + B(A(x)) · α / r`` (for a conv: A is a conv with the base kernel's size, B a 1×1 conv). α = r, so
the scale is 1; the export needs no α and both readers default to α = r.

Layouts (Flax): Dense kernel (in, out): down (in, r), up (r, out). Conv kernel (kh, kw, in, out): down
(kh, kw, in, r), up (r, out). Init as PEFT: down uniform in ±1/√fan_in (kaiming-uniform, a = √5), up zeros,
so training starts at the teacher.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors.numpy import save_file

from perflow_jax.io import atomic_file
from perflow_jax.models.keymap import torch_key

TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
           "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")
LORA_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' load_lora_weights looks for in a folder


def target_paths(params: Mapping) -> dict[tuple[str, ...], str]:
    """Flax module path → diffusers module name, for every kernel of `params` that :data:`TARGETS` adapts."""
    out = {}
    for path in traverse_util.flatten_dict(dict(params)):
        if path[-1] != "kernel":
            continue
        name = torch_key(path).removesuffix(".weight")
        if any(name == t or name.endswith("." + t) for t in TARGETS):
            out[path[:-1]] = name
    return out


def init_lora(params: Mapping, rank: int, key: jax.Array) -> dict:
    """LoRA factors (float32) for every target layer of the UNet `params`: down kaiming-uniform, up zeros."""
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"train.lora_rank={rank!r} must be a positive integer.")
    flat = traverse_util.flatten_dict(dict(params))
    factors = {}
    for i, path in enumerate(sorted(target_paths(params))):
        kernel = flat[path + ("kernel",)]
        *taps, fan_out = kernel.shape  # (in,) or (kh, kw, in)
        bound = 1.0 / np.sqrt(np.prod(taps))
        down = jax.random.uniform(jax.random.fold_in(key, i), (*taps, rank), jnp.float32, -bound, bound)
        factors[path] = {"down": down, "up": jnp.zeros((rank, fan_out), jnp.float32)}
    if not factors:
        raise ValueError(f"This UNet has no layer named like the LoRA targets {TARGETS}.")
    return traverse_util.unflatten_dict({p + (k,): v for p, f in factors.items() for k, v in f.items()})


def _factor_paths(lora: Mapping) -> list[tuple[str, ...]]:
    return sorted({p[:-1] for p in traverse_util.flatten_dict(dict(lora))})


def merge(params: Mapping, lora: Mapping) -> dict:
    """The UNet params with ``W + down @ up`` on every adapted kernel (in the kernel's dtype; traceable)."""
    flat = dict(traverse_util.flatten_dict(dict(params)))
    factors = traverse_util.flatten_dict(dict(lora))
    for path in _factor_paths(lora):
        w = flat[path + ("kernel",)]
        delta = jnp.tensordot(factors[path + ("down",)], factors[path + ("up",)], axes=1)
        flat[path + ("kernel",)] = (w.astype(jnp.float32) + delta).astype(w.dtype)
    return traverse_util.unflatten_dict(flat)


def to_peft_state_dict(lora: Mapping) -> dict[str, np.ndarray]:
    """The factors in diffusers/PEFT layout: ``unet.<module>.lora_A.weight`` (r, in[, kh, kw]) and
    ``lora_B.weight`` (out, r[, 1, 1]), PyTorch layout, float32."""
    factors = traverse_util.flatten_dict(dict(lora))
    sd = {}
    for path in _factor_paths(lora):
        down = np.asarray(factors[path + ("down",)], np.float32)
        up = np.asarray(factors[path + ("up",)], np.float32)
        name = "unet." + torch_key(path + ("kernel",)).removesuffix(".weight")
        if down.ndim == 4:  # conv: A (r, in, kh, kw), B (out, r, 1, 1)
            a, b = down.transpose(3, 2, 0, 1), up.T[:, :, None, None]
        else:
            a, b = down.T, up.T
        sd[f"{name}.lora_A.weight"] = np.ascontiguousarray(a)
        sd[f"{name}.lora_B.weight"] = np.ascontiguousarray(b)
    return sd


def export(lora: Mapping, folder: str | os.PathLike) -> str:
    """Write the factors as ``<folder>/pytorch_lora_weights.safetensors`` (atomic), readable by
    :func:`perflow_jax.lora.load_lora` (``perflow-jax sample --lora``) and diffusers' ``load_lora_weights``."""
    path = os.path.join(os.fspath(folder), LORA_FILE)
    with atomic_file(path) as tmp:
        save_file(to_peft_state_dict(jax.device_get(dict(lora))), tmp,
                  metadata={"format": "pt", "what": "PeRFlow LoRA (alpha = rank)"})
    return path


__all__ = ["LORA_FILE", "TARGETS", "export", "init_lora", "merge", "target_paths", "to_peft_state_dict"]
