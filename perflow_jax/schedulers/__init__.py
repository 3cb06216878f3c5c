"""Schedulers as pure functions, bundled like optax's GradientTransformation.

Each scheduler is one module with a frozen, hashable Config, a State pytree of precomputed arrays and five
pure functions with one signature (the contract, :mod:`perflow_jax.schedulers.base`). :func:`get` returns
a :class:`Scheduler`: those functions closed over one config, so the sampling loop, pipelines and CLI work
with any registered scheduler::

    sched = schedulers.get("perflow", num_time_windows=4, prediction_type="diff_eps")
    state = sched.set_timesteps(8)                       # host-side, once per step count
    x, state = sched.step(state, model_output, i, x)     # jit/scan-safe; i may be traced

Adding a scheduler: one module with its Config, the five functions and ``make``, and one :func:`register`
line below.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from perflow_jax.schedulers import (
    base,
    common,
    ddim,
    ddpm,
    dpmpp_2m,
    euler,
    euler_ancestral,
    lcm,
    perflow,
    unipc,
)
from perflow_jax.schedulers.base import Scheduler


class _Entry(NamedTuple):
    config_cls: type
    make: Callable[[Any], Scheduler]


_REGISTRY: dict[str, _Entry] = {}
_CLASS_NAMES: dict[str, str] = {}


def register(name: str, config_cls: type, make: Callable[[Any], Scheduler], class_names: tuple[str, ...] = ()
             ) -> None:
    """Register a scheduler under `name`, selected also by the diffusers ``_class_name`` values
    `class_names` (default: the config's ``class_name``)."""
    _REGISTRY[name] = _Entry(config_cls, make)
    for c in class_names or (config_cls.class_name,):
        _CLASS_NAMES[c] = name


def available() -> tuple[str, ...]:
    """Names of the registered schedulers."""
    return tuple(sorted(_REGISTRY))


def resolve_name(name: str) -> str:
    """Map a registry name or a diffusers class name (``"DDIMScheduler"``) to a registry name."""
    if name in _REGISTRY:
        return name
    if name in _CLASS_NAMES:
        return _CLASS_NAMES[name]
    raise ValueError(
        f"Unknown scheduler {name!r}; available: {', '.join(available())} "
        f"(diffusers class names also accepted: {', '.join(sorted(_CLASS_NAMES))})."
    )


def get(name: str, config: Any = None, **config_fields: Any) -> Scheduler:
    """Build a :class:`Scheduler` by registry or diffusers class name, from a Config and/or fields."""
    entry = _REGISTRY[resolve_name(name)]
    if config is None:
        config = entry.config_cls(**config_fields)
    elif config_fields:
        config = dataclasses.replace(config, **config_fields)
    if not isinstance(config, entry.config_cls):
        raise TypeError(f"Scheduler {name!r} needs a {entry.config_cls.__name__}, got {type(config).__name__}.")
    return entry.make(config)


def from_config(d: Mapping[str, Any], name: str | None = None, **overrides: Any) -> Scheduler:
    """Build a scheduler from a diffusers ``scheduler_config.json`` dict; `name` overrides ``_class_name``."""
    key = name or d.get("_class_name")
    if key is None:
        raise ValueError("The scheduler config has no _class_name; pass name= to choose a scheduler.")
    entry = _REGISTRY[resolve_name(key)]
    return entry.make(entry.config_cls.from_dict({**d, **overrides}))


register("perflow", perflow.PeRFlowConfig, perflow.make)
register("ddim", ddim.DDIMConfig, ddim.make)
register("ddpm", ddpm.DDPMConfig, ddpm.make)
register("euler", euler.EulerConfig, euler.make)
register("euler_ancestral", euler_ancestral.EulerAncestralConfig, euler_ancestral.make)
register("dpmpp_2m", dpmpp_2m.DPMSolverConfig, dpmpp_2m.make)
register("unipc", unipc.UniPCConfig, unipc.make)
register("lcm", lcm.LCMConfig, lcm.make)

__all__ = ["Scheduler", "available", "from_config", "get", "register", "resolve_name", "base", "common", "perflow",
           "ddim", "ddpm", "dpmpp_2m", "euler", "euler_ancestral", "lcm", "unipc"]
