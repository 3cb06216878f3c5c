"""Reading model configs: every model (UNet, VAE, CLIP text encoder) reads its ``config.json`` through
:func:`read_config_json`, so a missing or broken file gives the same clear error everywhere; and
:func:`per_block`, the one reading of diffusers' "one value, or one per block" config fields."""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable, Collection, Mapping
from typing import Any, TypeVar

from perflow_jax.io import read_json

__all__ = ["CONFIG_NAME", "config_fields", "config_from_json", "per_block", "read_config_json", "read_json"]

CONFIG_NAME = "config.json"


def read_config_json(path: str | os.PathLike) -> dict[str, Any]:
    """Load a model's ``config.json`` given the file or the folder holding it."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No model config at {path!r}: expected a {CONFIG_NAME}.")
    return read_json(path)


C = TypeVar("C")


def config_from_json(from_dict: Callable[[dict[str, Any]], C], path: str | os.PathLike) -> C:
    """A model config from ``config.json`` (or the folder holding it) through `from_dict`; a bad value's error
    names the file."""
    d = read_config_json(path)
    try:
        return from_dict(d)
    except ValueError as e:
        file = os.path.join(path, CONFIG_NAME) if os.path.isdir(path) else os.fspath(path)
        raise ValueError(f"{file!r}: {e}") from e


def per_block(value: Any, n: int, what: str) -> tuple:
    """A config value that is one value for every block or a tuple of one per block, as a tuple of `n`; a tuple
    of another length is a ValueError naming `what` (e.g. ``"UNet config layers_per_block"``)."""
    if not isinstance(value, tuple):
        return (value,) * n
    if len(value) != n:
        raise ValueError(f"{what}={value} must have one entry per down block ({n}).")
    return value


def config_fields(cls: type, d: Mapping[str, Any], what: str, known: Collection[str] = ()) -> dict[str, Any]:
    """The entries of a diffusers config dict `d` that are fields of the dataclass `cls`. ``_`` keys and `known`
    keys (read elsewhere, or irrelevant here) are dropped quietly; any other key is dropped with a warning naming
    `what` (e.g. ``"UNet"``)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in d if k not in fields and k not in known and not k.startswith("_"))
    if unknown:
        warnings.warn(f"Ignoring unknown {what} config keys {unknown}.", stacklevel=3)
    return {k: v for k, v in d.items() if k in fields}
