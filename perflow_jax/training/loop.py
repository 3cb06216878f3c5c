"""The training loop: checks, mesh and shardings, orbax checkpoints (resume), logging, divergence stops and
the ΔW export; see :mod:`perflow_jax.training.train` for the overview."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from perflow_jax import delta as delta_lib
from perflow_jax import sharding
from perflow_jax.io import check_creatable, write_json
from perflow_jax.training import lora_factors
from perflow_jax.training.config import RUN_CONFIG, STREAM_KINDS, check_resume, load_config, reflow_config, validate
from perflow_jax.training.data_sources import ArrayDataset, batch_indices, load_dataset
from perflow_jax.training.step import (
    init_state,
    load_teacher_params,
    make_apply_fn,
    make_optimizer,
    make_train_step,
    unet_config,
)


class NonFiniteLossError(ValueError):
    """Training diverged: a loss (or the params) became NaN/inf. Nothing from that step on was saved."""


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


@jax.jit
def _leaves_finite(leaves: list[jax.Array]) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _all_finite(tree: Any) -> bool:
    """Whether every float in `tree` is finite (one jitted reduction, compiled once per tree)."""
    leaves = [x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return not leaves or bool(_leaves_finite(leaves))


def _check_run(cfg: dict[str, Any], dataset: ArrayDataset | None, teacher_params: Any,
               allow_config_change: Sequence[str], components: Any) -> tuple:
    """Every check of :func:`train` that needs no other process: config, output folder, resume, data, teacher,
    mesh and batch split. Returns what the run needs; creates no file."""
    validate(cfg)
    t = cfg["train"]
    out = os.path.abspath(cfg["output_dir"])
    _check_output_dir(out)
    resume_step, notes = check_resume(cfg, allow_config_change)
    rcfg = reflow_config(cfg)
    ucfg = unet_config(cfg)
    dtype = jnp.bfloat16 if cfg["model"]["dtype"] == "bfloat16" else jnp.float32
    apply_fn = make_apply_fn(ucfg, dtype, t["remat"])
    streaming = cfg["data"]["kind"] in STREAM_KINDS and dataset is None
    if not streaming:
        dataset = dataset if dataset is not None else load_dataset(cfg)
    teacher = teacher_params if teacher_params is not None else load_teacher_params(cfg, ucfg)
    teacher = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), teacher)

    mesh = sharding.train_mesh(t["sharding"], t["fsdp_size"])
    n_dev = sharding.num_data_shards(mesh)
    micro = t["batch_size"] // t["grad_accum"]
    if micro % n_dev:
        raise ValueError(f"The micro-batch (train.batch_size / train.grad_accum = {micro}) must be divisible by "
                         f"the {n_dev} devices.")
    stream = None
    if streaming:
        from perflow_jax.training.data import Stream

        stream = Stream(cfg, mesh, components)
    return t, out, resume_step, notes, rcfg, apply_fn, dataset, teacher, mesh, micro, stream


def _agree(error: BaseException | None) -> None:
    """Raise `error` here, and in a multi-process job make every process stop if any process's checks failed
    (a process that refused alone would leave the others waiting forever in the first collective). Also the
    point where every process has looked for checkpoints before any process writes the folder."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        failed = np.asarray(multihost_utils.process_allgather(np.int32(error is not None))).reshape(-1)
        if error is None and failed.any():
            raise RuntimeError(f"process(es) {np.flatnonzero(failed).tolist()} of this job refused the run (their "
                               "logs say why); this process stops too.")
    if error is not None:
        raise error


def train(cfg: dict[str, Any], dataset: ArrayDataset | None = None, *, teacher_params: Any = None,
          callback: Callable[[int, float], None] | None = None,
          allow_config_change: Sequence[str] = (),
          batch_callback: Callable[[int, np.ndarray], None] | None = None,
          components: Any = None) -> dict[str, Any]:
    """Run (or resume) PeRFlow training for a validated config dict; returns a summary.

    `dataset` defaults to ``cfg["data"]``; `teacher_params` to ``cfg["teacher"]["weights"]``. `callback(step,
    loss)` runs after each step on the host (raising in it stops the run, e.g. to test resuming);
    `batch_callback(step, ids)` gets each step's sample ids (this process's own rows: record ids for
    ``data.kind`` prepared/online, dataset indices otherwise) before the step runs. ``data.kind`` prepared and
    online stream through Grain (:class:`perflow_jax.training.data.Stream`; `components` may pass the loaded pipeline of
    ``data.model`` for online), and the iterator's state is saved in every checkpoint beside the train state.

    Everything is checked before the output folder is created: the config, the folder, the data, the teacher,
    and, when the folder holds checkpoints, that `cfg` matches the config stored with them
    (:func:`check_resume`; `allow_config_change` names keys that may differ). A loss or params that become
    non-finite stop the run with :class:`NonFiniteLossError`; checkpoints and the ΔW are only ever saved finite.
    """
    import orbax.checkpoint as ocp
    from tqdm.auto import tqdm

    try:  # every check before the first collective; in a multi-process job all processes then agree
        checked = _check_run(cfg, dataset, teacher_params, allow_config_change, components)
        error = None
    except Exception as e:  # noqa: BLE001  (re-raised below, after the other processes heard of it)
        checked, error = None, e
    _agree(error)
    t, out, resume_step, notes, rcfg, apply_fn, dataset, teacher, mesh, micro, stream = checked
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
    lora = t["lora_rank"] is not None  # train LoRA factors on the reference's targets, not the whole UNet
    lora_key = jax.random.split(jax.random.key(t["seed"]))[1]  # apart from the step keys fold_in(key, step)
    trained = lora_factors.init_lora(teacher, t["lora_rank"], lora_key) if lora else teacher
    state = init_state(trained, tx, t["ema_decay"] > 0)
    state_sh = sharding.param_sharding(mesh, state, t["sharding"])
    teacher_sh = sharding.param_sharding(mesh, teacher, t["sharding"])
    teacher = sharding.global_tree(teacher, teacher_sh)  # every process holds the same host values
    state = sharding.global_tree(state, state_sh)

    key = jax.random.key(t["seed"])
    step_fn = make_train_step(rcfg, apply_fn, tx, t["ema_decay"], key, t["ema_warmup"],
                              merge_fn=lora_factors.merge if lora else None)
    batch_sh = sharding.batch_sharded(mesh, axis=1)  # (A micro-batches, B, ...): split B
    null = sharding.global_tree(stream.null_cond if stream is not None else dataset.null_cond,
                                sharding.replicated(mesh))
    local = sharding.local_rows(micro, mesh)  # this process's rows of each micro-batch: it reads only those
    jitted = jax.jit(step_fn, in_shardings=(state_sh, teacher_sh, batch_sh, batch_sh, sharding.replicated(mesh)),
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
                idx = idx[:, local]
                x, cond = jax.tree_util.tree_map(
                    lambda a: sharding.global_array_from_local(a, mesh, axis=1), dataset.rows(idx))
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
    host = lambda tree: jax.tree_util.tree_map(sharding.to_host, tree)  # noqa: E731  (all processes gather)
    teacher_host = host(teacher)
    final_host = host(final)
    delta = delta_lib.extract(lora_factors.merge(teacher_host, final_host) if lora else final_host, teacher_host)
    result = {"output_dir": out, "steps": t["steps"], "resumed_from": start, "final_loss": last_loss,
              "history": history}
    if is_main:
        result["delta_path"] = delta_lib.export(delta, out, metadata={"format": "pt", "what": "PeRFlow delta"})
        result["scheduler_config"] = os.path.join(out, "scheduler_config.json")
        write_json(result["scheduler_config"], rcfg.perflow.to_dict())
        write_json(os.path.join(out, "train_config.json"), cfg)
        if lora:
            result["lora_path"] = lora_factors.export(final_host, out)
    result["params"] = final
    return result


def train_from_config(config_path: str, overrides: list[str], allow_config_change: Sequence[str] = ()) -> dict:
    """Load a YAML config with ``key=value`` overrides, validate it, and train; returns a JSON-able summary
    (output folder, ΔW and scheduler config paths, final loss, logged metrics). `allow_config_change`: config
    keys that may differ from those of the checkpoints being resumed (see :func:`check_resume`)."""
    cfg = load_config(config_path, overrides)
    sharding.initialize_distributed()  # a multi-process job (settings from the environment); else a no-op
    result = train(cfg, allow_config_change=allow_config_change)
    result.pop("params", None)
    return result


__all__ = ["NonFiniteLossError", "train", "train_from_config"]
