"""Original single-file ControlNets (the LDM layout, keys ``control_model.*``) → Flax ControlNet params.

The original releases (lllyasviel's ControlNet 1.0/1.1) store the ControlNet as the LDM UNet encoder under
``control_model.``: ``input_blocks.*`` / ``middle_block.*`` / ``time_embed.*`` (``label_emb.*`` for SDXL) with
the UNet's LDM names, plus ``input_hint_block.{0,2,…}`` (the conditioning embedding's convs, SiLUs between),
``zero_convs.i.0`` (the per-skip zero convs) and ``middle_block_out.0``. Their keys are rewritten to diffusers
names with the UNet's LDM table (:func:`perflow_jax.models.single_file.unet_ldm_table`) and these extra rows,
then loaded strictly by the generic converter.

The original files carry no config: it is the base model's UNet config plus diffusers' ControlNet defaults
(:meth:`ControlNetConfig.from_unet`), or a diffusers ``config.json`` given explicitly. ``.pth`` pickles load only
with ``allow_pickle``; their safetensors conversions load as they are.
"""

from __future__ import annotations

import os
from typing import Any

from perflow_jax.models.controlnet import ControlNetConfig, controlnet_param_shapes
from perflow_jax.models.convert import torch_to_flax
from perflow_jax.models.single_file import rewrite_key, unet_ldm_table
from perflow_jax.models.unet import UNetConfig
from perflow_jax.models.weights_io import load_state_dict

__all__ = ["CONTROL_PREFIX", "controlnet_ldm_table", "is_controlnet_file", "load_controlnet_single_file"]

CONTROL_PREFIX = "control_model."


def controlnet_ldm_table(config: ControlNetConfig) -> dict[str, str]:
    """Original ControlNet module names (without ``control_model.``) → diffusers ControlNet module names."""
    table = {k: v for k, v in unet_ldm_table(config).items()
             if not k.startswith(("output_blocks.", "out."))}
    n_convs = 2 * len(config.conditioning_embedding_out_channels)  # conv_in, 2 per width step, conv_out
    for j in range(n_convs):
        name = "conv_in" if j == 0 else "conv_out" if j == n_convs - 1 else f"blocks.{j - 1}"
        table[f"input_hint_block.{2 * j}"] = f"controlnet_cond_embedding.{name}"
    layers = config.per_block("layers_per_block")
    skips = 1 + sum(layers) + len(layers) - 1
    table |= {f"zero_convs.{i}.0": f"controlnet_down_blocks.{i}" for i in range(skips)}
    table["middle_block_out.0"] = "controlnet_mid_block"
    return table


def is_controlnet_file(keys: Any) -> bool:
    """Whether a checkpoint's keys are an original single-file ControlNet."""
    return any(k.startswith(CONTROL_PREFIX + "input_hint_block.") for k in keys)


def load_controlnet_single_file(path: str | os.PathLike, config: ControlNetConfig | UNetConfig | str | os.PathLike,
                                dtype: Any = None, allow_pickle: bool = False) -> tuple[ControlNetConfig, dict]:
    """Load an original single-file ControlNet (``.safetensors``; ``.pth`` only with `allow_pickle`).

    Args:
      path: the checkpoint file.
      config: a :class:`ControlNetConfig`, the base model's :class:`UNetConfig` (the usual case: the original
        ControlNets are the base UNet's encoder with diffusers' default conditioning embedding), or a diffusers
        ControlNet ``config.json`` / its folder.
      dtype, allow_pickle: as :func:`perflow_jax.models.controlnet.load_controlnet`.

    Raises:
      ConversionError: unreadable weights, a pickle without `allow_pickle`, or weights that do not fit.
    """
    path = os.fspath(path)
    if isinstance(config, str | os.PathLike):
        config = ControlNetConfig.from_json(config)
    elif not isinstance(config, ControlNetConfig):
        config = ControlNetConfig.from_unet(config)
    sd = load_state_dict(path, allow_pickle=allow_pickle, lazy=True)
    if not is_controlnet_file(sd.keys()):
        raise ValueError(f"{path!r} is not an original ControlNet checkpoint (no control_model.input_hint_block.* "
                         "keys); pass a diffusers ControlNet folder or an original control_*.safetensors/.pth file.")
    table = controlnet_ldm_table(config)

    def rename(key: str) -> str:
        inner = key[len(CONTROL_PREFIX):] if key.startswith(CONTROL_PREFIX) else key
        new = rewrite_key(inner, table)
        return key if new is None else new

    params = torch_to_flax(sd, controlnet_param_shapes(config), rename=rename, dtype=dtype,
                           what=f"ControlNet ({os.path.basename(path)})")
    return config, params
