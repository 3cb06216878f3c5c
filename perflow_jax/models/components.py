"""Load a whole diffusers-format Stable Diffusion folder (SD1.x, SD2.x, SDXL) into Flax configs and params.

The folder is what ``DiffusionPipeline.save_pretrained`` writes: ``model_index.json`` with ``unet/``,
``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/`` and, for SDXL, ``text_encoder_2/`` and
``tokenizer_2/``. A Hugging Face repo id resolves to its snapshot in the local cache, or is downloaded
(:mod:`perflow_jax.hub`).
Tokenizers are transformers' ``CLIPTokenizer`` read from the local ``vocab.json`` / ``merges.txt``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings
from collections.abc import Callable
from typing import Any

from tqdm.auto import tqdm

from perflow_jax.hub import names_have_variant, resolve_model_path
from perflow_jax.io import atomic_dir, check_destination, copy_file, copy_tree
from perflow_jax.models.clip import CLIPTextConfig, load_clip_text_model
from perflow_jax.models.config_io import CONFIG_NAME, read_config_json, read_json
from perflow_jax.models.unet import UNetConfig, load_unet
from perflow_jax.models.upscaler_unet import is_upscaler_config, load_upscaler_unet
from perflow_jax.models.vae import VAEConfig, load_vae
from perflow_jax.models.weights_io import FLAX_WEIGHTS, save_flax_checkpoint

TOKENIZER_FILES = ("vocab.json", "merges.txt")


@dataclasses.dataclass
class PipelineComponents:
    """Everything a text-to-image pipeline needs, as Flax configs + params (NumPy/JAX arrays)."""

    path: str
    family: str  # "sd" (SD1.x/SD2.x) or "sdxl"
    model_index: dict[str, Any]
    unet_config: UNetConfig
    unet_params: dict
    vae_config: VAEConfig
    vae_params: dict
    text_encoder_config: CLIPTextConfig
    text_encoder_params: dict
    tokenizer: Any
    scheduler_config: dict[str, Any] | None
    text_encoder_2_config: CLIPTextConfig | None = None
    text_encoder_2_params: dict | None = None
    tokenizer_2: Any = None


def _check_tokenizer_files(folder: str) -> None:
    """Check ``vocab.json``, ``merges.txt`` and the tokenizer's JSON configs (where present) before the tokenizer
    library reads them, so a broken file is named (the library's own error names neither the file nor the line)."""
    vocab = os.path.join(folder, "vocab.json")
    if os.path.isfile(vocab):
        try:
            with open(vocab, encoding="utf-8") as f:
                table = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{vocab!r} is not valid JSON ({e}); copy it again from the base model's tokenizer/ "
                             "folder.") from e
        if not isinstance(table, dict) or not all(
                isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in table.items()):
            raise ValueError(f"{vocab!r} must be a JSON object mapping each token to its integer id; copy it again "
                             "from the base model's tokenizer/ folder.")
    for name in ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    ok = isinstance(json.load(f), dict)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{path!r} is not valid JSON ({e}).") from e
            if not ok:
                raise ValueError(f"{path!r} must hold a JSON object.")
    merges = os.path.join(folder, "merges.txt")
    if os.path.isfile(merges):
        try:
            with open(merges, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except UnicodeDecodeError as e:
            raise ValueError(f"{merges!r} is not UTF-8 text ({e}); copy it again from the base model's tokenizer/ "
                             "folder.") from e
        for number, line in enumerate(lines, 1):
            if line and not line.startswith("#version") and len(line.split(" ")) != 2:
                raise ValueError(f"{merges!r} line {number} is not a merge (two tokens separated by one space): "
                                 f"{line[:60]!r}; copy the file again from the base model's tokenizer/ folder.")


def load_tokenizer(folder: str, max_length: int | None = None) -> Any:
    """transformers' CLIPTokenizer from local files only (``vocab.json`` + ``merges.txt``, or ``tokenizer.json``).

    Args:
      folder: the tokenizer folder.
      max_length: the text encoder's ``max_position_embeddings``: a ``model_max_length`` above it (transformers
        sets 1e30 when the tokenizer config has none) is capped to it, since the encoder reads no more tokens.

    Raises:
      FileNotFoundError: no tokenizer files. ValueError: a broken ``vocab.json``/``merges.txt`` or tokenizer
        config (the file is named), or a ``model_max_length`` that is not a positive integer.
    """
    missing = [f for f in TOKENIZER_FILES if not os.path.isfile(os.path.join(folder, f))]
    if missing and not os.path.isfile(os.path.join(folder, "tokenizer.json")):
        raise FileNotFoundError(
            f"Tokenizer folder {folder!r} lacks {', '.join(missing)}; a CLIP tokenizer needs {TOKENIZER_FILES} "
            "or a tokenizer.json (save it with tokenizer.save_pretrained, or copy them from the base model's "
            "tokenizer/ folder)."
        )
    _check_tokenizer_files(folder)
    from transformers import CLIPTokenizer

    try:
        tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # the tokenizers library raises bare Exceptions for broken files
        raise ValueError(f"Could not load the CLIP tokenizer in {folder!r} ({type(e).__name__}: {e}); check its "
                         "vocab.json, merges.txt and tokenizer_config.json.") from e
    length = tokenizer.model_max_length
    if isinstance(length, bool) or not isinstance(length, int | float) or not length >= 1 or (
            isinstance(length, float) and not length.is_integer()):
        raise ValueError(f"{os.path.join(folder, 'tokenizer_config.json')!r}: model_max_length must be a positive "
                         f"integer (the text encoder's max_position_embeddings, 77 for SD), got {length!r}.")
    if max_length is not None and length > max_length:
        length = max_length
    if length > 2**20:  # e.g. transformers' 1e30 "unset" with no text encoder to cap it by
        raise ValueError(f"{os.path.join(folder, 'tokenizer_config.json')!r}: model_max_length={length!r} is not a "
                         "usable length; set it to the text encoder's max_position_embeddings (77 for SD).")
    tokenizer.model_max_length = int(length)
    return tokenizer


def _subfolder(root: str, name: str) -> str:
    folder = os.path.join(root, name)
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"{root!r} has no {name}/ folder; a diffusers Stable Diffusion folder needs unet/, vae/, "
            "text_encoder/, tokenizer/ (and text_encoder_2/, tokenizer_2/ for SDXL)."
        )
    return folder


def read_model_index(root: str) -> dict[str, Any]:
    path = os.path.join(root, "model_index.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{root!r} has no model_index.json: it is not a diffusers pipeline folder. Save one with "
            "DiffusionPipeline.save_pretrained, or pass the folder that holds model_index.json."
        )
    return read_json(path)


# Every model loader takes (folder, *, dtype, variant, allow_pickle): one call site per option, so an option
# reaches every component.
ModelLoader = Callable[..., tuple[Any, dict]]
_MODEL_LOADERS: dict[str, ModelLoader] = {"unet": load_unet, "vae": load_vae, "text_encoder": load_clip_text_model,
                                          "text_encoder_2": load_clip_text_model, "upscaler_unet": load_upscaler_unet}


def _load_model(kind: str, folder: str, *, dtype: Any, variant: str | None, allow_pickle: bool,
                **options: Any) -> tuple[Any, dict]:
    """``(config, params)`` of the `kind` model in `folder`; `options` are that loader's own extra arguments."""
    return _MODEL_LOADERS[kind](folder, dtype=dtype, variant=variant, allow_pickle=allow_pickle, **options)


def component_variants(root: str, folders: list[str], variant: str | None) -> list[str | None]:
    """The variant to read in each model folder, by diffusers' rule: `variant` where the folder has it, else the
    plain weights (with a warning naming those folders); refused when no folder has `variant` at all."""
    if variant is None:
        return [None] * len(folders)
    has = [names_have_variant(os.listdir(f), variant) for f in folders]
    if not any(has):
        raise FileNotFoundError(f"No model folder of {root!r} has weights of variant {variant!r} "
                                f"({', '.join(os.path.basename(f) for f in folders)}); check the variant name, or "
                                "leave it out.")
    plain = [os.path.basename(f) for f, h in zip(folders, has, strict=True) if not h]
    if plain:
        warnings.warn(f"{root!r}: {', '.join(plain)} {'has' if len(plain) == 1 else 'have'} no {variant!r} weights; "
                      "reading the plain ones (as diffusers does).", stacklevel=3)
    return [variant if h else None for h in has]


def load_pipeline_components(path_or_repo_id: str | os.PathLike, dtype: Any = None, variant: str | None = None,
                             allow_pickle: bool = False, revision: str = "main",
                             local_files_only: bool = False) -> PipelineComponents:
    """Load configs, params and tokenizers of a diffusers SD/SDXL folder or a Hugging Face repo id.

    Args:
      path_or_repo_id: local folder, or ``"org/name"``: from the local Hugging Face cache, else downloaded
        (only the files read here; see :func:`perflow_jax.hub.resolve_model_path`).
      dtype: cast all params to this dtype (default: keep each file's dtype).
      variant: weights variant, e.g. ``"fp16"`` for ``diffusion_pytorch_model.fp16.safetensors``; a model
        folder without it reads its plain weights (:func:`component_variants`).
      allow_pickle: allow ``.bin`` pickles (needs torch; only for files you trust).
      revision: hub revision for repo ids.
      local_files_only: never download (as ``HF_HUB_OFFLINE=1``): a repo id must be cached.
    """
    root = resolve_model_path(path_or_repo_id, revision, variant=variant, allow_pickle=allow_pickle,
                              local_files_only=local_files_only)
    index = read_model_index(root)
    family = "sdxl" if "text_encoder_2" in index or "XL" in str(index.get("_class_name", "")) else "sd"

    models = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if family == "sdxl" else [])
    variants = component_variants(root, [_subfolder(root, m) for m in models], variant)
    load = dict(dtype=dtype, allow_pickle=allow_pickle)
    unet_config, unet_params = _load_model("unet", _subfolder(root, "unet"), **load, variant=variants[0])
    vae_config, vae_params = _load_model("vae", _subfolder(root, "vae"), **load, variant=variants[1])
    te_config, te_params = _load_model("text_encoder", _subfolder(root, "text_encoder"), **load,
                                       variant=variants[2], with_projection=False)
    tokenizer = load_tokenizer(_subfolder(root, "tokenizer"), max_length=te_config.max_position_embeddings)
    sched_path = os.path.join(root, "scheduler", "scheduler_config.json")
    scheduler_config = read_json(sched_path) if os.path.isfile(sched_path) else None

    comps = PipelineComponents(root, family, index, unet_config, unet_params, vae_config, vae_params, te_config,
                               te_params, tokenizer, scheduler_config)
    if family == "sdxl":
        comps.text_encoder_2_config, comps.text_encoder_2_params = _load_model(
            "text_encoder_2", _subfolder(root, "text_encoder_2"), **load, variant=variants[3], with_projection=True)
        comps.tokenizer_2 = load_tokenizer(_subfolder(root, "tokenizer_2"),
                                           max_length=comps.text_encoder_2_config.max_position_embeddings)
    return comps


# ----------------------------------------------------------------------------------------------------------
# Converting a folder to Flax checkpoints (`perflow-jax convert`)
# ----------------------------------------------------------------------------------------------------------

_SINGLE_CLASSES = {"UNet2DConditionModel": "unet", "AutoencoderKL": "vae", "CLIPTextModel": "text_encoder",
                   "CLIPTextModelWithProjection": "text_encoder_2"}


def _component_kind(folder: str) -> str:
    """Which loader a single component folder needs, from its config.json."""
    cfg_path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{folder!r} has neither model_index.json (a pipeline) nor config.json (a "
                                "single UNet / VAE / text encoder).")
    cfg = read_config_json(cfg_path)
    names = [cfg.get("_class_name")] + list(cfg.get("architectures") or [])
    for n in names:
        if n in _SINGLE_CLASSES:
            return _SINGLE_CLASSES[n]
    raise ValueError(f"{cfg_path!r} describes {names[0] or names[1:]}, which perflow-jax cannot convert; "
                     f"supported: {', '.join(_SINGLE_CLASSES)}.")


def _unet_kind(folder: str, kind: str) -> str:
    """``"upscaler_unet"`` for a UNet folder holding the SD ×2 latent upscaler's K-block UNet, else `kind`."""
    if kind == "unet" and is_upscaler_config(read_config_json(folder)):
        return "upscaler_unet"
    return kind


def convert_to_flax(src: str | os.PathLike, dst: str | os.PathLike, *, dtype: Any = None,
                    unet_transform: Callable[[Any], Any] | None = None, variant: str | None = None,
                    allow_pickle: bool = False, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Convert a diffusers pipeline folder (or one UNet/VAE/text-encoder folder) into Flax checkpoints.

    Each model folder of `dst` gets ``config.json`` + ``flax_model.msgpack`` (msgpack: one self-contained
    file per model, the former diffusers Flax format, readable with flax alone; orbax is kept for training
    checkpoints). Tokenizers, scheduler and model_index.json are copied. `unet_transform` maps the UNet's
    params before they are written, e.g. ``perflow_jax.delta.merger(path)`` merges a PeRFlow ΔW. The result
    is built in a temp folder and renamed into place, so `dst` is never half-written.

    `dst` is checked before any work (:func:`perflow_jax.io.check_destination`): it may not be, contain or lie
    inside `src`, and `overwrite` replaces only an empty folder or one perflow-jax wrote (its manifest lists
    every file in it), never anything else. Files get the process umask's modes.
    Returns ``{"components": [...], "seconds": ...}``.
    """
    t0 = time.perf_counter()
    root = resolve_model_path(src, variant=variant, allow_pickle=allow_pickle)
    dst = os.path.abspath(os.fspath(dst))
    check_destination(dst, (src, root), overwrite=overwrite)  # before any work; atomic_dir checks again
    is_pipeline = os.path.isfile(os.path.join(root, "model_index.json"))
    if is_pipeline:
        index = read_model_index(root)
        models = [n for n in _MODEL_LOADERS if n in index and os.path.isdir(os.path.join(root, n))]
        copies = [n for n in ("tokenizer", "tokenizer_2", "scheduler") if os.path.isdir(os.path.join(root, n))]
    else:
        models, copies = [""], []
    unet_folder = os.path.join(root, "unet") if is_pipeline else root
    if unet_transform is not None and not ("unet" in models or (not is_pipeline and _component_kind(root) == "unet")):
        raise ValueError(f"{root!r} has no UNet to merge the ΔW into; pass a pipeline or UNet folder.")
    if unet_transform is not None and _unet_kind(unet_folder, "unet") == "upscaler_unet":
        raise ValueError(f"{root!r} holds the latent upscaler's UNet; a PeRFlow ΔW is made for an SD UNet.")

    variants = (component_variants(root, [os.path.join(root, n) for n in models], variant) if is_pipeline
                else [variant])
    with atomic_dir(dst, overwrite=overwrite, sources=(src, root)) as tmp:
        for name, name_variant in tqdm(list(zip(models, variants, strict=True)), desc="converting",
                                       disable=not progress):
            folder = os.path.join(root, name) if name else root
            kind = _unet_kind(folder, name or _component_kind(folder))
            _, params = _load_model(kind, folder, dtype=dtype, variant=name_variant, allow_pickle=allow_pickle)
            if kind == "unet" and unet_transform is not None:
                params = unet_transform(params)
            out = os.path.join(tmp, name)
            os.makedirs(out, exist_ok=True)
            copy_file(os.path.join(folder, CONFIG_NAME), os.path.join(out, CONFIG_NAME))
            save_flax_checkpoint(params, os.path.join(out, FLAX_WEIGHTS))
        for name in copies:
            copy_tree(os.path.join(root, name), os.path.join(tmp, name))
        if is_pipeline:
            copy_file(os.path.join(root, "model_index.json"), os.path.join(tmp, "model_index.json"))
    return {"components": [m or _component_kind(root) for m in models], "seconds": time.perf_counter() - t0}
