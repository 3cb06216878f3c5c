"""LoRA weights (diffusers/PEFT and kohya layouts) merged into Flax UNet and text-encoder params.

Layouts read (from one ``.safetensors`` file, no torch):

* diffusers / PEFT: ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` (or the older ``lora.down`` /
  ``lora.up``), ``text_encoder.<module>...``, ``text_encoder_2.<module>...``; α from ``<module>.alpha`` keys, or
  from the ``lora_adapter_metadata`` header diffusers writes (``<component>.lora_alpha`` / ``alpha_pattern``),
  else α = rank.
* kohya (sd-scripts, also LoCon conv LoRAs): ``lora_unet_<module>`` / ``lora_te_<module>`` (``lora_te1_`` /
  ``lora_te2_`` for SDXL) with ``.lora_down.weight``, ``.lora_up.weight``, ``.alpha``, the module path written
  with ``_`` for ``.`` — UNet modules in diffusers naming (SD1/SD2) or in the original SGM naming
  (``input_blocks_4_1_...``, SDXL).

Merging: ``W ← W + scale · (α / rank) · up @ down`` (conv LoRAs: the same per kernel tap), computed in float32
and cast back to W's dtype — what diffusers' ``fuse_lora(lora_scale=scale)`` does.

Order with a PeRFlow ΔW: merge ΔW into the base UNet first, then the LoRAs (:func:`merge_loras` on components
whose UNet already holds W + ΔW). ΔW was computed as W_perflow − W_base against the base model's exact weights
and its loader checks it against the UNet's full parameter tree, whereas LoRAs are small deltas on a subset of
layers meant to be stacked on whatever model they are loaded into. All merges are additive and done in
float32, so the other order differs only by rounding (≤ 1e-6 in float32; more with fp16/bf16 params, which
are rounded after each merge).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from perflow_jax.models.components import PipelineComponents
from perflow_jax.models.keymap import to_flax_layout, torch_key
from perflow_jax.models.mismatch import KeyMismatch
from perflow_jax.models.single_file import rewrite_key, unet_ldm_table
from perflow_jax.models.weights_io import read_safetensors, read_safetensors_metadata
from perflow_jax.values import check_finite_arrays, check_float, check_float_tensor

__all__ = ["LoRA", "LoRAError", "LoRAModule", "load_lora", "merge_loras"]

_KOHYA = re.compile(r"^lora_(unet|te1|te2|te)_([^.]+)\.(lora_down\.weight|lora_up\.weight|alpha)$")
_DIFFUSERS = re.compile(r"^(unet|text_encoder|text_encoder_2)\.(.+?)\.(lora_A\.weight|lora_B\.weight|"
                        r"lora\.down\.weight|lora\.up\.weight|alpha)$")
_KOHYA_COMPONENT = {"unet": "unet", "te": "text_encoder", "te1": "text_encoder", "te2": "text_encoder_2"}
_ROLE = {"lora_down.weight": "down", "lora_A.weight": "down", "lora.down.weight": "down",
         "lora_up.weight": "up", "lora_B.weight": "up", "lora.up.weight": "up", "alpha": "alpha"}


class LoRAError(ValueError):
    """A LoRA file that cannot be read or does not fit the model."""


@dataclasses.dataclass(frozen=True)
class LoRAModule:
    """One adapted layer: ``down`` (rank, in[, kh, kw]) and ``up`` (out, rank[, 1, 1]) in PyTorch layout."""

    down: np.ndarray
    up: np.ndarray
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self) -> np.ndarray:
        """``(α / rank) · up @ down`` in float32, PyTorch layout ``(out, in)`` or ``(out, in, kh, kw)``."""
        down, up = np.asarray(self.down, np.float32), np.asarray(self.up, np.float32)
        up2 = up.reshape(up.shape[0], self.rank)
        if down.ndim == 4 and down.shape[2:] != (1, 1):
            d = np.einsum("or,rihw->oihw", up2, down)
        else:
            d = up2 @ down.reshape(self.rank, -1)
            if down.ndim == 4:
                d = d[:, :, None, None]
        alpha = self.rank if self.alpha is None else self.alpha
        return d * np.float32(alpha / self.rank)


@dataclasses.dataclass
class LoRA:
    """LoRA weights read from one file. ``modules`` maps ``(component, module name as in the file)`` → weights;
    names are resolved against a model only when merging (kohya names need the model to undo ``_``)."""

    path: str
    layout: str  # "diffusers" or "kohya"
    modules: dict[tuple[str, str], LoRAModule]

    def components(self) -> set[str]:
        return {c for c, _ in self.modules}


def _peft_alpha(metadata: Mapping[str, Any], component: str, module: str) -> float | None:
    """α of `module` from diffusers' ``lora_adapter_metadata`` (PEFT ``lora_alpha`` + ``alpha_pattern``)."""
    patterns = metadata.get(f"{component}.alpha_pattern") or {}
    for pattern, alpha in patterns.items():
        if re.fullmatch(rf"(.*\.)?(?:{pattern})", module):
            return float(alpha)
    alpha = metadata.get(f"{component}.lora_alpha")
    return None if alpha is None else float(alpha)


def _read_metadata(path: str) -> dict[str, Any]:
    raw = read_safetensors_metadata(path).get("lora_adapter_metadata")
    return json.loads(raw) if raw else {}


def load_lora(path: str | os.PathLike) -> LoRA:
    """Read a LoRA ``.safetensors`` file in the diffusers/PEFT or kohya layout (see the module docstring).

    Raises:
      LoRAError: unknown layout (lists example keys), unsupported variants (DoRA, LoCon CP ``lora_mid``,
        LoHa/LoKr), or modules with a down but no up weight (or vice versa).
    """
    path = os.fspath(path)
    sd = read_safetensors(path)
    if not sd:
        raise LoRAError(f"{path!r} holds no tensors.")
    for key, value in sd.items():
        try:
            check_float_tensor(value, path, key, integers_ok=key.endswith("alpha"))
        except ValueError as e:
            raise LoRAError(str(e)) from e
    extras = sorted({k.split(".")[-2] if k.endswith(".weight") else k.split(".")[-1] for k in sd
                     if any(s in k for s in ("dora_scale", "lora_mid", "hada_", "lokr_", "lora_magnitude"))})
    if extras:
        raise LoRAError(f"{path!r} is a LoRA variant perflow-jax does not merge (found {extras}: DoRA, LoCon-CP, "
                        "LoHa or LoKr); only plain LoRA (down/up [+ alpha]) is supported.")
    kohya = {k: m for k in sd if (m := _KOHYA.match(k))}
    diffusers = {k: m for k in sd if (m := _DIFFUSERS.match(k))}
    if len(kohya) == len(sd):
        layout, matches = "kohya", {k: (_KOHYA_COMPONENT[m[1]], m[2], _ROLE[m[3]]) for k, m in kohya.items()}
    elif len(diffusers) == len(sd):
        layout, matches = "diffusers", {k: (m[1], m[2], _ROLE[m[3]]) for k, m in diffusers.items()}
    else:
        best = kohya if len(kohya) >= len(diffusers) else diffusers
        odd = sorted(set(sd) - set(best))
        raise LoRAError(
            f"{path!r} is not a LoRA in a known layout: {len(odd)} of {len(sd)} keys fit neither the kohya layout "
            "(lora_unet_*/lora_te*_*.lora_down.weight|lora_up.weight|alpha) nor the diffusers/PEFT layout "
            "(unet|text_encoder|text_encoder_2.<module>.lora_A|lora_B.weight), e.g. " + ", ".join(odd[:5]) + "."
        )
    parts: dict[tuple[str, str], dict[str, Any]] = {}
    for key, (component, module, role) in matches.items():
        parts.setdefault((component, module), {})[role] = sd[key]
    incomplete = sorted(f"{c}:{m}" for (c, m), p in parts.items() if not {"down", "up"} <= set(p))
    if incomplete:
        raise LoRAError(f"{path!r}: {len(incomplete)} modules lack their down or up weight, e.g. {incomplete[:5]}.")
    metadata = _read_metadata(path) if layout == "diffusers" else {}
    modules = {}
    for (component, module), p in parts.items():
        try:
            alpha = float(np.asarray(p["alpha"]).reshape(())) if "alpha" in p else _peft_alpha(metadata, component,
                                                                                                 module)
        except (TypeError, ValueError) as e:
            raise LoRAError(f"{path!r}: unreadable alpha for {component}:{module} ({e}).") from e
        if alpha is not None and not np.isfinite(alpha):
            raise LoRAError(f"{path!r}: the alpha of {component}:{module} must be a finite number, got {alpha}.")
        if p["down"].shape[0] != p["up"].shape[1]:
            raise LoRAError(f"{path!r}: {component}:{module} has down {p['down'].shape} and up {p['up'].shape} "
                            "with different ranks.")
        modules[(component, module)] = LoRAModule(p["down"], p["up"], alpha)
    return LoRA(path, layout, modules)


def _check_scale(lora: LoRA, scale: Any) -> float:
    """A LoRA's merge scale as a finite float; the error names the file."""
    try:
        return check_float(f"The scale of LoRA {lora.path!r}", scale)
    except ValueError as e:
        raise LoRAError(str(e)) from e


# ----------------------------------------------------------------------------------------------------------
# Resolving module names against the model
# ----------------------------------------------------------------------------------------------------------


def _canonical(name: str) -> str:
    """Name used for lookups: ``.`` → ``_`` (kohya spelling), without a leading ``text_model``."""
    return name.replace(".", "_").removeprefix("text_model_")


def _targets(component: str, params: Mapping, comps: PipelineComponents) -> dict[str, tuple[str, ...]]:
    """Canonical module name → Flax module path, for every layer with a ``kernel`` (Dense / Conv)."""
    table = {}
    ldm = {v: k for k, v in unet_ldm_table(comps.unet_config).items()} if component == "unet" else {}
    for path in traverse_util.flatten_dict(dict(params)):
        if path[-1] != "kernel":
            continue
        key = torch_key(path)
        table[_canonical(key.removesuffix(".weight"))] = path[:-1]
        if (ldm_key := rewrite_key(key, ldm)) is not None:  # the SGM (LDM) spelling of kohya's SDXL LoRAs
            table[_canonical(ldm_key.removesuffix(".weight"))] = path[:-1]
    return table


def merge_loras(components: PipelineComponents, loras: Iterable[tuple[LoRA, float]]) -> PipelineComponents:
    """Merge LoRAs into the UNet and text-encoder params: ``W + Σ scale · (α/rank) · up @ down`` in float32,
    cast back to each param's dtype. Returns new components; the input is not modified.

    Args:
      components: e.g. from ``load_pipeline_components`` / ``load_single_file``, with a PeRFlow ΔW already
        merged into ``unet_params`` (ΔW first, then LoRAs; see the module docstring).
      loras: ``[(lora, scale), ...]``, e.g. ``[(load_lora("style.safetensors"), 0.8)]``.

    Raises:
      LoRAError: modules the model lacks (listed, with the component), components the model lacks (e.g. an
        SDXL LoRA's ``text_encoder_2`` on SD1.5), or shape mismatches (a LoRA for another model family).
    """
    loras = [(lora, _check_scale(lora, scale)) for lora, scale in loras]
    params = {"unet": components.unet_params, "text_encoder": components.text_encoder_params,
              "text_encoder_2": components.text_encoder_2_params}
    tables: dict[str, dict[str, tuple[str, ...]]] = {}
    flats = {c: traverse_util.flatten_dict(dict(p)) for c, p in params.items() if p is not None}
    sums: dict[tuple[str, tuple[str, ...]], np.ndarray] = {}
    report, absent = KeyMismatch(), dict[str, int]()
    for lora, scale in loras:
        for (component, module), weights in lora.modules.items():
            if component not in flats:
                absent[component] = absent.get(component, 0) + 1
                continue
            if component not in tables:
                tables[component] = _targets(component, params[component], components)
            target = tables[component].get(_canonical(module))
            if target is None:
                report.missing.append(f"{component}:{module}")
                continue
            kernel = flats[component][target + ("kernel",)]
            with np.errstate(over="ignore", invalid="ignore"):  # float32 overflow is reported after the merge
                delta = weights.delta()
            flax_delta = to_flax_layout(delta, "kernel", tuple(kernel.shape))
            if flax_delta.shape != tuple(kernel.shape):
                report.misshaped.append(f"{component}:{module}: LoRA up@down {delta.shape} (rank {weights.rank}) vs "
                                        f"the model's {'/'.join(target)}/kernel {tuple(kernel.shape)}")
                continue
            key = (component, target + ("kernel",))
            with np.errstate(over="ignore", invalid="ignore"):
                sums[key] = sums.get(key, 0.0) + np.float32(scale) * flax_delta
    report.missing[:0] = [f"{c}: {n} modules (this model has no {c})" for c, n in absent.items()]
    names = ", ".join(os.path.basename(lora.path) for lora, _ in loras)
    report.raise_if_any(
        f"The LoRA(s) {names} do not fit this {components.family} model "
        f"(UNet cross-attention width {components.unet_config.encoder_dim}):",
        labels=("target modules the model does not have", "unexpected", "shape mismatches"),
        hint="Is the LoRA for another model family (SD1.x / SD2.x / SDXL)?", error=LoRAError)

    merged = dict(params)
    for component in {c for c, _ in sums}:
        flat = dict(flats[component])
        for (c, path), d in sums.items():
            if c == component:
                w = np.asarray(flat[path])
                with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported just below
                    flat[path] = (w.astype(np.float32) + d).astype(w.dtype)
        try:
            check_finite_arrays(((f"{component}:{'/'.join(p)}", flat[p]) for c, p in sums if c == component),
                                f"Merging the LoRA(s) {names}")
        except ValueError as e:
            raise LoRAError(str(e)) from e
        merged[component] = traverse_util.unflatten_dict(flat)
    return dataclasses.replace(components, unet_params=merged["unet"], text_encoder_params=merged["text_encoder"],
                               text_encoder_2_params=merged["text_encoder_2"])

