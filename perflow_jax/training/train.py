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
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml

from perflow_jax import delta as delta_lib
from perflow_jax import sharding
from perflow_jax.io import atomic_file
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
              "ema_decay": 0.999, "seed": 0, "checkpoint_every": 500, "keep_checkpoints": 2, "log_every": 50,
              "sharding": "replicated", "progress": True},
    "data": {"kind": "digits", "path": None, "image_size": None},
}
_CHOICES = {
    ("model", "kind"): ("digits", "unet"),
    ("model", "dtype"): ("float32", "bfloat16"),
    ("train", "lr_schedule"): ("constant", "cosine"),
    ("train", "sharding"): ("replicated", "fsdp"),
    ("data", "kind"): ("digits", "npz", "images"),
}


def _parse_value(text: str) -> Any:
    """A YAML scalar, with YAML 1.1's gap closed: ``3e-3`` is a float, not a string."""
    value = yaml.safe_load(text) if text != "" else ""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _coerce_numbers(node: dict) -> None:
    for k, v in node.items():
        if isinstance(v, dict):
            _coerce_numbers(v)
        elif isinstance(v, str):
            node[k] = _parse_value(v)


def load_config(config_path: str | None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """DEFAULTS ← YAML file ← ``key=value`` overrides, validated (ValueError on unknown keys / bad values)."""
    cfg = json.loads(json.dumps(DEFAULTS))
    if config_path is not None:
        with open(config_path, encoding="utf-8") as f:
            user = yaml.safe_load(f) or {}
        if not isinstance(user, dict):
            raise ValueError(f"{config_path}: the config must be a YAML mapping, got {type(user).__name__}.")
        _coerce_numbers(user)
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
        leaf[parts[-1]] = _parse_value(text)
        _merge(cfg, node, "")
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


def validate(cfg: dict[str, Any]) -> None:
    """Check types and ranges of a merged config; raises ValueError naming the key."""
    def need(cond: bool, key: str, msg: str) -> None:
        if not cond:
            raise ValueError(f"Bad config value {key}={_get(cfg, key)!r}: {msg}.")

    for (sec, key), choices in _CHOICES.items():
        need(_get(cfg, f"{sec}.{key}") in choices, f"{sec}.{key}", f"expected one of {choices}")
    t = cfg["train"]
    for key in ("steps", "batch_size", "grad_accum", "checkpoint_every", "keep_checkpoints", "log_every"):
        need(isinstance(t[key], int) and not isinstance(t[key], bool) and t[key] > 0, f"train.{key}",
             "must be a positive integer")
    need(isinstance(t["warmup_steps"], int) and t["warmup_steps"] >= 0, "train.warmup_steps", "must be an int >= 0")
    need(isinstance(t["seed"], int), "train.seed", "must be an integer")
    need(t["batch_size"] % t["grad_accum"] == 0, "train.batch_size", "must be divisible by train.grad_accum")
    for key in ("learning_rate", "grad_clip"):
        need(isinstance(t[key], int | float) and t[key] > 0, f"train.{key}", "must be a positive number")
    need(isinstance(t["weight_decay"], int | float) and t["weight_decay"] >= 0, "train.weight_decay", "must be >= 0")
    need(isinstance(t["ema_decay"], int | float) and 0 <= t["ema_decay"] < 1, "train.ema_decay",
         "must be in [0, 1) (0 disables EMA)")
    need(cfg["output_dir"] is not None and str(cfg["output_dir"]) != "", "output_dir", "an output folder is required")
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
    ((N, channels, H, W) float32 in [-1, 1], captions)."""
    from PIL import Image

    meta = os.path.join(path, "metadata.jsonl")
    if not os.path.isfile(meta):
        raise ValueError(f"data.path={path!r} needs a metadata.jsonl with file_name and text per line.")
    images, captions = [], []
    with open(meta, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                img = Image.open(os.path.join(path, row["file_name"])).convert("L" if channels == 1 else "RGB")
                if image_size:
                    img = img.resize((image_size, image_size), Image.BICUBIC)
                a = np.asarray(img, np.float32) / 127.5 - 1.0
                images.append(a[None] if channels == 1 else a.transpose(2, 0, 1))
                captions.append(str(row["text"]))
    return np.stack(images), captions


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
        z = np.load(d["path"])
        cond = {k[5:]: z[k] for k in z.files if k.startswith("cond/")}
        null = {k[5:]: z[k] for k in z.files if k.startswith("null/")}
        return ArrayDataset(z["x"], cond, null)
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
    return UNetConfig.from_json(cfg["model"]["unet_config"])


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
    # Full weights in PyTorch layout read exactly like a ΔW file (same keys and shapes).
    return delta_lib.load_delta(path, unet_param_shapes(config))


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


def make_train_step(rcfg: reflow.ReflowConfig, apply_fn: reflow.StudentFn, tx: optax.GradientTransformation,
                    ema_decay: float, base_key: jax.Array) -> Callable[..., tuple[dict, jax.Array]]:
    """``step(state, teacher_params, x (A, b, ...), cond (A, b, ...), null_cond) -> (state, loss)`` over A
    micro-batches (the teacher is an argument, not a closure, so it is never baked into the executable)."""

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
            ema = optax.incremental_update(params, ema, 1.0 - ema_decay)
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state, "ema": ema}, loss

    return step


# ----------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------


def _atomic_write_json(path: str, obj: Any) -> None:
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)


def train(cfg: dict[str, Any], dataset: ArrayDataset | None = None, *, teacher_params: Any = None,
          callback: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """Run (or resume) PeRFlow training for a validated config dict; returns a summary.

    `dataset` defaults to ``cfg["data"]``; `teacher_params` to ``cfg["teacher"]["weights"]``. `callback(step,
    loss)` runs after each step on the host (raising in it stops the run, e.g. to test resuming).
    """
    import orbax.checkpoint as ocp
    from tqdm.auto import tqdm

    t = cfg["train"]
    out = os.path.abspath(cfg["output_dir"])
    os.makedirs(out, exist_ok=True)
    rcfg = reflow_config(cfg)
    ucfg = unet_config(cfg)
    dtype = jnp.bfloat16 if cfg["model"]["dtype"] == "bfloat16" else jnp.float32
    apply_fn = make_apply_fn(ucfg, dtype)
    dataset = dataset if dataset is not None else load_dataset(cfg)
    teacher = teacher_params if teacher_params is not None else load_teacher_params(cfg, ucfg)
    teacher = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), teacher)

    mesh = sharding.data_mesh()
    n_dev = sharding.num_data_shards(mesh)
    micro = t["batch_size"] // t["grad_accum"]
    if micro % n_dev:
        raise ValueError(f"The micro-batch (train.batch_size / train.grad_accum = {micro}) must be divisible by "
                         f"the {n_dev} devices.")
    tx = make_optimizer(t)
    state = init_state(teacher, tx, t["ema_decay"] > 0)
    state_sh = sharding.param_sharding(mesh, state, t["sharding"])
    teacher_sh = sharding.param_sharding(mesh, teacher, t["sharding"])
    teacher = jax.device_put(teacher, teacher_sh)
    state = jax.device_put(state, state_sh)

    key = jax.random.key(t["seed"])
    step_fn = make_train_step(rcfg, apply_fn, tx, t["ema_decay"], key)
    batch_sh = sharding.batch_sharded(mesh, axis=1)  # (A micro-batches, B, ...): split B
    null = jax.tree_util.tree_map(jnp.asarray, dataset.null_cond)
    jitted = jax.jit(step_fn, in_shardings=(state_sh, teacher_sh, batch_sh, batch_sh, None),
                     out_shardings=(state_sh, None), donate_argnums=(0,))

    ckpt_dir = os.path.join(out, "checkpoints")
    manager = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(
        max_to_keep=t["keep_checkpoints"], create=True, enable_async_checkpointing=False))
    start = 0
    if manager.latest_step() is not None:
        start = int(manager.latest_step())
        abstract = jax.tree_util.tree_map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, state_sh)
        state = manager.restore(start, args=ocp.args.StandardRestore(abstract))
        print(f"[perflow-jax] resumed from {ckpt_dir} at step {start}", flush=True)

    metrics_path = os.path.join(out, "metrics.jsonl")
    is_main = jax.process_index() == 0
    bar = tqdm(total=t["steps"], initial=start, disable=not (t["progress"] and is_main), desc="perflow", unit="step")
    pending: list[jax.Array] = []
    history: list[dict[str, Any]] = []
    t_log, step_log = time.time(), start
    last_loss = float("nan")
    for s in range(start, t["steps"]):
        idx = batch_indices(len(dataset), t["seed"], s, t["batch_size"]).reshape(t["grad_accum"], micro)
        x, cond = sharding.global_tree(dataset.rows(idx), batch_sh)
        state, loss = jitted(state, teacher, x, cond, null)
        pending.append(loss)
        done = s + 1
        bar.update(1)
        if callback is not None:
            callback(done, float(loss))
        if done % t["log_every"] == 0 or done == t["steps"]:
            losses = [float(v) for v in jax.device_get(pending)]
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
            manager.save(done, args=ocp.args.StandardSave(state))
            manager.wait_until_finished()
    bar.close()
    manager.close()

    final = state["ema"] if state["ema"] is not None else state["params"]
    delta = delta_lib.extract(jax.device_get(final), jax.device_get(teacher))
    result = {"output_dir": out, "steps": t["steps"], "resumed_from": start, "final_loss": last_loss,
              "history": history}
    if is_main:
        result["delta_path"] = delta_lib.export(delta, out, metadata={"format": "pt", "what": "PeRFlow delta"})
        result["scheduler_config"] = os.path.join(out, "scheduler_config.json")
        _atomic_write_json(result["scheduler_config"], rcfg.perflow.to_dict())
        _atomic_write_json(os.path.join(out, "train_config.json"), cfg)
    result["params"] = final
    return result


def train_from_config(config_path: str, overrides: list[str]) -> dict:
    """Load a YAML config with ``key=value`` overrides, validate it, and train; returns a JSON-able summary
    (output folder, ΔW and scheduler config paths, final loss, logged metrics)."""
    cfg = load_config(config_path, overrides)
    result = train(cfg)
    result.pop("params", None)
    return result


__all__ = ["ArrayDataset", "DEFAULTS", "batch_indices", "init_state", "load_config", "load_dataset",
           "make_apply_fn", "make_optimizer", "make_train_step", "reflow_config", "train",
           "train_from_config", "validate"]
