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

The trainer is split by concern; this module gathers its public names (the CLI and scripts import from here):
:mod:`~perflow_jax.training.config` (typed config, YAML + overrides, resume checks),
:mod:`~perflow_jax.training.data_sources` (in-memory datasets) and :mod:`~perflow_jax.training.data` (Grain
streams), :mod:`~perflow_jax.training.step` (UNet function, optimizer, state, EMA, the jitted step) and
:mod:`~perflow_jax.training.loop` (checkpoints, logging, :func:`train`).
"""

from perflow_jax.training.config import (
    _SCHEMA,
    DEFAULTS,
    RESUME_FREE_KEYS,
    RUN_CONFIG,
    STREAM_KINDS,
    RunConfig,
    _flatten,
    check_resume,
    load_config,
    read_yaml,
    reflow_config,
    validate,
)
from perflow_jax.training.data_sources import ArrayDataset, batch_indices, load_dataset, load_image_folder
from perflow_jax.training.loop import NonFiniteLossError, train, train_from_config
from perflow_jax.training.step import (
    ema_decay_at,
    init_state,
    load_teacher_params,
    make_apply_fn,
    make_optimizer,
    make_train_step,
    unet_config,
)

__all__ = ["DEFAULTS", "RESUME_FREE_KEYS", "RUN_CONFIG", "STREAM_KINDS", "_SCHEMA", "_flatten", "ArrayDataset",
           "NonFiniteLossError", "RunConfig", "batch_indices", "check_resume", "ema_decay_at", "init_state",
           "load_config", "load_dataset", "load_image_folder", "load_teacher_params", "make_apply_fn",
           "make_optimizer", "make_train_step", "read_yaml", "reflow_config", "train", "train_from_config",
           "unet_config", "validate"]
