"""The training config: nested frozen dataclasses (the schema and defaults), YAML + ``key=value`` overrides,
validation with one-line errors, and the check that a resumed run keeps its config.

    cfg = load_config("configs/digits_perflow.yaml", ["train.steps=2000", "output_dir=out/k4"])
    run = RunConfig.from_dict(cfg)          # typed view: run.train.steps, run.model.dtype, ...

Each section is a frozen dataclass (modelled on flax ``examples/imagenet/configs``) whose fields carry their
default and their type check (`_Field`); :data:`DEFAULTS` (a plain nested dict) and the per-key schema are
derived from them. :func:`load_config` returns the validated nested dict, which is what is stored with the
checkpoints (``run_config.json``) and compared on resume; :meth:`RunConfig.from_dict` gives the typed view.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import yaml

from perflow_jax.schedulers import perflow as pf
from perflow_jax.training import reflow
from perflow_jax.training import solver as solver_lib

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



def _f(default: Any, check: _Field) -> Any:
    """A config field: its default and its type check (kept in the dataclass field's metadata)."""
    return dataclasses.field(default=default, metadata={"check": check})


def _section(cls: type) -> Any:
    return dataclasses.field(default_factory=cls)


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """The UNet trained: the built-in digits UNet or a diffusers ``config.json``; the compute dtype."""

    kind: str = _f("digits", _str(choices=("digits", "unet")))
    unet_config: str | None = _f(None, _str(optional=True))
    dtype: str = _f("float32", _str(choices=("float32", "bfloat16")))


@dataclasses.dataclass(frozen=True)
class TeacherSection:
    """The frozen teacher: full weights in PyTorch layout (safetensors) and its prediction type."""

    weights: str | None = _f(None, _str(optional=True))
    prediction_type: str = _f("epsilon", _str())
    set_alpha_to_one: bool = _f(False, _BOOL)


@dataclasses.dataclass(frozen=True)
class PerflowSection:
    """The PeRFlow schedule (:class:`perflow_jax.schedulers.perflow.PeRFlowConfig`)."""

    num_time_windows: int = _f(4, _int())
    prediction_type: str = _f("ddim_eps", _str())
    num_train_timesteps: int = _f(1000, _int())
    beta_start: float = _f(0.00085, _float(0.0, lo_open=True))
    beta_end: float = _f(0.012, _float(0.0, lo_open=True))
    beta_schedule: str = _f("scaled_linear", _str())


@dataclasses.dataclass(frozen=True)
class SolverSection:
    """The teacher's window solver: DDIM steps per window."""

    num_steps: int = _f(8, _int())


@dataclasses.dataclass(frozen=True)
class ReflowSection:
    """The reflow objective (:class:`perflow_jax.training.reflow.ReflowConfig`)."""

    discrete_timesteps: int | None = _f(None, _int(optional=True))
    loss_weighting: str = _f("none", _str())
    huber_c: float = _f(0.03, _float(0.0, lo_open=True))
    cfg_mode: str = _f("sync", _str())
    guidance_scale: float = _f(7.5, _float(1.0))
    cond_dropout: float = _f(0.1, _float(0.0, 1.0, hi_open=True))


@dataclasses.dataclass(frozen=True)
class TrainSection:
    """Optimizer, schedule, EMA, checkpoints, logging and parameter sharding."""

    steps: int = _f(1000, _int())
    batch_size: int = _f(64, _int())
    grad_accum: int = _f(1, _int())
    learning_rate: float = _f(1e-4, _float(0.0, lo_open=True))
    warmup_steps: int = _f(100, _int(0))
    lr_schedule: str = _f("constant", _str(choices=("constant", "cosine")))
    weight_decay: float = _f(1e-2, _float(0.0))
    adam_b1: float = _f(0.9, _float(0.0, 1.0, hi_open=True))
    adam_b2: float = _f(0.999, _float(0.0, 1.0, hi_open=True))
    grad_clip: float = _f(1.0, _float(0.0, lo_open=True))
    ema_decay: float = _f(0.999, _float(0.0, 1.0, hi_open=True))
    ema_warmup: bool = _f(False, _BOOL)
    seed: int = _f(0, _int(0, 2**32 - 1))
    checkpoint_every: int = _f(500, _int())
    keep_checkpoints: int = _f(2, _int())
    log_every: int = _f(50, _int())
    sharding: str = _f("replicated", _str(choices=("replicated", "fsdp")))
    fsdp_size: int | None = _f(None, _int(optional=True))
    lora_rank: int | None = _f(None, _int(optional=True))
    remat: str = _f("none", _str(choices=("none", "full", "dots", "dots_saveable")))
    progress: bool = _f(True, _BOOL)


@dataclasses.dataclass(frozen=True)
class DataSection:
    """The training data: built-in digits, an ``.npz``, an image folder, or Grain streams (prepared/online)."""

    kind: str = _f("digits", _str(choices=("digits", "npz", "images", "prepared", "online")))
    path: str | None = _f(None, _str(optional=True))
    image_size: int | None = _f(None, _int(optional=True))
    model: str | None = _f(None, _str(optional=True))
    workers: int = _f(4, _int(1, 256))


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A whole training run's config: the output folder and one section per concern."""

    output_dir: str | None = _f(None, _PATH)
    model: ModelSection = _section(ModelSection)
    teacher: TeacherSection = _section(TeacherSection)
    perflow: PerflowSection = _section(PerflowSection)
    solver: SolverSection = _section(SolverSection)
    reflow: ReflowSection = _section(ReflowSection)
    train: TrainSection = _section(TrainSection)
    data: DataSection = _section(DataSection)

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> RunConfig:
        """The typed view of a config dict from :func:`load_config` (validated first)."""
        validate(cfg)
        kw = {}
        for f in dataclasses.fields(cls):
            value = cfg[f.name]
            kw[f.name] = f.default_factory(**value) if f.default_factory is not dataclasses.MISSING else value
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        """The plain nested dict (as stored in ``run_config.json``)."""
        return dataclasses.asdict(self)


def _schema(cls: type, prefix: str = "") -> dict[str, _Field]:
    """Every leaf key (dotted) of the config dataclass `cls` and its check."""
    out: dict[str, _Field] = {}
    for f in dataclasses.fields(cls):
        if "check" in f.metadata:
            out[prefix + f.name] = f.metadata["check"]
        else:
            out.update(_schema(f.default_factory, f"{prefix}{f.name}."))
    return out


# The defaults as a plain nested dict, and every leaf's type check; validate() applies them before the library
# configs. Both come from the dataclasses above, the one place a config key is declared.
DEFAULTS: dict[str, Any] = RunConfig().to_dict()
_SCHEMA: dict[str, _Field] = _schema(RunConfig)

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
    need(t["fsdp_size"] is None or t["sharding"] == "fsdp", "train.fsdp_size",
         "sets the fsdp axis of a train.sharding=fsdp mesh; set train.sharding=fsdp or leave it null")
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



# Config keys that do not change the trained weights: a resumed run may change them freely.
RESUME_FREE_KEYS = frozenset({"output_dir", "train.progress", "train.log_every", "train.checkpoint_every",
                              "train.keep_checkpoints", "train.sharding", "train.fsdp_size", "train.remat",
                              "data.workers"})
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



__all__ = ["DEFAULTS", "RESUME_FREE_KEYS", "RUN_CONFIG", "STREAM_KINDS", "DataSection", "ModelSection",
           "PerflowSection", "ReflowSection", "RunConfig", "SolverSection", "TeacherSection", "TrainSection",
           "check_resume", "load_config", "read_yaml", "reflow_config", "validate"]
