"""Schedulers as pure functions, bundled like optax's GradientTransformation.

Each scheduler lives in its own module with a frozen, hashable ``Config``, a ``State`` pytree of
precomputed float32/int32 arrays, and pure functions. :func:`get` returns a :class:`Scheduler`: a
NamedTuple of those functions closed over one config, with a uniform signature so the sampling loop,
pipelines and CLI work with any registered scheduler::

    sched = schedulers.get("perflow", num_time_windows=4, prediction_type="diff_eps")
    state = sched.set_timesteps(8)                       # host-side, once per step count
    x, state = sched.step(state, model_output, i, x)     # jit/scan-safe; i may be traced

Adding a scheduler means adding one module that defines ``Config`` and ``make(config) -> Scheduler``
and calling :func:`register` for it below.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax


class Scheduler(NamedTuple):
    """A scheduler's pure functions closed over its frozen config.

    Attributes:
      name: registry name (e.g. ``"perflow"``).
      config: the frozen Config dataclass.
      set_timesteps: ``(num_inference_steps, **kw) -> state``; host-side, builds the precomputed arrays.
      step: ``(state, model_output, step_index, sample, key=None) -> (prev_sample, state)``; ``step_index``
        may be traced; ``key`` is a PRNG key for ancestral samplers (ignored by deterministic ones); the
        returned state carries multistep history (unchanged for single-step schedulers).
      add_noise: ``(original, noise, timesteps, state=None) -> noisy``; forward diffusion at integer
        training timesteps.
      scale_model_input: ``(state, sample, step_index) -> sample`` scaled for the model (identity for most).
      init_noise_sigma: ``(state) -> float`` the std of the initial noise.
    """

    name: str
    config: Any
    set_timesteps: Callable[..., Any]
    step: Callable[..., tuple[jax.Array, Any]]
    add_noise: Callable[..., jax.Array]
    scale_model_input: Callable[..., jax.Array]
    init_noise_sigma: Callable[[Any], Any]


def unscaled_bundle(name: str, config: Any, set_timesteps: Callable[..., Any], step: Callable[..., Any],
                    add_noise: Callable[..., Any]) -> Scheduler:
    """The bundle of a VP scheduler whose pure functions take the config first, whose model input is unscaled
    and whose initial noise has σ = 1 (DDIM, DDPM, LCM)."""
    import functools

    return Scheduler(
        name=name,
        config=config,
        set_timesteps=functools.partial(set_timesteps, config),
        step=functools.partial(step, config),
        add_noise=functools.partial(add_noise, config),
        scale_model_input=lambda state, sample, step_index: sample,
        init_noise_sigma=lambda state: 1.0,
    )


class _Entry(NamedTuple):
    config_cls: type
    make: Callable[[Any], Scheduler]


_REGISTRY: dict[str, _Entry] = {}
_CLASS_NAMES: dict[str, str] = {}


def register(name: str, config_cls: type, make: Callable[[Any], Scheduler], class_names: tuple[str, ...] = ()
             ) -> None:
    """Register a scheduler under `name` and the diffusers ``_class_name`` values that select it."""
    _REGISTRY[name] = _Entry(config_cls, make)
    for c in class_names:
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
        import dataclasses

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
    cfg = entry.config_cls.from_dict({**d, **overrides})
    return entry.make(cfg)


# Registration of the built-in schedulers (import at the end to avoid cycles).
from perflow_jax.schedulers import perflow as perflow  # noqa: E402

register("perflow", perflow.PeRFlowConfig, perflow.make, class_names=("PeRFlowScheduler",))

from perflow_jax.schedulers import (  # noqa: E402
    ddim,
    ddpm,
    dpmpp_2m,
    euler,
    euler_ancestral,
    lcm,
    unipc,
)

register("ddim", ddim.DDIMConfig, ddim.make, class_names=("DDIMScheduler",))
register("ddpm", ddpm.DDPMConfig, ddpm.make, class_names=("DDPMScheduler",))
register("euler", euler.EulerConfig, euler.make, class_names=("EulerDiscreteScheduler",))
register("euler_ancestral", euler_ancestral.EulerAncestralConfig, euler_ancestral.make,
         class_names=("EulerAncestralDiscreteScheduler",))
register("dpmpp_2m", dpmpp_2m.DPMSolverConfig, dpmpp_2m.make, class_names=("DPMSolverMultistepScheduler",))
register("unipc", unipc.UniPCConfig, unipc.make, class_names=("UniPCMultistepScheduler",))
register("lcm", lcm.LCMConfig, lcm.make, class_names=("LCMScheduler",))

__all__ = ["Scheduler", "available", "from_config", "get", "register", "resolve_name", "perflow", "ddim", "ddpm",
           "dpmpp_2m", "euler", "euler_ancestral", "lcm", "unipc"]
