"""PeRFlow settings per model family, taken from the released PeRFlow models.

A model whose ``scheduler/scheduler_config.json`` already holds PeRFlow keys (``PeRFlowScheduler`` or a
``num_time_windows`` entry) uses those. Otherwise the family's defaults below apply on top of the model's
own beta schedule (``beta_start``, ``beta_end``, ``beta_schedule``, ``num_train_timesteps``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from perflow_jax.models.components import PipelineComponents


@dataclasses.dataclass(frozen=True)
class FamilyDefaults:
    """Defaults for one model family (released PeRFlow models: K = 4 windows)."""

    family: str
    prediction_type: str
    num_inference_steps: int
    guidance_scale: float
    num_time_windows: int = 4


FAMILY_DEFAULTS = {
    "sd15": FamilyDefaults("sd15", "diff_eps", 4, 4.5),   # SD1.5 PeRFlow: 4–8 steps, CFG 4.5–7.5
    "sd21": FamilyDefaults("sd21", "velocity", 4, 4.5),   # SD2.1 PeRFlow: velocity parameterisation
    "sdxl": FamilyDefaults("sdxl", "ddim_eps", 4, 2.0),   # SDXL PeRFlow: 4–6 steps, CFG ≈ 2
}

_BETA_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")


def model_family(components: PipelineComponents) -> str:
    """``"sd15"`` (SD1.x), ``"sd21"`` (SD2.x) or ``"sdxl"``, from the pipeline layout and UNet config.

    SD2.x UNets are the single-encoder ones with linear transformer projections (SD1.x uses 1×1 convs).
    """
    if components.family == "sdxl":
        return "sdxl"
    return "sd21" if components.unet_config.use_linear_projection else "sd15"


def has_perflow_settings(scheduler_config: dict[str, Any] | None) -> bool:
    return bool(scheduler_config) and (
        scheduler_config.get("_class_name") == "PeRFlowScheduler" or "num_time_windows" in scheduler_config)


def perflow_config_dict(components: PipelineComponents) -> dict[str, Any]:
    """The PeRFlow scheduler config dict for these components (model's own, else family defaults)."""
    sc = components.scheduler_config or {}
    if has_perflow_settings(sc):
        return {**sc, "_class_name": "PeRFlowScheduler"}
    d = FAMILY_DEFAULTS[model_family(components)]
    base = {k: sc[k] for k in _BETA_KEYS if k in sc}
    return {"_class_name": "PeRFlowScheduler", **base, "prediction_type": d.prediction_type,
            "num_time_windows": d.num_time_windows}
