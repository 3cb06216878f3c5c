"""PeRFlow training loop: AdamW + EMA, data-parallel over all devices, orbax checkpoints, ΔW export.

    result = train_from_config("configs/digits_perflow.yaml", ["train.steps=2000", "output_dir=out/k4"])

The config is YAML (see ``configs/``) with ``key=value`` overrides using dotted keys; unknown keys and bad
values raise ValueError. The loop is deterministic and resumable: the data order and every PRNG key are
functions of (seed, step) only, so a run resumed from a checkpoint continues bit-identically. The batch is
sharded over :func:`perflow_jax.sharding.data_mesh` (every device on every host); params are replicated (or,
with ``train.sharding=fsdp``, split along one axis over the same mesh). Teacher and student are the same
UNet called through :func:`perflow_jax.models.adapter.unet_apply`, conditioned on a
:class:`~perflow_jax.models.adapter.UNetCondition`. Output: ``delta_weights.safetensors``
(ΔW = student − teacher in PyTorch layout, diffusers key names) and ``scheduler_config.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml

from perflow_jax import delta as delta_lib
from perflow_jax import sharding
from perflow_jax.io import check_creatable, write_json
from perflow_jax.models.adapter import UNetCondition, unet_apply
from perflow_jax.models.unet import UNet2DConditionModel, UNetConfig, unet_param_shapes
from perflow_jax.schedulers import perflow as pf
from perflow_jax.training import reflow
from perflow_jax.training import solver as solver_lib

# ----------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------

DEFAULTS: dict[str, Any] = {
    "output_dir": None,
    "model": {"kind": "digits", "unet_config": None, "dtype": "float32"},
    "teacher": {"weights": None, "prediction_type": "epsilon", "set_alpha_to_one": False},
    "perflow": {"num_time_windows": 4, "prediction_type": "ddim_eps", "num_train_timesteps": 1000,
                "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"},
    "solver": {"num_steps": 8},
    "reflow": {"discrete_timesteps": None, "loss_weighting": "none", "huber_c": 0.03, "cfg_mode": "sync",
               "guidance_scale": 7.5, "cond_dropout": 0.1},
    "train": {"steps": 1000, "batch_size": 64, "grad_accum": 1, "learning_rate": 1e-4, "warmup_steps": 100,
              "lr_schedule": "constant", "weight_decay": 1e-2, "adam_b1": 0.9, "adam_b2": 0.999, "grad_clip": 1.0,
              "ema_decay": 0.999, "ema_warmup": False, "seed": 0, "checkpoint_every": 500, "keep_checkpoints": 2,
              "log_every": 50,
              "sharding": "replicated", "progress": True},
    "data": {"kind": "digits", "path": None, "image_size": None, "model": None, "workers": 4},
}
_CHOICES = {
    ("model", "kind"): ("digits", "unet"),
    ("model", "dtype"): ("float32", "bfloat16"),
    ("train", "lr_schedule"): ("constant", "cosine"),
    ("train", "sharding"): ("replicated", "fsdp"),
    ("data", "kind"): ("digits", "npz", "images", "prepared", "online"),
}


_INT32_MAX = 2**31 - 1
_FLOAT32_MAX = float(np.finfo(np.float32).max)


class _Field(NamedTuple):
    """A config field's type: `check(value)`, `what` it must be (for the error), and whether it is `text`
    (a string field: its values are never re-read as YAML numbers, and an override's text is taken as is)."""

    check: Callable[[Any], bool]
    what: str
    text: bool = False


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(lo: int = 1, hi: int = _INT32_MAX, optional: bool = False) -> _Field:
    ok = lambda v: (optional and v is None) or (_is_int(v) and lo <= v <= hi)  # noqa: E731
    return _Field(ok, f"must be an integer in [{lo}, {hi}]" + (" or null" if optional else ""))


def _float(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False
           ) -> _Field:
    """A finite number (int or float) that float32 can hold, within the bounds."""
    def ok(v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, int | float) or abs(v) > _FLOAT32_MAX or not math.isfinite(v):
            return False
        return ((lo is None or (v > lo if lo_open else v >= lo)) and (hi is None or (v < hi if hi_open else v <= hi)))

    if lo is not None and hi is not None:
        where = f" in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    else:
        where = "" if lo is None else f" {'>' if lo_open else '>='} {lo}"
    return _Field(ok, f"must be a finite number{where} (float32 range)")


def _str(optional: bool = False, choices: tuple[str, ...] | None = None) -> _Field:
    if choices is not None:
        return _Field(lambda v: isinstance(v, str) and v in choices, f"expected one of {choices}", text=True)
    ok = lambda v: (optional and v is None) or (isinstance(v, str) and v.strip() != "")  # noqa: E731
    return _Field(ok, "must be a non-empty string" + (" or null" if optional else ""), text=True)


_BOOL = _Field(lambda v: isinstance(v, bool), "must be true or false")
_PATH = _Field(lambda v: isinstance(v, str) and v.strip() != "",
               "must be a non-empty string path (in YAML, quote a name it would read as a number: "
               "output_dir: \"123\")", text=True)

# Every leaf of DEFAULTS and its type. validate() applies them before the library configs.
_SCHEMA: dict[str, _Field] = {
    "output_dir": _PATH,
    "model.kind": _str(choices=_CHOICES[("model", "kind")]),
    "model.unet_config": _str(optional=True),
    "model.dtype": _str(choices=_CHOICES[("model", "dtype")]),
    "teacher.weights": _str(optional=True),
    "teacher.prediction_type": _str(),
    "teacher.set_alpha_to_one": _BOOL,
    "perflow.num_time_windows": _int(),
    "perflow.prediction_type": _str(),
    "perflow.num_train_timesteps": _int(),
    "perflow.beta_start": _float(0.0, lo_open=True),
    "perflow.beta_end": _float(0.0, lo_open=True),
    "perflow.beta_schedule": _str(),
    "solver.num_steps": _int(),
    "reflow.discrete_timesteps": _int(optional=True),
    "reflow.loss_weighting": _str(),
    "reflow.huber_c": _float(0.0, lo_open=True),
    "reflow.cfg_mode": _str(),
    "reflow.guidance_scale": _float(1.0),
    "reflow.cond_dropout": _float(0.0, 1.0, hi_open=True),
    "train.steps": _int(),
    "train.batch_size": _int(),
    "train.grad_accum": _int(),
    "train.learning_rate": _float(0.0, lo_open=True),
    "train.warmup_steps": _int(0),
    "train.lr_schedule": _str(choices=_CHOICES[("train", "lr_schedule")]),
    "train.weight_decay": _float(0.0),
    "train.adam_b1": _float(0.0, 1.0, hi_open=True),
    "train.adam_b2": _float(0.0, 1.0, hi_open=True),
    "train.grad_clip": _float(0.0, lo_open=True),
    "train.ema_decay": _float(0.0, 1.0, hi_open=True),
    "train.ema_warmup": _BOOL,
    "train.seed": _int(0, 2**32 - 1),
    "train.checkpoint_every": _int(),
    "train.keep_checkpoints": _int(),
    "train.log_every": _int(),
    "train.sharding": _str(choices=_CHOICES[("train", "sharding")]),
    "train.progress": _BOOL,
    "data.kind": _str(choices=_CHOICES[("data", "kind")]),
    "data.path": _str(optional=True),
    "data.image_size": _int(optional=True),
    "data.model": _str(optional=True),
    "data.workers": _int(1, 256),
}
STREAM_KINDS = ("prepared", "online")  # data.kind values read by perflow_jax.training.data (Grain)


def _yaml_error(source: str, e: yaml.YAMLError) -> ValueError:
    """A one-line ValueError for a YAML error: where (file:line:column) and what, without YAML's snippet."""
    mark = getattr(e, "problem_mark", None)
    where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    if "python/" in problem or "!!python" in problem:
        return ValueError(f"{where}: YAML tags like !!python/... are not allowed (configs are read as plain "
                          f"YAML with yaml.safe_load): {problem}.")
    context, cmark = getattr(e, "context", None), getattr(e, "context_mark", None)
    if context and cmark is not None:
        problem += f" ({context} that starts at line {cmark.line + 1}, column {cmark.column + 1})"
    return ValueError(f"{where}: invalid YAML: {problem}.")


def _parse_value(text: str, source: str = "override") -> Any:
    """A YAML scalar, with YAML 1.1's gap closed: ``3e-3`` is a float, not a string."""
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError as e:
        raise _yaml_error(source, e) from e
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _coerce_numbers(cfg: dict[str, Any]) -> None:
    """Read the strings of non-text fields as YAML scalars (``3e-3`` from a YAML 1.1 file is a string); text
    fields (paths, names) stay as written."""
    for key, field in _SCHEMA.items():
        *sections, leaf = key.split(".")
        node: Any = cfg
        for sec in sections:
            node = node.get(sec) if isinstance(node, dict) else None
        if isinstance(node, dict) and not field.text and isinstance(node.get(leaf), str):
            node[leaf] = _parse_value(node[leaf])


def _override_value(key: str, text: str) -> Any:
    """An override's value: a text field takes the text as is (``null`` or ``~`` is None), others parse it."""
    field = _SCHEMA.get(key.strip())
    if field is not None and field.text:
        return None if text.strip() in ("null", "~") else text
    return _parse_value(text, f"override {f'{key}={text}'!r}")


def read_yaml(path: str) -> Any:
    """A YAML file read with ``yaml.safe_load``; every failure is a one-line ValueError naming the file (and
    line): unreadable, not UTF-8, a syntax error, a ``!!python`` tag."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: the config is not UTF-8 text ({e.reason} at byte {e.start}).") from e
    except OSError as e:
        raise ValueError(f"Cannot read the config {path!r}: {e.strerror or e}.") from e
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise _yaml_error(path, e) from e


def load_config(config_path: str | None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """DEFAULTS ← YAML file ← ``key=value`` overrides, validated (ValueError on unknown keys / bad values)."""
    cfg = json.loads(json.dumps(DEFAULTS))
    if config_path is not None:
        user = read_yaml(config_path)
        if user is None:
            user = {}
        if not isinstance(user, dict):
            raise ValueError(f"{config_path}: the config must be a YAML mapping, got {type(user).__name__}.")
        _merge(cfg, user, "")
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"Override {item!r} is not key=value (e.g. train.steps=2000).")
        key, text = item.split("=", 1)
        node: Any = {}
        parts = key.strip().split(".")
        leaf = node
        for p in parts[:-1]:
            leaf = leaf.setdefault(p, {})
        leaf[parts[-1]] = _override_value(key, text)
        _merge(cfg, node, "")
    _coerce_numbers(cfg)
    validate(cfg)
    return cfg


def _merge(base: dict, new: Mapping, prefix: str) -> None:
    for k, v in new.items():
        name = f"{prefix}{k}"
        if k not in base:
            raise ValueError(f"Unknown config key {name!r}; known keys here: {sorted(base)}.")
        if isinstance(base[k], dict):
            if not isinstance(v, Mapping):
                raise ValueError(f"Config key {name!r} is a section; set its fields, e.g. {name}.<field>=...")
            _merge(base[k], v, name + ".")
        else:
            base[k] = v


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def validate(cfg: dict[str, Any]) -> None:
    """Check types and ranges of a merged config; raises ValueError naming the key.

    Every field has a type (`_SCHEMA`): integers are integers (not bools or floats), numbers are finite and fit
    float32 (``inf``, ``nan`` and ``1e39`` are refused), paths are non-empty strings.
    """
    def need(cond: bool, key: str, msg: str) -> None:
        if not cond:
            raise ValueError(f"Bad config value {key}={_short(_get(cfg, key))}: {msg}.")

    if not isinstance(cfg, Mapping):
        raise ValueError(f"A training config is a mapping, got {type(cfg).__name__}.")
    for key, field in _SCHEMA.items():
        try:
            value = _get(cfg, key)
        except (KeyError, TypeError):
            raise ValueError(f"The config has no {key!r}; build it with load_config().") from None
        need(field.check(value), key, field.what)
    t = cfg["train"]
    need(t["batch_size"] % t["grad_accum"] == 0, "train.batch_size", "must be divisible by train.grad_accum")
    need(cfg["model"]["kind"] == "digits" or cfg["model"]["unet_config"], "model.unet_config",
         "model.kind=unet needs a UNet config.json path")
    need(cfg["data"]["kind"] == "digits" or cfg["data"]["path"], "data.path",
         f"data.kind={cfg['data']['kind']} needs a path")
    try:  # the library configs check the rest (prediction types, windows, schedule, ...)
        reflow_config(cfg)
    except (TypeError, ValueError) as e:
        raise ValueError(f"Bad config: {e}") from e


def _get(cfg: dict, dotted: str) -> Any:
    node: Any = cfg
    for p in dotted.split("."):
        node = node[p]
    return node


def reflow_config(cfg: dict[str, Any]) -> reflow.ReflowConfig:
    """The :class:`ReflowConfig` of a merged config dict."""
    pcfg = pf.PeRFlowConfig(**cfg["perflow"])
    scfg = solver_lib.SolverConfig.from_perflow(pcfg, num_steps=cfg["solver"]["num_steps"],
                                                prediction_type=cfg["teacher"]["prediction_type"],
                                                set_alpha_to_one=cfg["teacher"]["set_alpha_to_one"])
    return reflow.ReflowConfig(perflow=pcfg, solver=scfg, **cfg["reflow"])


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ArrayDataset:
    """An in-memory dataset: samples x (N, C, H, W) (pixels or latents), conditions per sample, null condition.

    ``cond`` is a :class:`UNetCondition` of (N, ...) host arrays (``encoder_hidden_states``, ``text_embeds``,
    ``time_ids``, ``class_labels``; absent parts None); ``null_cond`` holds one unbatched null value for each
    part ``cond`` has. A mapping with those names is accepted for either and converted here, the one place
    where dataset conditions become a :class:`UNetCondition`.
    """

    x: np.ndarray
    cond: UNetCondition
    null_cond: UNetCondition

    def __post_init__(self) -> None:
        if np.ndim(self.x) != 4:
            raise ValueError(f"Dataset x must be (N, C, H, W), got shape {np.shape(self.x)}.")
        cond, null = UNetCondition.from_mapping(self.cond), UNetCondition.from_mapping(self.null_cond)
        object.__setattr__(self, "cond", cond)
        object.__setattr__(self, "null_cond", null)
        n = len(self.x)
        for k, v, nv in zip(UNetCondition._fields, cond, null, strict=True):
            if v is None:
                if nv is not None:
                    raise ValueError(f"null_cond has {k!r} but cond does not; give both or neither.")
                continue
            if len(v) != n:
                raise ValueError(f"Condition {k!r} has {len(v)} rows for {n} samples.")
            if nv is None:
                raise ValueError(f"Condition {k!r} has no null value in null_cond (needed for CFG dropout).")

    def __len__(self) -> int:
        return len(self.x)

    def rows(self, idx: np.ndarray) -> tuple[np.ndarray, UNetCondition]:
        """Samples and their conditions at integer indices `idx` of any shape (e.g. (A, B) micro-batches)."""
        return self.x[idx], jax.tree_util.tree_map(lambda v: v[idx], self.cond)


def load_image_folder(path: str, image_size: int | None = None, channels: int = 1) -> tuple[np.ndarray, list[str]]:
    """Images listed in ``<path>/metadata.jsonl`` (lines ``{"file_name": ..., "text": ...}``) as
    ((N, channels, H, W) float32 in [-1, 1], captions). A bad line or image is a ValueError naming it."""
    from PIL import Image

    meta = os.path.join(path, "metadata.jsonl")
    if not os.path.isfile(meta):
        raise ValueError(f"data.path={path!r} needs a metadata.jsonl with file_name and text per line.")
    images, captions = [], []
    with open(meta, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                name, text = row["file_name"], row["text"]
                with Image.open(os.path.join(path, name)) as im:
                    img = im.convert("L" if channels == 1 else "RGB")
            except (ValueError, TypeError, KeyError, OSError) as e:
                raise ValueError(f"{meta}:{n}: not a usable {{\"file_name\": ..., \"text\": ...}} line with a "
                                 f"readable image ({type(e).__name__}: {e}).") from e
            if image_size:
                img = img.resize((image_size, image_size), Image.BICUBIC)
            a = np.asarray(img, np.float32) / 127.5 - 1.0
            images.append(a[None] if channels == 1 else a.transpose(2, 0, 1))
            captions.append(str(text))
    if not images:
        raise ValueError(f"{meta} lists no images.")
    try:
        return np.stack(images), captions
    except ValueError as e:
        raise ValueError(f"The images in {path!r} differ in size; set data.image_size to resize them.") from e


def _load_npz_dataset(path: str) -> ArrayDataset:
    """An ``.npz`` dataset (no pickles), checked on load: a float ``x`` of finite values."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data.path={path!r} does not exist (data.kind=npz needs an .npz file).")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"data.path={path!r} is not an .npz file (a zip of .npy arrays, from np.savez).")
    try:
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, AttributeError) as e:
        raise ValueError(f"data.path={path!r} is not a readable .npz of numeric arrays ({e}).") from e
    if "x" not in arrays:
        raise ValueError(f"data.path={path!r} has no array 'x' (the samples); it has {sorted(arrays)}.")
    x = arrays["x"]
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"data.path={path!r}: x must be floating point, got {x.dtype}.")
    if not np.isfinite(x).all():
        raise ValueError(f"data.path={path!r}: x holds NaN or inf values.")
    cond = {k[5:]: v for k, v in arrays.items() if k.startswith("cond/")}
    null = {k[5:]: v for k, v in arrays.items() if k.startswith("null/")}
    for k, v in [*cond.items(), *null.items()]:
        if v.dtype.kind not in "iuf" or (v.dtype.kind == "f" and not np.isfinite(v).all()):
            raise ValueError(f"data.path={path!r}: condition {k!r} must hold finite numbers, got {v.dtype}.")
    try:
        return ArrayDataset(x, cond, null)
    except ValueError as e:
        raise ValueError(f"data.path={path!r}: {e}") from e


def load_dataset(cfg: dict[str, Any], encode_fn: Callable[[np.ndarray, list[str]], ArrayDataset] | None = None
                 ) -> ArrayDataset:
    """The dataset named by ``cfg["data"]``: the built-in digits, an ``.npz`` (``x``, ``cond/<name>``,
    ``null/<name>``), or an image folder with captions (encoded by `encode_fn`, or class-label captions)."""
    d = cfg["data"]
    if d["kind"] == "digits":
        from perflow_jax.pipelines import digits

        x, y = digits.load_digits_data("train")
        return ArrayDataset(x, UNetCondition(class_labels=y), UNetCondition(class_labels=np.int32(digits.NULL_CLASS)))
    if d["kind"] == "npz":
        return _load_npz_dataset(d["path"])
    images, captions = load_image_folder(d["path"], d["image_size"])
    if encode_fn is not None:
        return encode_fn(images, captions)
    try:
        labels = np.asarray([int(c) for c in captions], np.int32)
    except ValueError as e:
        raise ValueError("An image folder with text captions needs an encode_fn (e.g. VAE + text encoder); "
                         "without one, captions must be integer class labels.") from e
    from perflow_jax.pipelines import digits

    return ArrayDataset(images, UNetCondition(class_labels=labels),
                        UNetCondition(class_labels=np.int32(digits.NULL_CLASS)))


def batch_indices(n: int, seed: int, step: int, batch: int) -> np.ndarray:
    """Sample indices of step `step`: consecutive slices of per-epoch permutations (a function of seed and
    step only, so resumed runs see the same data order)."""
    start = step * batch
    out = []
    while len(out) < batch:
        epoch, pos = divmod(start + len(out), n)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        out.extend(perm[pos:pos + batch - len(out)].tolist())
    return np.asarray(out, np.int64)


# ----------------------------------------------------------------------------------------------------------
# Model functions
# ----------------------------------------------------------------------------------------------------------


def unet_config(cfg: dict[str, Any]) -> UNetConfig:
    if cfg["model"]["kind"] == "digits":
        from perflow_jax.pipelines import digits

        return digits.UNET_CONFIG
    path = cfg["model"]["unet_config"]
    try:
        return UNetConfig.from_json(path)
    except FileNotFoundError:
        raise
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"model.unet_config={path!r} is not a usable UNet config.json: {e}") from e


def make_apply_fn(config: UNetConfig, dtype: Any) -> reflow.StudentFn:
    """The student (and teacher) function ``(params, x, timesteps, cond) -> output`` (float32) over a UNet
    in `dtype`: :func:`~perflow_jax.models.adapter.unet_apply` with the params as an argument."""
    module = UNet2DConditionModel(config, dtype=dtype)

    def apply(params: Any, x: jax.Array, timesteps: jax.Array, cond: UNetCondition) -> jax.Array:
        return unet_apply(module, params, x, timesteps, cond)

    return apply


def load_teacher_params(cfg: dict[str, Any], config: UNetConfig) -> dict:
    path = cfg["teacher"]["weights"]
    if not path:
        if cfg["model"]["kind"] != "digits":
            raise ValueError("teacher.weights is required for model.kind=unet.")
        from perflow_jax.pipelines import digits

        path = os.path.join(digits.ASSETS, "teacher.safetensors")
    if not os.path.exists(path):
        raise FileNotFoundError(f"teacher.weights={path!r} does not exist.")
    # Full weights in PyTorch layout read exactly like a ΔW file (same keys and shapes).
    try:
        return delta_lib.load_delta(path, unet_param_shapes(config))
    except ValueError as e:
        raise ValueError(f"teacher.weights={path!r}: {e}") from e


# ----------------------------------------------------------------------------------------------------------
# Train state and step
# ----------------------------------------------------------------------------------------------------------


def make_optimizer(t: Mapping[str, Any]) -> optax.GradientTransformation:
    """AdamW with linear warmup (then constant or cosine decay) and global-norm gradient clipping."""
    lr, warm = t["learning_rate"], t["warmup_steps"]
    if t["lr_schedule"] == "cosine":
        sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(warm, 1), max(t["steps"], warm + 1), 0.1 * lr)
    else:
        sched = optax.join_schedules([optax.linear_schedule(0.0, lr, max(warm, 1)), optax.constant_schedule(lr)],
                                     [max(warm, 1)])
    return optax.chain(optax.clip_by_global_norm(t["grad_clip"]),
                       optax.adamw(sched, b1=t["adam_b1"], b2=t["adam_b2"], weight_decay=t["weight_decay"]))


def init_state(params: Any, tx: optax.GradientTransformation, ema: bool) -> dict[str, Any]:
    """The train state: step, params, optimizer state and EMA params (a copy of params, or None)."""
    copy = lambda tree: jax.tree_util.tree_map(jnp.copy, tree)  # noqa: E731  (own buffers: the state is donated)
    return {"step": jnp.zeros((), jnp.int32), "params": copy(params), "opt_state": tx.init(params),
            "ema": copy(params) if ema else None}


def ema_decay_at(step: jax.Array, decay: float, warmup: bool) -> jax.Array:
    """The EMA decay of 0-based step `step`: `decay`, or with `warmup` ``min((1 + step) / (10 + step), decay)``
    (the reference's diffusers ``EMAModel`` schedule, which also uses 0 at step 0: the first update copies the
    params; 2/11 at step 1, reaching 0.9999 near step 90000)."""
    d = jnp.float32(decay)
    if not warmup:
        return d
    s = jnp.asarray(step).astype(jnp.float32)
    return jnp.where(s > 0, jnp.minimum((1.0 + s) / (10.0 + s), d), 0.0)


def make_train_step(rcfg: reflow.ReflowConfig, apply_fn: reflow.StudentFn, tx: optax.GradientTransformation,
                    ema_decay: float, base_key: jax.Array, ema_warmup: bool = False
                    ) -> Callable[..., tuple[dict, jax.Array]]:
    """``step(state, teacher_params, x (A, b, ...), cond (A, b, ...), null_cond) -> (state, loss)`` over A
    micro-batches (the teacher is an argument, not a closure, so it is never baked into the executable).

    The EMA decay is `ema_decay`, or with `ema_warmup` the reference's (diffusers' EMAModel) warm-up
    ``min((1 + s) / (10 + s), ema_decay)`` at the step's 0-based index s."""

    def micro(params: Any, teacher: Any, key: jax.Array, x: jax.Array, cond: Any, null: Any
              ) -> tuple[jax.Array, Any]:
        def teacher_fn(xt: jax.Array, t: jax.Array, c: Any) -> jax.Array:
            return apply_fn(jax.lax.stop_gradient(teacher), xt, t, c)

        batch = reflow.make_batch(rcfg, teacher_fn, x, cond, null, key)
        return jax.value_and_grad(lambda p: reflow.loss(rcfg, apply_fn, p, batch))(params)

    def step(state: dict, teacher: Any, x: jax.Array, cond: Any, null: Any) -> tuple[dict, jax.Array]:
        key = jax.random.fold_in(base_key, state["step"])
        a = x.shape[0]

        def body(acc: tuple[jax.Array, Any], i: jax.Array) -> tuple[tuple[jax.Array, Any], None]:
            xi = x[i]
            ci = jax.tree_util.tree_map(lambda c: c[i], cond)
            loss, g = micro(state["params"], teacher, jax.random.fold_in(key, i), xi, ci, null)
            return (acc[0] + loss / a, jax.tree_util.tree_map(lambda s, gi: s + gi / a, acc[1], g)), None

        zeros = jax.tree_util.tree_map(jnp.zeros_like, state["params"])
        (loss, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), jnp.arange(a))
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        ema = state["ema"]
        if ema is not None:
            ema = optax.incremental_update(params, ema, 1.0 - ema_decay_at(state["step"], ema_decay, ema_warmup))
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state, "ema": ema}, loss

    return step


# ----------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------


class NonFiniteLossError(ValueError):
    """Training diverged: a loss (or the params) became NaN/inf. Nothing from that step on was saved."""


# Config keys that do not change the trained weights: a resumed run may change them freely.
RESUME_FREE_KEYS = frozenset({"output_dir", "train.progress", "train.log_every", "train.checkpoint_every",
                              "train.keep_checkpoints", "train.sharding", "data.workers"})
RUN_CONFIG = "run_config.json"  # <output_dir>/checkpoints/run_config.json: the config the checkpoints belong to


def _flatten(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _check_allow_keys(allow: Sequence[str]) -> None:
    sections = {k for k, v in DEFAULTS.items() if isinstance(v, dict)}
    for key in allow:
        if key != "*" and key not in _SCHEMA and key not in sections:
            raise ValueError(f"allow-config-change: {key!r} is not a config key; name keys like "
                             f"train.learning_rate, a section like perflow, or '*' for any key.")


def _allowed(key: str, allow: Sequence[str]) -> bool:
    return "*" in allow or key in allow or key.split(".", 1)[0] in allow


def _check_output_dir(out: str) -> None:
    """Refuse an output folder that cannot be made or written before anything is created."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"output_dir={out!r} exists and is not a folder.")
    try:
        if os.path.isdir(out):
            if not os.access(out, os.W_OK | os.X_OK):
                raise PermissionError(f"the folder {out!r} is not writable.")
        else:
            check_creatable(out)
    except OSError as e:
        raise ValueError(f"output_dir={out!r}: {e}") from None


def check_resume(cfg: dict[str, Any], allow_config_change: Sequence[str] = ()) -> tuple[int | None, list[str]]:
    """Whether ``cfg["output_dir"]`` holds checkpoints, and whether `cfg` may continue them (reads only).

    Returns (the latest checkpoint step or None, notes on the config changes made). The checkpoints' config is
    ``<output_dir>/checkpoints/run_config.json``. A key that differs from it raises ValueError naming each
    difference (old → new), unless it is in `allow_config_change` (dotted keys, section names or ``*``), in
    :data:`RESUME_FREE_KEYS` (they do not change the weights), or is ``train.steps`` growing (continuing a run
    for longer). ``train.steps`` below the latest checkpoint is always refused.
    """
    import orbax.checkpoint as ocp

    if isinstance(allow_config_change, str):
        allow_config_change = [allow_config_change]
    _check_allow_keys(allow_config_change)
    out = os.path.abspath(cfg["output_dir"])
    ckpt_dir = os.path.join(out, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        return None, []
    manager = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(
        create=False, enable_async_checkpointing=False))
    try:
        latest = manager.latest_step()
    finally:
        manager.close()
    if latest is None:
        return None, []
    latest = int(latest)
    stored_path = os.path.join(ckpt_dir, RUN_CONFIG)
    if not os.path.isfile(stored_path):  # checkpoints of an older perflow-jax: its final export, if any
        stored_path = os.path.join(out, "train_config.json")
    if not os.path.isfile(stored_path):
        if "*" in allow_config_change:
            return latest, [f"resuming step {latest} without a stored config (allowed by '*')"]
        raise ValueError(f"{ckpt_dir} holds checkpoints (step {latest}) but no {RUN_CONFIG}, so its config is "
                         f"unknown; start in a new output_dir, or resume anyway with --allow-config-change '*'.")
    try:
        with open(stored_path, encoding="utf-8") as f:
            stored = json.load(f)
        if not isinstance(stored, dict):
            raise ValueError(f"a JSON {type(stored).__name__}, not an object")
    except (OSError, ValueError) as e:
        raise ValueError(f"Cannot read the stored run config {stored_path}: {e}.") from e
    old = {**_flatten(DEFAULTS), **_flatten(stored)}
    new = _flatten(json.loads(json.dumps(cfg)))
    diffs = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k) and k not in RESUME_FREE_KEYS]
    steps = new.get("train.steps")
    if steps < latest:
        raise ValueError(f"train.steps={steps} is below the latest checkpoint, step {latest}, in {ckpt_dir}; "
                         f"set train.steps >= {latest} or start in a new output_dir.")
    notes: list[str] = []
    refused = []
    for k in diffs:
        change = f"{k}: {_short(old.get(k), 40)} → {_short(new.get(k), 40)}"
        if k == "train.steps" and isinstance(old.get(k), int) and steps > old[k]:
            notes.append(change + (" (cosine lr schedule: stretched to the new length)"
                                   if new.get("train.lr_schedule") == "cosine" else ""))
        elif _allowed(k, allow_config_change):
            notes.append(change + " (allowed)")
        else:
            refused.append(k)
    if refused:
        changes = "; ".join(f"{k}: {_short(old.get(k), 40)} → {_short(new.get(k), 40)}" for k in refused)
        raise ValueError(f"{out} holds a run (checkpoint at step {latest}) made with another config ({changes}). "
                         f"Use the stored values ({stored_path}), start in a new output_dir, or continue under the "
                         f"new values with --allow-config-change {' '.join(refused)}.")
    return latest, notes


@jax.jit
def _leaves_finite(leaves: list[jax.Array]) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _all_finite(tree: Any) -> bool:
    """Whether every float in `tree` is finite (one jitted reduction, compiled once per tree)."""
    leaves = [x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return not leaves or bool(_leaves_finite(leaves))


def train(cfg: dict[str, Any], dataset: ArrayDataset | None = None, *, teacher_params: Any = None,
          callback: Callable[[int, float], None] | None = None,
          allow_config_change: Sequence[str] = (),
          batch_callback: Callable[[int, np.ndarray], None] | None = None,
          components: Any = None) -> dict[str, Any]:
    """Run (or resume) PeRFlow training for a validated config dict; returns a summary.

    `dataset` defaults to ``cfg["data"]``; `teacher_params` to ``cfg["teacher"]["weights"]``. `callback(step,
    loss)` runs after each step on the host (raising in it stops the run, e.g. to test resuming);
    `batch_callback(step, ids)` gets each step's sample ids (this process's record ids for ``data.kind``
    prepared/online, dataset indices otherwise) before the step runs. ``data.kind`` prepared and online stream
    through Grain (:class:`perflow_jax.training.data.Stream`; `components` may pass the loaded pipeline of
    ``data.model`` for online), and the iterator's state is saved in every checkpoint beside the train state.

    Everything is checked before the output folder is created: the config, the folder, the data, the teacher,
    and, when the folder holds checkpoints, that `cfg` matches the config stored with them
    (:func:`check_resume`; `allow_config_change` names keys that may differ). A loss or params that become
    non-finite stop the run with :class:`NonFiniteLossError`; checkpoints and the ΔW are only ever saved finite.
    """
    import orbax.checkpoint as ocp
    from tqdm.auto import tqdm

    validate(cfg)
    t = cfg["train"]
    out = os.path.abspath(cfg["output_dir"])
    _check_output_dir(out)
    resume_step, notes = check_resume(cfg, allow_config_change)
    rcfg = reflow_config(cfg)
    ucfg = unet_config(cfg)
    dtype = jnp.bfloat16 if cfg["model"]["dtype"] == "bfloat16" else jnp.float32
    apply_fn = make_apply_fn(ucfg, dtype)
    streaming = cfg["data"]["kind"] in STREAM_KINDS and dataset is None
    if not streaming:
        dataset = dataset if dataset is not None else load_dataset(cfg)
    teacher = teacher_params if teacher_params is not None else load_teacher_params(cfg, ucfg)
    teacher = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), teacher)

    mesh = sharding.data_mesh()
    n_dev = sharding.num_data_shards(mesh)
    micro = t["batch_size"] // t["grad_accum"]
    if micro % n_dev:
        raise ValueError(f"The micro-batch (train.batch_size / train.grad_accum = {micro}) must be divisible by "
                         f"the {n_dev} devices.")
    stream = None
    if streaming:
        from perflow_jax.training.data import Stream

        stream = Stream(cfg, mesh, components)
    is_main = jax.process_index() == 0
    ckpt_dir = os.path.join(out, "checkpoints")
    try:  # the first write of the run: nothing above created a file
        os.makedirs(ckpt_dir, exist_ok=True)
    except OSError as e:
        raise ValueError(f"Cannot create output_dir={out!r}: {e.strerror or e}.") from e
    if is_main:
        write_json(os.path.join(ckpt_dir, RUN_CONFIG), cfg)
        for note in notes:
            print(f"[perflow-jax] config change on resume: {note}", flush=True)

    tx = make_optimizer(t)
    state = init_state(teacher, tx, t["ema_decay"] > 0)
    state_sh = sharding.param_sharding(mesh, state, t["sharding"])
    teacher_sh = sharding.param_sharding(mesh, teacher, t["sharding"])
    teacher = jax.device_put(teacher, teacher_sh)
    state = jax.device_put(state, state_sh)

    key = jax.random.key(t["seed"])
    step_fn = make_train_step(rcfg, apply_fn, tx, t["ema_decay"], key, t["ema_warmup"])
    batch_sh = sharding.batch_sharded(mesh, axis=1)  # (A micro-batches, B, ...): split B
    null = jax.tree_util.tree_map(jnp.asarray, stream.null_cond if stream is not None else dataset.null_cond)
    jitted = jax.jit(step_fn, in_shardings=(state_sh, teacher_sh, batch_sh, batch_sh, None),
                     out_shardings=(state_sh, None), donate_argnums=(0,))

    manager = ocp.CheckpointManager(  # with a stream: items "default" (the train state) and "data" (the iterator)
        ckpt_dir, item_names=None if stream is None else ("default", "data"),
        options=ocp.CheckpointManagerOptions(max_to_keep=t["keep_checkpoints"], create=True,
                                             enable_async_checkpointing=False))
    start = 0
    if resume_step is not None:
        start = resume_step
        abstract = jax.tree_util.tree_map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, state_sh)
        if stream is None:
            state = manager.restore(start, args=ocp.args.StandardRestore(abstract))
        else:
            import grain

            restored = manager.restore(start, args=ocp.args.Composite(
                default=ocp.args.StandardRestore(abstract), data=grain.checkpoint.CheckpointRestore(stream.iterator)))
            state = restored["default"]
        print(f"[perflow-jax] resumed from {ckpt_dir} at step {start}", flush=True)

    def diverged(step: int, what: str) -> NonFiniteLossError:
        good = manager.latest_step()
        kept = (f"the last good checkpoint, step {good}, is kept in {ckpt_dir}; lower train.learning_rate (or "
                f"check the data) and re-run with --allow-config-change train.learning_rate to resume from it"
                if good is not None else "no checkpoint was saved yet; lower train.learning_rate (or check the "
                "data) and re-run")
        return NonFiniteLossError(f"Training diverged: {what} at step {step}; stopped without saving that step "
                                  f"(no ΔW exported): {kept}.")

    def check_loss(step: int, loss: jax.Array) -> float:
        value = float(loss)
        if not math.isfinite(value):
            raise diverged(step, f"the loss is {value}")
        return value

    metrics_path = os.path.join(out, "metrics.jsonl")
    bar = tqdm(total=t["steps"], initial=start, disable=not (t["progress"] and is_main), desc="perflow", unit="step")
    pending: list[tuple[int, jax.Array]] = []
    history: list[dict[str, Any]] = []
    t_log, step_log = time.time(), start
    last_loss = float("nan")
    try:
        for s in range(start, t["steps"]):
            if stream is not None:
                x, cond, ids = stream.next(s)
            else:
                idx = batch_indices(len(dataset), t["seed"], s, t["batch_size"]).reshape(t["grad_accum"], micro)
                x, cond = sharding.global_tree(dataset.rows(idx), batch_sh)
                ids = idx.reshape(-1)
            if batch_callback is not None:
                batch_callback(s + 1, ids)
            state, loss = jitted(state, teacher, x, cond, null)
            if pending:  # the previous step's loss, read while this step runs (keeps the device busy)
                check_loss(*pending[-1])
            done = s + 1
            pending.append((done, loss))
            bar.update(1)
            if callback is not None:
                callback(done, float(loss))
            if done % t["log_every"] == 0 or done == t["steps"]:
                losses = [check_loss(i, v) for i, v in pending]
                pending = []
                now = time.time()
                last_loss = float(np.mean(losses))
                row = {"step": done, "loss": last_loss, "steps_per_sec": (done - step_log) / max(now - t_log, 1e-9),
                       "time": now}
                t_log, step_log = now, done
                history.append(row)
                bar.set_postfix(loss=f"{last_loss:.4f}")
                if is_main:
                    print(json.dumps(row), flush=True)
                    with open(metrics_path, "a", encoding="utf-8") as f:
                        f.write(json.dumps(row) + "\n")
            if done % t["checkpoint_every"] == 0 or done == t["steps"]:
                check_loss(done, loss)
                if not _all_finite((state["params"], state["ema"])):
                    raise diverged(done, "the params became non-finite")
                if stream is None:
                    manager.save(done, args=ocp.args.StandardSave(state))
                else:
                    import grain

                    manager.save(done, args=ocp.args.Composite(
                        default=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(stream.iterator)))
                manager.wait_until_finished()
    finally:
        bar.close()
        manager.close()

    final = state["ema"] if state["ema"] is not None else state["params"]
    delta = delta_lib.extract(jax.device_get(final), jax.device_get(teacher))
    result = {"output_dir": out, "steps": t["steps"], "resumed_from": start, "final_loss": last_loss,
              "history": history}
    if is_main:
        result["delta_path"] = delta_lib.export(delta, out, metadata={"format": "pt", "what": "PeRFlow delta"})
        result["scheduler_config"] = os.path.join(out, "scheduler_config.json")
        write_json(result["scheduler_config"], rcfg.perflow.to_dict())
        write_json(os.path.join(out, "train_config.json"), cfg)
    result["params"] = final
    return result


def train_from_config(config_path: str, overrides: list[str], allow_config_change: Sequence[str] = ()) -> dict:
    """Load a YAML config with ``key=value`` overrides, validate it, and train; returns a JSON-able summary
    (output folder, ΔW and scheduler config paths, final loss, logged metrics). `allow_config_change`: config
    keys that may differ from those of the checkpoints being resumed (see :func:`check_resume`)."""
    cfg = load_config(config_path, overrides)
    result = train(cfg, allow_config_change=allow_config_change)
    result.pop("params", None)
    return result


__all__ = ["ArrayDataset", "DEFAULTS", "NonFiniteLossError", "RESUME_FREE_KEYS", "RUN_CONFIG", "STREAM_KINDS",
           "batch_indices", "check_resume", "ema_decay_at", "init_state", "load_config", "load_dataset",
           "make_apply_fn", "make_optimizer", "make_train_step", "read_yaml", "reflow_config", "train",
           "train_from_config", "validate"]
