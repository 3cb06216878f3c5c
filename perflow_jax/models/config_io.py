"""Reading model configs: every model (UNet, VAE, CLIP text encoder) reads its ``config.json`` through
:func:`read_config_json`, so a missing or broken file gives the same clear error everywhere."""

from __future__ import annotations

import json
import os
from typing import Any

__all__ = ["CONFIG_NAME", "read_config_json", "read_json"]

CONFIG_NAME = "config.json"


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """Load a JSON object from `path`; a missing file, invalid JSON or UTF-8, or JSON that is not an object
    (a list, a number, ...) raises an error naming the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} does not exist.")
    with open(path, encoding="utf-8") as f:
        try:
            obj = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path!r} is not valid JSON: {e}") from e
        except UnicodeDecodeError as e:
            raise ValueError(f"{path!r} is not UTF-8 text, so not a JSON file: {e}") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path!r} holds a JSON {_json_type(obj)}; expected a JSON object ({{...}}) of settings.")
    return obj


def _json_type(obj: Any) -> str:
    return {list: "list", str: "string", bool: "boolean", type(None): "null"}.get(type(obj), "number")


def read_config_json(path: str | os.PathLike) -> dict[str, Any]:
    """Load a model's ``config.json`` given the file or the folder holding it."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No model config at {path!r}: expected a {CONFIG_NAME}.")
    return read_json(path)
