"""Checks for the numbers that enter perflow-jax: scalar arguments at the public API and tensors read from files.

Bad numbers are refused where they enter, with one clear line naming the argument (or the file and tensor),
instead of failing deep inside a jitted program or, worse, giving NaN images. A wrongly typed value raises
:class:`ValueTypeError`, which is both a ``TypeError`` (what Python code expects) and a ``ValueError`` (what the
CLI reports as a user error).
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["SEED_RANGE", "ValueTypeError", "check_finite_arrays", "check_float", "check_float_tensor", "check_int",
           "check_seed"]

#: Seeds are uint32 PRNG seeds: [0, 2**32).
SEED_RANGE = 2**32


class ValueTypeError(TypeError, ValueError):
    """A number of the wrong type (a float or bool where an int belongs, a string where a number belongs)."""


def _scalar(name: str, value: Any) -> Any:
    """A 0-d NumPy or JAX array as its NumPy scalar (other values as they are); a traced value is refused."""
    if isinstance(value, np.ndarray | jax.Array) and value.ndim == 0:
        try:
            return np.asarray(value)[()]
        except jax.errors.TracerArrayConversionError as e:
            raise ValueTypeError(f"{name} must be a concrete number, not a traced value (it is static here).") from e
    return value


def check_int(name: str, value: Any, *, min_value: int | None = None, max_value: int | None = None) -> int:
    """`value` as a Python int: any int or NumPy integer (not a bool) within [min_value, max_value].

    Raises:
      ValueTypeError: not an integer; ValueError: out of range.
    """
    value = _scalar(name, value)
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer):
        raise ValueTypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}.")
    v = int(value)
    if (min_value is not None and v < min_value) or (max_value is not None and v > max_value):
        if max_value is None:
            what = f"an integer ≥ {min_value}"
        elif min_value is None:
            what = f"an integer ≤ {max_value}"
        else:
            what = f"an integer in [{min_value}, {max_value}]"
        raise ValueError(f"{name} must be {what}, got {v}.")
    return v


def check_float(name: str, value: Any, *, min_value: float | None = None, allow_inf: bool = False) -> float:
    """`value` as a finite Python float (any real number but a bool), at least `min_value`.

    Raises:
      ValueTypeError: not a real number; ValueError: NaN, ±inf (unless `allow_inf`) or below `min_value`.
    """
    value = _scalar(name, value)
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
        raise ValueTypeError(f"{name} must be a number, got {type(value).__name__} {value!r}.")
    v = float(value)
    if math.isnan(v) or (math.isinf(v) and not allow_inf):
        raise ValueError(f"{name} must be a finite number, got {v}.")
    if min_value is not None and v < min_value:
        raise ValueError(f"{name} must be a finite number ≥ {min_value:g}, got {v}.")
    return v


def check_seed(name: str, value: Any) -> int:
    """A PRNG seed: an int in [0, 2**32)."""
    return check_int(name, value, min_value=0, max_value=SEED_RANGE - 1)


def check_float_tensor(value: Any, where: str, key: str, *, integers_ok: bool = False) -> None:
    """Refuse a tensor read from a file that is not floating point or holds NaN/±inf, also after the float32
    cast every merge does (a float64 1e300 overflows to inf).

    Args:
      value: the tensor (NumPy, ml_dtypes or JAX array).
      where: the file it was read from (named in the error).
      key: the tensor's name in the file (named in the error).
      integers_ok: accept integer dtypes too (a LoRA's scalar ``alpha``); bools never.
    """
    a = np.asarray(value)
    floating = jnp.issubdtype(a.dtype, jnp.floating)
    if not (floating or (integers_ok and jnp.issubdtype(a.dtype, jnp.integer))):
        kinds = "floating point or integer" if integers_ok else "floating point (float16, bfloat16, float32, float64)"
        raise ValueError(f"{where!r}: tensor {key!r} has dtype {a.dtype}; it must be {kinds}. Is this the right "
                         "file?")
    if not floating or a.size == 0:
        return
    if not bool(np.isfinite(a).all()):
        raise ValueError(f"{where!r}: tensor {key!r} holds NaN or infinite values; the file is corrupt (or the "
                         "training that wrote it diverged).")
    if a.dtype.itemsize > 4:
        with np.errstate(over="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            big = not bool(np.isfinite(a.astype(np.float32)).all())
        if big:
            raise ValueError(f"{where!r}: tensor {key!r} holds values beyond float32's range (|x| > 3.4e38), "
                             "which overflow to inf when merged.")


def check_finite_arrays(items: Iterable[tuple[str, Any]], what: str) -> None:
    """Raise ValueError naming the first array of `items` (``(name, array)`` pairs) with a NaN or ±inf value,
    e.g. the params a merge produced: float32 overflow shows up here as inf."""
    for name, value in items:
        # On the host: an eager jnp.isfinite would compile one small program per distinct shape.
        if not bool(np.isfinite(np.asarray(value)).all()):
            raise ValueError(f"{what}: {name} has NaN or infinite values after the merge (float32 overflow?); "
                             "check the scale and the file's values.")
