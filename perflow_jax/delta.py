"""PeRFlow ΔW (delta weights): load, merge into a UNet, extract from a merged UNet, export to PyTorch layout.

A released PeRFlow model is ΔW = W_perflow − W_base over a Stable Diffusion UNet, stored in PyTorch layout
with diffusers key names, either as ``delta_weights.safetensors`` or as a UNet-format folder
(``config.json`` + ``diffusion_pytorch_model[.variant].safetensors`` holding ΔW, optionally under ``unet/``;
``hansyan/perflow-sd15-delta-weights`` holds only the variants ``v0-0`` and ``v0-1``). The merged form (a
UNet folder of W_perflow, as in the released pipelines) gives ΔW = merged − base (:func:`load_merged_delta`).
Here ΔW lives as a Flax param tree shaped exactly like the UNet's params; key sets must match one-to-one.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors.numpy import save_file

from perflow_jax import hub
from perflow_jax.io import atomic_file
from perflow_jax.models.convert import torch_state_dict, torch_to_flax
from perflow_jax.models.mismatch import ConversionError, compare_shapes
from perflow_jax.models.weights_io import find_weights_file, load_state_dict, weights_variants
from perflow_jax.values import check_finite_arrays, check_float, check_float_tensor

DELTA_FILE = "delta_weights.safetensors"


UNET_STEM = "diffusion_pytorch_model"


def _pick_variant(names: list[str], where: str, variant: str | None) -> str | None:
    """`variant`, else None when `names` (one folder's files) has the plain UNet weights, else the single
    variant present; several variants and no plain file: refuse, listing them."""
    if variant is not None or f"{UNET_STEM}.safetensors" in names:
        return variant
    variants = weights_variants(names, UNET_STEM)
    if len(variants) > 1:
        raise FileNotFoundError(f"{where} holds the ΔW variants {variants} and no plain {UNET_STEM}.safetensors; "
                                f"choose one with --delta-variant (delta_variant=), e.g. {variants[-1]!r}.")
    return variants[0] if variants else None


def _holds(folder: str, variant: str | None, merged: bool) -> bool:
    """`folder` (a cached snapshot) already holds the ΔW file that would be read (else it is completed)."""
    try:
        resolve_delta_file(folder, variant, merged=merged)
    except FileNotFoundError:
        return False
    return True


def _hub_delta_folder(repo_id: str, variant: str | None, merged: bool, revision: str,
                      local_files_only: bool) -> str:
    """The local folder of a ΔW repo id: its cached snapshot if that holds the file to read, else one downloaded
    now (into the same cache) holding only the files that will be read (``delta_weights.safetensors``, or one
    variant of the UNet-format weights at the root or under ``unet/``), chosen from the repo's file listing by
    the same rules as a local folder."""
    cached = hub.cached_snapshot(repo_id, revision)
    if not hub.downloads_allowed(local_files_only) or (cached is not None and _holds(cached, variant, merged)):
        return hub.resolve_model_path(repo_id, revision, local_files_only=local_files_only)
    files = hub.repo_files(repo_id, revision)
    if not merged and DELTA_FILE in files:
        return hub.resolve_model_path(repo_id, revision, allow_patterns=[DELTA_FILE])
    for prefix in ("", "unet/"):
        names = [f[len(prefix):] for f in files if f.startswith(prefix) and "/" not in f[len(prefix):]]
        variants = weights_variants(names, UNET_STEM)
        if f"{UNET_STEM}.safetensors" not in names and not variants:
            continue
        picked = _pick_variant(names, f"Hub repo {repo_id!r} ({prefix or 'root'})", variant)
        stem = f"{UNET_STEM}.{picked}" if picked else UNET_STEM
        if f"{stem}.safetensors" not in names:
            raise FileNotFoundError(f"Hub repo {repo_id!r} has no {prefix}{stem}.safetensors; its "
                                    f"{prefix or 'root'} holds the variants {variants or 'none'}"
                                    + (" and the plain file." if f"{UNET_STEM}.safetensors" in names else "."))
        return hub.resolve_model_path(repo_id, revision, allow_patterns=[
            f"{prefix}config.json", f"{prefix}{stem}.safetensors"])
    what = "merged PeRFlow UNet weights" if merged else "PeRFlow ΔW"
    raise FileNotFoundError(f"Hub repo {repo_id!r} holds no {what}: no {DELTA_FILE} and no {UNET_STEM}"
                            f"[.variant].safetensors at its root or under unet/; it has {sorted(files)[:20]}.")


def resolve_delta_file(path: str | os.PathLike, variant: str | None = None, *, merged: bool = False,
                       revision: str = "main", local_files_only: bool = False) -> str:
    """The safetensors file holding ΔW at `path`: a file; a folder with ``delta_weights.safetensors``; or a
    UNet-format folder (possibly under ``unet/``) with ``diffusion_pytorch_model[.variant].safetensors``, where
    without `variant` a folder holding a single variant file uses it and one holding several is refused. With
    `merged`, the UNet-format weights are read even beside a ``delta_weights.safetensors``. A Hugging Face repo
    id is read from the cache or downloaded (:func:`perflow_jax.hub.resolve_model_path`)."""
    path = os.fspath(path)
    if hub.is_repo_id(path):
        path = _hub_delta_folder(path, variant, merged, revision, local_files_only)
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise FileNotFoundError(f"ΔW path {path!r} does not exist.")
    if not merged and os.path.isfile(os.path.join(path, DELTA_FILE)):
        return os.path.join(path, DELTA_FILE)
    for folder in (path, os.path.join(path, "unet")):
        if os.path.isdir(folder):
            picked = _pick_variant(sorted(os.listdir(folder)), repr(folder), variant)
            try:
                return find_weights_file(folder, UNET_STEM, picked)
            except FileNotFoundError:
                pass
    what = "merged PeRFlow UNet weights" if merged else "PeRFlow ΔW"
    expected = "" if merged else f"{DELTA_FILE} or "
    raise FileNotFoundError(
        f"{path!r} holds no {what}: expected {expected}a UNet-format folder with "
        f"{UNET_STEM}{'.' + variant if variant else ''}.safetensors (optionally under unet/)."
    )


def _read_unet_tensors(file: str, unet_params: Mapping, dtype: Any, what: str) -> dict:
    """A UNet-shaped safetensors file (PyTorch layout) as a Flax tree like `unet_params`; strict key accounting."""
    state_dict = load_state_dict(file)  # an unreadable file is its own error, not a family mismatch
    for key, value in state_dict.items():
        check_float_tensor(value, file, key)
    try:
        return torch_to_flax(state_dict, unet_params, dtype=dtype, what=f"UNet ({what})")
    except ConversionError as e:
        raise ConversionError(f"The {what} in {file!r} does not match this UNet; is it for this model family "
                              f"(SD1.5 / SD2.1 / SDXL)?\n{e}") from e


def load_delta(path: str | os.PathLike, unet_params: Mapping, variant: str | None = None,
               dtype: Any = None, *, revision: str = "main", local_files_only: bool = False) -> dict:
    """Read ΔW (PyTorch layout) into a Flax tree shaped like `unet_params`; strict key accounting.

    Args:
      path: ``delta_weights.safetensors``, its folder, a UNet-format ΔW folder, or a Hub repo id of one.
      unet_params: the UNet's params (arrays or ShapeDtypeStructs): the structure ΔW must match.
      variant: weights variant of a UNet-format folder (e.g. ``"v0-1"``); default: the plain file, else the
        folder's single variant file.
      dtype: cast ΔW to this dtype (default: keep the file's).
      revision, local_files_only: for a repo id (see :func:`perflow_jax.hub.resolve_model_path`).

    Raises:
      ConversionError (a ValueError): a file that cannot be read (truncated, not safetensors), or a ΔW whose
        keys and shapes do not fit this UNet (another model family). ValueError: a tensor that is not floating
        point (a bool ΔW would add 1 to every weight) or holds NaN/inf, also after the float32 cast.
        FileNotFoundError: no ΔW at `path`, or several variants and no `variant`.
    """
    file = resolve_delta_file(path, variant, revision=revision, local_files_only=local_files_only)
    return _read_unet_tensors(file, unet_params, dtype, "PeRFlow ΔW")


def _base_unet_params(base: str | os.PathLike, local_files_only: bool) -> dict:
    """The UNet params of `base`: a pipeline folder (its ``unet/``), a UNet folder, or a repo id of either."""
    from perflow_jax.models.unet import load_unet

    root = hub.resolve_model_path(base, local_files_only=local_files_only)
    folder = os.path.join(root, "unet") if os.path.isfile(os.path.join(root, "model_index.json")) else root
    return load_unet(folder)[1]


def load_merged_delta(path: str | os.PathLike, base_params: Mapping, variant: str | None = None, *,
                      revision: str = "main", local_files_only: bool = False) -> dict:
    """ΔW = merged − base (float32) from a released merged PeRFlow UNet, as the reference's
    ``load_delta_weights_into_unet`` does for a folder whose ``diffusion_pytorch_model.safetensors`` holds
    merged weights.

    Args:
      path: a UNet-format folder (or a pipeline folder, whose ``unet/`` is read) of merged PeRFlow weights, or
        a Hub repo id of one.
      base_params: the params of the UNet the merged weights were trained from (same family).
      variant: weights variant of the merged file (default: the plain file, else the single variant file).
    """
    file = resolve_delta_file(path, variant, merged=True, revision=revision, local_files_only=local_files_only)
    return extract(_read_unet_tensors(file, base_params, None, "merged PeRFlow UNet"), base_params)


def check_delta_options(is_merged: bool, base: str | os.PathLike | None) -> None:
    """A ΔW base only goes with merged weights (before any loading, so the mistake costs nothing)."""
    if base is not None and not is_merged:
        raise ValueError("A ΔW base (--delta-base, delta_base=) is only used with --delta-is-merged "
                         "(delta_is_merged=True).")


def read_delta(path: str | os.PathLike, unet_params: Mapping, *, variant: str | None = None,
               is_merged: bool = False, base: str | os.PathLike | None = None,
               local_files_only: bool = False) -> dict:
    """ΔW for `unet_params` from `path`: a ΔW (:func:`load_delta`), or with `is_merged` merged PeRFlow weights
    minus the UNet of `base` (a pipeline or UNet folder or repo id; default: `unet_params` themselves, i.e. the
    merged weights were made from this very model) (:func:`load_merged_delta`)."""
    check_delta_options(is_merged, base)
    if not is_merged:
        return load_delta(path, unet_params, variant, local_files_only=local_files_only)
    base_params = unet_params
    if base is not None:
        base_params = _base_unet_params(base, local_files_only)
        _check_same_tree(unet_params, base_params, f"the UNet of the ΔW base {os.fspath(base)!r} vs the model's")
    return load_merged_delta(path, base_params, variant, local_files_only=local_files_only)


def _check_same_tree(a: Mapping, b: Mapping, what: str) -> None:
    """Raise one :class:`ConversionError` (a ValueError) listing every path and shape where `b` differs from `a`."""
    shapes = [{k: tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(dict(t)).items()} for t in (a, b)]
    compare_shapes(shapes[1], shapes[0]).raise_if_any(
        f"{what}: parameter trees differ:", labels=("only in the first", "only in the second", "other shapes"))


def merge(unet_params: Mapping, delta: Mapping, scale: float = 1.0) -> dict:
    """W + scale·ΔW, added in float32 and cast back to each param's dtype.

    Raises ValueError for a non-finite `scale` and for a merge whose result is not finite (float32 overflow, or
    overflow of the params' own dtype, e.g. fp16).
    """
    scale = check_float("the ΔW scale", scale)
    _check_same_tree(unet_params, delta, "merge(unet_params, delta)")
    merged = jax.tree_util.tree_map(
        lambda w, d: (jnp.asarray(w, jnp.float32) + scale * jnp.asarray(d, jnp.float32)).astype(jnp.asarray(w).dtype),
        dict(unet_params), dict(delta))
    flat = traverse_util.flatten_dict(merged)
    check_finite_arrays((("/".join(p), v) for p, v in flat.items()), f"Merging ΔW (scale {scale}) into the UNet")
    return merged


def merger(path: str | os.PathLike, scale: float = 1.0, **options: Any) -> Callable[[Mapping], dict]:
    """``params -> params + scale·ΔW`` for the ΔW at `path`, read against the params it is given (for
    ``models.components.convert_to_flax(unet_transform=...)``); `options` go to :func:`read_delta`
    (``variant``, ``is_merged``, ``base``, ``local_files_only``)."""

    scale = check_float("the ΔW scale", scale)
    check_delta_options(options.get("is_merged", False), options.get("base"))
    # Find the file now, so a missing ΔW or an ambiguous variant is reported before any conversion work.
    path = resolve_delta_file(path, options.get("variant"), merged=options.get("is_merged", False),
                              local_files_only=options.get("local_files_only", False))

    def apply(unet_params: Mapping) -> dict:
        return merge(unet_params, read_delta(path, unet_params, **options), scale)

    return apply


def extract(merged: Mapping, base: Mapping) -> dict:
    """ΔW = merged − base in float32 (e.g. from a released merged PeRFlow UNet and its base model)."""
    _check_same_tree(merged, base, "extract(merged, base)")
    return jax.tree_util.tree_map(lambda m, b: jnp.asarray(m, jnp.float32) - jnp.asarray(b, jnp.float32),
                                  dict(merged), dict(base))


def torch_unet_state_dict(params: Mapping, dtype: Any = None) -> dict[str, np.ndarray]:
    """Flax UNet-shaped params (or ΔW) → a PyTorch-layout state dict with diffusers key names."""
    return torch_state_dict(params, dtype=dtype, what="UNet")


def export(delta: Mapping, path: str | os.PathLike, dtype: Any = None,
           metadata: dict[str, str] | None = None) -> str:
    """Write ΔW as PyTorch-layout safetensors with diffusers key names (atomic: temp file + rename).

    `path` is a ``.safetensors`` file or a folder (then ``<folder>/delta_weights.safetensors``). The file is
    what the PyTorch PeRFlow code's ``load_delta_weights_into_unet`` reads. Returns the file written.
    """
    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        os.makedirs(path, exist_ok=True)
        path = os.path.join(path, DELTA_FILE)
    sd = torch_unet_state_dict(jax.device_get(dict(delta)), dtype=dtype)
    with atomic_file(path) as tmp:
        save_file(sd, tmp, metadata={"format": "pt", **(metadata or {})})
    return path
