"""Single-file Stable Diffusion checkpoints (original LDM / SGM key layout) → Flax components, without torch.

Community models and DreamBooth fine-tunes are often one ``.safetensors`` file holding every model under the
original CompVis / Stability key names:

==========================================  ================================================================
``model.diffusion_model.*``                 UNet (``input_blocks`` / ``middle_block`` / ``output_blocks``)
``first_stage_model.*``                     VAE (``encoder.down.N.block.M`` ..., mid attention as 1×1 convs)
``cond_stage_model.transformer.*``          SD1.x text encoder (transformers CLIP names)
``cond_stage_model.model.*``                SD2.x text encoder (OpenCLIP ViT-H: fused ``in_proj``)
``conditioner.embedders.0.transformer.*``   SDXL text encoder 1 (transformers CLIP names)
``conditioner.embedders.1.model.*``         SDXL text encoder 2 (OpenCLIP ViT-bigG)
==========================================  ================================================================

The LDM names are rewritten to diffusers names (prefix tables built from the model config; the OpenCLIP
``in_proj_weight`` is split into q/k/v and ``text_projection`` transposed) and then fed to the generic
:func:`perflow_jax.models.convert.torch_to_flax`, so the usual strict key accounting applies. The family
(``sd15`` / ``sd21`` / ``sdxl``) is detected from the key prefixes; the configs come from the base folder
when it has them (``unet/config.json`` ...), else from the real SD1.5 / SD2.1 / SDXL-base configs shipped
in ``perflow_jax/models/configs/<family>/``. Tokenizers, scheduler config and model_index always come from
the base folder, which must be a diffusers folder of the same family.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from perflow_jax.hub import resolve_model_path
from perflow_jax.models.clip import CLIPTextConfig, clip_param_shapes, rename_clip_torch_key
from perflow_jax.models.components import PipelineComponents, load_tokenizer, read_model_index
from perflow_jax.models.config_io import read_config_json
from perflow_jax.models.convert import torch_to_flax
from perflow_jax.models.keymap import rename_torch_attention
from perflow_jax.models.mismatch import ConversionError
from perflow_jax.models.unet import UNetConfig, unet_param_shapes
from perflow_jax.models.vae import VAEConfig, vae_param_shapes
from perflow_jax.models.weights_io import read_safetensors

__all__ = [
    "FAMILIES",
    "UNET_PREFIX",
    "VAE_PREFIX",
    "CheckpointParts",
    "detect_family",
    "family_config",
    "load_single_file",
    "openclip_to_hf",
    "rewrite_key",
    "split_checkpoint",
    "unet_ldm_table",
    "vae_ldm_table",
]

FAMILIES = ("sd15", "sd21", "sdxl")
_ALIASES = {"sd1": "sd15", "sd1.5": "sd15", "sd2": "sd21", "sd2.1": "sd21", "sd-xl": "sdxl", "sdxl-base": "sdxl"}
CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# text-encoder prefix → (component, layout); "hf" = transformers CLIP names, "openclip" = OpenCLIP names
TEXT_PREFIXES = {
    "cond_stage_model.transformer.": ("text_encoder", "hf"),
    "cond_stage_model.model.": ("text_encoder", "openclip"),
    "conditioner.embedders.0.transformer.": ("text_encoder", "hf"),
    "conditioner.embedders.1.model.": ("text_encoder_2", "openclip"),
}
# Keys that are not model weights: EMA copies (the regular weights are used, as in diffusers), the diffusion
# schedule buffers (LDM's and SGM's ``denoiser.*``), v-prediction / zero-SNR markers.
_NON_WEIGHTS = ("model_ema.", "denoiser.", "betas", "alphas_cumprod", "sqrt_", "log_one_minus_", "posterior_", "logvar",
                "v_pred", "ztsnr", "lvlb_weights")
_REFINER_PREFIX = "conditioner.embedders.0.model."  # SDXL refiner: OpenCLIP-only conditioner
_TEXT_IGNORE = (r"(^|\.)position_ids$", r"^logit_scale$")
_DEFAULT_PREDICTION = {"sd15": "epsilon", "sd21": "v_prediction", "sdxl": "epsilon"}


# ----------------------------------------------------------------------------------------------------------
# Key tables: LDM module prefix → diffusers module prefix (inverse with {v: k for k, v in table.items()})
# ----------------------------------------------------------------------------------------------------------

_UNET_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
               "nin_shortcut": "conv_shortcut"}
_VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _add(table: dict[str, str], ldm: str, diffusers: str, inner: Mapping[str, str] | None = None) -> None:
    if inner is None:
        table[ldm] = diffusers
    else:
        table.update({f"{ldm}.{a}": f"{diffusers}.{b}" for a, b in inner.items()})


def unet_ldm_table(config: UNetConfig) -> dict[str, str]:
    """LDM UNet module names (``input_blocks.1.0.in_layers.2``) → diffusers ones (``down_blocks.0.resnets.0.conv1``).

    Transformer blocks keep their inner names in both layouts, so only their prefix is listed.
    """
    t = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
         "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}
    if config.addition_embed_type == "text_time":
        t |= {"label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2"}
    n, layers = len(config.block_out_channels), config.per_block("layers_per_block")
    i = 1
    for b in range(n):
        attn = config.down_block_types[b].startswith("CrossAttn")
        for j in range(layers[b]):
            _add(t, f"input_blocks.{i}.0", f"down_blocks.{b}.resnets.{j}", _UNET_RESNET)
            if attn:
                _add(t, f"input_blocks.{i}.1", f"down_blocks.{b}.attentions.{j}")
            i += 1
        if b < n - 1:
            _add(t, f"input_blocks.{i}.0.op", f"down_blocks.{b}.downsamplers.0.conv")
            i += 1
    _add(t, "middle_block.0", "mid_block.resnets.0", _UNET_RESNET)
    _add(t, "middle_block.1", "mid_block.attentions.0")
    _add(t, "middle_block.2", "mid_block.resnets.1", _UNET_RESNET)
    i = 0
    for b in range(n):
        attn = config.up_block_types[b].startswith("CrossAttn")
        for j in range(layers[n - 1 - b] + 1):
            _add(t, f"output_blocks.{i}.0", f"up_blocks.{b}.resnets.{j}", _UNET_RESNET)
            if attn:
                _add(t, f"output_blocks.{i}.1", f"up_blocks.{b}.attentions.{j}")
            if b < n - 1 and j == layers[n - 1 - b]:
                _add(t, f"output_blocks.{i}.{2 if attn else 1}.conv", f"up_blocks.{b}.upsamplers.0.conv")
            i += 1
    return t


def vae_ldm_table(config: VAEConfig) -> dict[str, str]:
    """LDM VAE module names (``decoder.up.0.block.1``) → diffusers ones (``decoder.up_blocks.N-1.resnets.1``).

    The decoder's ``up`` list is stored lowest resolution last in LDM and first in diffusers.
    """
    t = {m: m for m in ("quant_conv", "post_quant_conv")}
    n = len(config.block_out_channels)
    for part in ("encoder", "decoder"):
        t |= {f"{part}.conv_in": f"{part}.conv_in", f"{part}.conv_out": f"{part}.conv_out",
              f"{part}.norm_out": f"{part}.conv_norm_out"}
        _add(t, f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", _VAE_RESNET)
        _add(t, f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", _VAE_RESNET)
        if config.mid_block_add_attention:
            _add(t, f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0", _VAE_ATTENTION)
    for b in range(n):
        for j in range(config.layers_per_block):
            _add(t, f"encoder.down.{b}.block.{j}", f"encoder.down_blocks.{b}.resnets.{j}", _VAE_RESNET)
        for j in range(config.layers_per_block + 1):
            _add(t, f"decoder.up.{n - 1 - b}.block.{j}", f"decoder.up_blocks.{b}.resnets.{j}", _VAE_RESNET)
        if b < n - 1:
            _add(t, f"encoder.down.{b}.downsample.conv", f"encoder.down_blocks.{b}.downsamplers.0.conv")
            _add(t, f"decoder.up.{n - 1 - b}.upsample.conv", f"decoder.up_blocks.{b}.upsamplers.0.conv")
    return t


def rewrite_key(key: str, table: Mapping[str, str]) -> str | None:
    """Replace the longest dotted prefix of `key` found in `table`; None when no prefix is listed."""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:i])
        if head in table:
            return ".".join([table[head], *parts[i:]])
    return None


def _renamer(table: Mapping[str, str], then: Callable[[str], str] | None = None) -> Callable[[str], str]:
    """A ``torch_to_flax`` rename: unknown keys pass through unchanged, so they are reported as unexpected."""

    def rename(key: str) -> str:
        new = rewrite_key(key, table)
        new = key if new is None else new
        return then(new) if then else new

    return rename


# OpenCLIP text transformer → transformers CLIP names
_OPENCLIP_TABLE = {"token_embedding": "text_model.embeddings.token_embedding",
                   "ln_final": "text_model.final_layer_norm"}
_OPENCLIP_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                   "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


def openclip_to_hf(sd: Mapping[str, np.ndarray], num_layers: int | None = None) -> dict[str, np.ndarray]:
    """OpenCLIP text-tower weights → transformers ``CLIPTextModel[WithProjection]`` names and layouts.

    ``attn.in_proj_weight`` / ``in_proj_bias`` (q, k, v stacked on axis 0) are split; ``positional_embedding``
    becomes the position embedding; ``text_projection`` (used as ``x @ P``) is transposed to a Linear weight.
    With `num_layers`, resblocks from that index on are dropped (SD2 uses the penultimate layer of ViT-H's 24).
    Unknown keys are kept as they are, to be reported by the strict converter.
    """
    out: dict[str, np.ndarray] = {}
    for key, value in sd.items():
        parts = key.split(".")
        if key == "positional_embedding":
            out["text_model.embeddings.position_embedding.weight"] = value
        elif key == "text_projection":
            out["text_projection.weight"] = np.ascontiguousarray(np.asarray(value).T)
        elif parts[:2] == ["transformer", "resblocks"] and len(parts) > 3:
            layer, rest = int(parts[2]), ".".join(parts[3:])
            if num_layers is not None and layer >= num_layers:
                continue
            prefix = f"text_model.encoder.layers.{layer}"
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                leaf = rest.rsplit("_", 1)[1]
                for name, chunk in zip(("q_proj", "k_proj", "v_proj"), np.split(np.asarray(value), 3), strict=True):
                    out[f"{prefix}.self_attn.{name}.{leaf}"] = chunk
            else:
                new = rewrite_key(rest, _OPENCLIP_LAYER)
                out[f"{prefix}.{new}" if new else key] = value
        else:
            out[rewrite_key(key, _OPENCLIP_TABLE) or key] = value
    return out


# ----------------------------------------------------------------------------------------------------------
# Splitting a checkpoint and detecting its family
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class CheckpointParts:
    """A single-file checkpoint split by component; the prefixes are stripped from the keys."""

    unet: dict[str, np.ndarray]
    vae: dict[str, np.ndarray]
    text_encoders: dict[str, tuple[str, dict[str, np.ndarray]]]  # component → (layout "hf"/"openclip", weights)
    markers: set[str]  # non-weight keys found, e.g. {"v_pred"}


def split_checkpoint(sd: Mapping[str, np.ndarray], path: str = "checkpoint") -> CheckpointParts:
    """Sort the keys of an LDM/SGM checkpoint into UNet, VAE and text encoders (strict: unknown keys raise)."""
    parts = CheckpointParts({}, {}, {}, set())
    unknown = []
    for key, value in sd.items():
        if key.startswith(UNET_PREFIX):
            parts.unet[key[len(UNET_PREFIX):]] = value
        elif key.startswith(VAE_PREFIX):
            parts.vae[key[len(VAE_PREFIX):]] = value
        elif key.startswith(_REFINER_PREFIX):
            raise ConversionError(f"{path!r} is an SDXL refiner checkpoint ({_REFINER_PREFIX}* keys); only "
                                  "SD1.x, SD2.x and SDXL-base models are supported.")
        elif (prefix := next((p for p in TEXT_PREFIXES if key.startswith(p)), None)) is not None:
            component, layout = TEXT_PREFIXES[prefix]
            if component in parts.text_encoders and parts.text_encoders[component][0] != layout:
                raise ConversionError(f"{path!r} holds both OpenAI-CLIP and OpenCLIP weights for {component}; it "
                                      "mixes SD1.x and SD2.x key layouts.")
            parts.text_encoders.setdefault(component, (layout, {}))[1][key[len(prefix):]] = value
        elif key.startswith(_NON_WEIGHTS):
            parts.markers.add(key)
        else:
            unknown.append(key)
    if not parts.unet:
        found = sorted({k.split(".")[0] for k in sd})[:10]
        raise ConversionError(
            f"{path!r} is not a single-file Stable Diffusion checkpoint in the original LDM/SGM layout: it has no "
            f"'{UNET_PREFIX}*' keys (top-level key prefixes found: {found}). Diffusers-format UNet files belong in "
            "a diffusers folder; LoRA files are loaded with perflow_jax.lora.load_lora."
        )
    if unknown:
        raise ConversionError(f"{path!r} has {len(unknown)} keys that belong to no SD component, e.g. "
                              f"{sorted(unknown)[:10]}.")
    return parts


def _normalize_family(family: str) -> str:
    f = _ALIASES.get(family.lower(), family.lower())
    if f not in FAMILIES:
        raise ValueError(f"Unknown model family {family!r}; expected one of {FAMILIES}.")
    return f


def detect_family(parts: CheckpointParts) -> str:
    """``"sdxl"`` (two text encoders), ``"sd21"`` (OpenCLIP text encoder) or ``"sd15"`` (OpenAI CLIP), from the
    text-encoder prefixes; without a text encoder, from the UNet's cross-attention width (768/1024/2048)."""
    te = parts.text_encoders
    if "text_encoder_2" in te:
        return "sdxl"
    if "text_encoder" in te:
        return "sd21" if te["text_encoder"][0] == "openclip" else "sd15"
    widths = {v.shape[-1] for k, v in parts.unet.items() if k.endswith("attn2.to_k.weight")}
    by_width = {768: "sd15", 1024: "sd21", 2048: "sdxl"}
    if len(widths) == 1 and (w := widths.pop()) in by_width:
        return by_width[w]
    raise ConversionError(f"Cannot tell the model family of this checkpoint (no text encoder; cross-attention "
                          f"widths {sorted(widths)}); pass family= one of {FAMILIES}.")


def _base_family(base: str, index: Mapping[str, Any]) -> str | None:
    """The family of a diffusers base folder, from model_index.json and its text encoder config."""
    if "text_encoder_2" in index:
        return "sdxl"
    cfg = os.path.join(base, "text_encoder", "config.json")
    if not os.path.isfile(cfg):
        return None
    return "sd21" if read_config_json(cfg).get("hidden_act") == "gelu" else "sd15"


# ----------------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------------


def family_config(family: str, component: str) -> dict[str, Any]:
    """The shipped diffusers/transformers config dict of `component` (``unet``, ``vae``, ``text_encoder``,
    ``text_encoder_2``) for `family` (the real SD1.5 / SD2.1 / SDXL-base configs)."""
    path = os.path.join(CONFIG_DIR, _normalize_family(family), f"{component}.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No shipped {component} config for family {family!r} ({path!r}).")
    return read_config_json(path)


def _config(family: str, component: str, base: str | None, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """Base folder's ``<component>/config.json`` if present, else the shipped one; then `overrides`."""
    path = os.path.join(base, component, "config.json") if base else None
    cfg = read_config_json(path) if path and os.path.isfile(path) else family_config(family, component)
    return {**cfg, **(overrides or {})}


# ----------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------


def _clip_params(weights: dict[str, np.ndarray], layout: str, config: CLIPTextConfig, projection: bool,
                 family: str, dtype: Any, what: str) -> dict:
    ignore = list(_TEXT_IGNORE)
    if layout == "openclip":
        # SD2 conditions on ViT-H's penultimate layer and has no projection: drop the last block and text_projection.
        weights = openclip_to_hf(weights, config.num_hidden_layers if family == "sd21" else None)
    if not projection:
        ignore.append(r"^text_projection\.")
    return torch_to_flax(weights, clip_param_shapes(config, projection), rename=rename_clip_torch_key, ignore=ignore,
                         dtype=dtype, what=what)


def load_single_file(path: str | os.PathLike, base: str | os.PathLike | None, dtype: Any = None,
                     family: str | None = None, config_overrides: Mapping[str, Mapping[str, Any]] | None = None,
                     prediction_type: str | None = None) -> PipelineComponents:
    """Load an LDM/SGM single-file ``.safetensors`` checkpoint (SD1.x, SD2.x, SDXL-base) as Flax components.

    Args:
      path: the ``.safetensors`` file (``model.diffusion_model.*``, ``first_stage_model.*``, text encoder(s)).
      base: a diffusers folder (or Hugging Face repo id) of the same family: tokenizers, scheduler config and
        model_index are taken from it. Configs rule: ``<base>/<component>/config.json`` when the base folder has
        it, else the shipped family config (``perflow_jax/models/configs/<family>/``).
      dtype: cast all params to this dtype (default: keep the file's).
      family: ``"sd15"``, ``"sd21"`` or ``"sdxl"`` (aliases ``sd1``, ``sd2``). The family is always detected
        from the text-encoder key prefixes; if given, a different detected family raises.
      config_overrides: per-component config updates, e.g. ``{"unet": {"in_channels": 9}}``.
      prediction_type: ``"epsilon"`` or ``"v_prediction"``, set in the base's scheduler config (used by non-PeRFlow
        schedulers). Default: ``v_prediction`` if the file has a ``v_pred`` marker key, else the base folder's
        setting, else the family's (SD2.1: v). SD2.1-*base* fine-tunes are ε: pass it, or use an SD2.1-base folder.

    Raises:
      ValueError / ConversionError: no base folder, unknown key layout, family mismatch, weights that do not fit
      the configs (missing, unexpected and mis-shaped keys are listed).
    """
    path = os.fspath(path)
    if base is None:
        raise ValueError(
            "A single-file checkpoint carries no tokenizer or scheduler config: pass base=<a diffusers folder of "
            "the same family> (e.g. stable-diffusion-v1-5, stable-diffusion-2-1 or stable-diffusion-xl-base-1.0); "
            "its tokenizer(s), scheduler and model_index.json are used."
        )
    parts = split_checkpoint(read_safetensors(path), path)
    detected = detect_family(parts)
    if family is not None and _normalize_family(family) != detected:
        layouts = {k: layout for k, (layout, _) in parts.text_encoders.items()}
        raise ConversionError(f"{path!r} looks like a {detected} checkpoint (text encoders: {layouts}), "
                              f"not {family!r}.")
    family = detected
    base = resolve_model_path(os.fspath(base))
    index = read_model_index(base)
    base_family = _base_family(base, index)
    if base_family is not None and base_family != family:
        raise ConversionError(f"The checkpoint {path!r} is {family} but the base folder {base!r} is {base_family}; "
                              "use a base model of the same family (it provides tokenizers and scheduler).")
    needed = ["text_encoder"] + (["text_encoder_2"] if family == "sdxl" else [])
    missing = [c for c in needed if c not in parts.text_encoders] + (["vae"] if not parts.vae else [])
    if missing:
        raise ConversionError(f"{path!r} lacks weights for {missing}; only full checkpoints (UNet, VAE and text "
                              "encoder(s)) are supported.")
    overrides = dict(config_overrides or {})

    unet_config = UNetConfig.from_dict(_config(family, "unet", base, overrides.get("unet")))
    unet_params = torch_to_flax(parts.unet, unet_param_shapes(unet_config),
                                rename=_renamer(unet_ldm_table(unet_config)), dtype=dtype,
                                what=f"UNet ({family} single file)")
    vae_config = VAEConfig.from_dict(_config(family, "vae", base, overrides.get("vae")))
    vae_params = torch_to_flax(parts.vae, vae_param_shapes(vae_config),
                               rename=_renamer(vae_ldm_table(vae_config), rename_torch_attention), dtype=dtype,
                               what=f"AutoencoderKL ({family} single file)")
    te = {}
    for component in needed:
        cfg = CLIPTextConfig.from_dict(_config(family, component, base, overrides.get(component)))
        layout, weights = parts.text_encoders[component]
        te[component] = cfg, _clip_params(weights, layout, cfg, component == "text_encoder_2", family, dtype,
                                          f"{component} ({family} single file)")

    scheduler_config = _scheduler_config(base, family, parts, prediction_type)
    comps = PipelineComponents(
        path, "sdxl" if family == "sdxl" else "sd", index, unet_config, unet_params, vae_config, vae_params,
        te["text_encoder"][0], te["text_encoder"][1],
        load_tokenizer(os.path.join(base, "tokenizer"), max_length=te["text_encoder"][0].max_position_embeddings),
        scheduler_config)
    if family == "sdxl":
        comps.text_encoder_2_config, comps.text_encoder_2_params = te["text_encoder_2"]
        comps.tokenizer_2 = load_tokenizer(os.path.join(base, "tokenizer_2"),
                                           max_length=comps.text_encoder_2_config.max_position_embeddings)
    return comps


def _scheduler_config(base: str, family: str, parts: CheckpointParts, prediction_type: str | None) -> dict | None:
    """The base folder's scheduler config (None if it has none) with the checkpoint's prediction type."""
    path = os.path.join(base, "scheduler", "scheduler_config.json")
    if not os.path.isfile(path):
        return None
    config = read_config_json(path)
    if prediction_type is None and "v_pred" in parts.markers:
        prediction_type = "v_prediction"
    if prediction_type is None:
        prediction_type = config.get("prediction_type", _DEFAULT_PREDICTION[family])
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}.")
    return {**config, "prediction_type": prediction_type}
