"""The scheduler contract: what a scheduler module defines and the :class:`Scheduler` bundle built from it.

A scheduler is one module holding

* a frozen, hashable ``Config`` dataclass on :class:`ConfigMixin` (diffusers ``scheduler_config.json``
  in and out), whose ``__post_init__`` validates its fields;
* a ``State`` pytree of precomputed float32/int32 arrays (a ``flax.struct.dataclass``);
* five pure functions, config first, with exactly these parameters::

    set_timesteps(config, num_inference_steps, *, sample_shape=None) -> state
    step(config, state, model_output, step_index, sample, key=None) -> (sample, state)
    add_noise(config, original, noise, timesteps, state=None) -> noisy
    scale_model_input(config, state, sample, step_index) -> sample
    init_noise_sigma(config, state) -> σ_init

* ``make(config) -> Scheduler``, which is ``bundle(name, config, <the module>)``.

:func:`bundle` closes the five functions over the config, giving the uniform interface the sampling loop,
pipelines and CLI use with any registered scheduler (see the :class:`Scheduler` docstring).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping
from types import ModuleType
from typing import Any, ClassVar, NamedTuple, Protocol, Self

import jax

from perflow_jax.io import read_json

#: The five functions a scheduler module defines; :func:`bundle` binds each to the config.
FUNCTIONS = ("set_timesteps", "step", "add_noise", "scale_model_input", "init_noise_sigma")


class SetTimestepsFn(Protocol):
    """``set_timesteps(num_inference_steps, *, sample_shape=None, **options) -> state``.

    Host-side, once per step count: builds the state's precomputed arrays. Multistep schedulers size
    their history by `sample_shape` (the latents' shape); single-step ones ignore it. `options` are
    scheduler-specific keywords (LCM's ``strength``).
    """

    def __call__(self, num_inference_steps: int, *, sample_shape: tuple[int, ...] | None = None,
                 **options: Any) -> Any: ...


class StepFn(Protocol):
    """``step(state, model_output, step_index, sample, key=None) -> (prev_sample, state)``.

    jit/scan-safe: `step_index` may be traced. Math is float32; the sample comes back in `sample`'s dtype.
    `key` is a PRNG key that stochastic steps require (deterministic ones ignore it). The returned state
    has the tree structure, shapes and dtypes of the one passed in (a ``lax.scan`` carry); it carries the
    multistep history and is returned unchanged by single-step schedulers.
    """

    def __call__(self, state: Any, model_output: jax.Array, step_index: jax.typing.ArrayLike, sample: jax.Array,
                 key: jax.Array | None = None) -> tuple[jax.Array, Any]: ...


class AddNoiseFn(Protocol):
    """``add_noise(original, noise, timesteps, state=None) -> noisy``, in `original`'s shape and dtype.

    Forward diffusion to the given model timesteps (scalar or per sample). Entries of ``state.timesteps``
    are always valid; schedulers that look timesteps up in the schedule need the `state`.
    """

    def __call__(self, original: jax.Array, noise: jax.Array, timesteps: jax.typing.ArrayLike,
                 state: Any = None) -> jax.Array: ...


class ScaleModelInputFn(Protocol):
    """``scale_model_input(state, sample, step_index) -> model input`` (the identity for most schedulers)."""

    def __call__(self, state: Any, sample: jax.Array, step_index: jax.typing.ArrayLike) -> jax.Array: ...


class InitNoiseSigmaFn(Protocol):
    """``init_noise_sigma(state) -> σ``: the std of the initial noise (1 for the VP schedulers)."""

    def __call__(self, state: Any) -> jax.typing.ArrayLike: ...


class Scheduler(NamedTuple):
    """A scheduler's pure functions closed over its frozen config: the interface every consumer uses::

        sched = schedulers.get("perflow", num_time_windows=4, prediction_type="diff_eps")
        state = sched.set_timesteps(8, sample_shape=latents.shape)   # host-side, once per step count
        x = latents * sched.init_noise_sigma(state)
        for i in range(state.timesteps.shape[0]):                      # or lax.scan: sampling.sample
            out = model(sched.scale_model_input(state, x, i), state.timesteps[i])
            x, state = sched.step(state, out, i, x, key)

    Attributes:
      name: registry name (e.g. ``"perflow"``).
      config: the frozen Config dataclass.
      set_timesteps: see :class:`SetTimestepsFn`.
      step: see :class:`StepFn`.
      add_noise: see :class:`AddNoiseFn`.
      scale_model_input: see :class:`ScaleModelInputFn`.
      init_noise_sigma: see :class:`InitNoiseSigmaFn`.
    """

    name: str
    config: Any
    set_timesteps: SetTimestepsFn
    step: StepFn
    add_noise: AddNoiseFn
    scale_model_input: ScaleModelInputFn
    init_noise_sigma: InitNoiseSigmaFn


def bundle(name: str, config: Any, module: ModuleType) -> Scheduler:
    """The :class:`Scheduler` of `module`'s five contract functions (:data:`FUNCTIONS`) bound to `config`.

    A module's ``make`` is ``bundle("<name>", config, sys.modules[__name__])``.
    """
    missing = [f for f in FUNCTIONS if not callable(getattr(module, f, None))]
    if missing:
        raise TypeError(f"Scheduler module {module.__name__} lacks {', '.join(missing)}; a scheduler module "
                        f"defines all of {', '.join(FUNCTIONS)}.")
    return Scheduler(name, config, *(functools.partial(getattr(module, f), config) for f in FUNCTIONS))


# Shared defaults for the two functions most schedulers do not need (a module assigns them to its names).


def unscaled_model_input(config: Any, state: Any, sample: jax.Array, step_index: jax.typing.ArrayLike
                         ) -> jax.Array:
    """The model sees the sample as is (VP schedulers)."""
    del config, state, step_index
    return sample


def unit_noise_sigma(config: Any, state: Any) -> float:
    """The initial noise is N(0, 1) (VP schedulers)."""
    del config, state
    return 1.0


# ----------------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------------


class ConfigMixin:
    """``from_dict`` / ``from_json`` / ``to_dict`` for a frozen Config dataclass; `class_name` is the
    diffusers ``_class_name`` it reads and writes."""

    class_name: ClassVar[str] = ""

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Self:
        """From a diffusers ``scheduler_config.json`` dict; unknown keys are ignored."""
        if not isinstance(d, Mapping):
            raise TypeError(f"{cls.__name__}.from_dict expects a mapping, got {type(d).__name__}.")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> Self:
        """From a ``scheduler_config.json`` file (or the folder holding one)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "scheduler_config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No scheduler config at {path!r}: expected a diffusers scheduler_config.json.")
        return cls.from_dict(read_json(path))

    def to_dict(self) -> dict[str, Any]:
        """A dict diffusers' ``from_config`` reads (``_class_name`` first; tuples become lists for JSON)."""
        out: dict[str, Any] = {"_class_name": self.class_name}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out
