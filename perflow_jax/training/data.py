"""Streaming training data on Grain: prepared ArrayRecord shards (``data.kind: prepared``) or images encoded on
the fly (``data.kind: online``).

Both are Grain ``MapDataset`` pipelines: the records of a data set are split by process (process i reads records
i, i+n, ...), shuffled with the run's seed (a new permutation each epoch), repeated and batched into this
process's share of each global batch. The iterator's position is its whole state: :class:`Stream` saves it in
the orbax checkpoint (``grain.checkpoint.CheckpointSave``), so a resumed run sees exactly the batches an
uninterrupted one would.

A prepared record holds the VAE posterior's mean and log-variance, not a latent: :func:`sample_latents` draws
``mean + exp(logvar / 2) · ε`` and scales it for the UNet, on device and keyed by the training step, so every
epoch trains on fresh latents. Online batches hold pixels and token ids; :class:`Stream` encodes them with the
same :class:`~perflow_jax.training.prepare.Encoders` stages ``perflow-jax prepare`` uses, one jitted call per
step.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np

from perflow_jax import sharding
from perflow_jax.io import read_json
from perflow_jax.models.adapter import UNetCondition
from perflow_jax.models.vae import LatentDistribution, VAEConfig, latents_from_encoding
from perflow_jax.training import prepare as prep
from perflow_jax.training import records

COND_FIELDS = ("encoder_hidden_states", "text_embeds", "time_ids")


@dataclasses.dataclass(frozen=True)
class PreparedDataset:
    """A folder written by ``perflow-jax prepare``: its settings, shard files and null condition."""

    path: str
    settings: dict[str, Any]
    shard_paths: tuple[str, ...]
    null_cond: UNetCondition
    vae_config: VAEConfig

    @classmethod
    def open(cls, path: str) -> PreparedDataset:
        """Read and check a prepared folder; a missing file or an unfinished shard is a one-line ValueError."""
        meta = os.path.join(path, prep.DATASET_JSON)
        if not os.path.isfile(meta):
            raise ValueError(f"data.path={path!r} is not a prepared data set (no {prep.DATASET_JSON}); make one with "
                             f"perflow-jax prepare.")
        settings = read_json(meta)
        if settings.get("format") != prep.FORMAT:
            raise ValueError(f"{meta}: format {settings.get('format')!r} is not {prep.FORMAT!r}.")
        missing = [n for n in settings["shards"] if not os.path.isfile(os.path.join(path, n + ".json"))]
        if missing:
            raise ValueError(f"data.path={path!r}: {len(missing)} of {len(settings['shards'])} shards are not "
                             f"prepared yet (first: {missing[0]}); rerun perflow-jax prepare with the same "
                             f"arguments to finish them.")
        with np.load(os.path.join(path, prep.NULL_FILE)) as z:
            null = {k: np.asarray(z[k], np.float32) for k in z.files}
        shards = tuple(os.path.join(path, n + ".array_record") for n in settings["shards"]
                       if read_json(os.path.join(path, n + ".json"))["records"] > 0)
        vae = VAEConfig.from_dict(settings["vae_config"])
        return cls(path, settings, shards, UNetCondition.from_mapping(null), vae)

    def source(self) -> Any:
        return grain.sources.ArrayRecordDataSource(list(self.shard_paths))


def _decode(data: bytes) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, np.float32) if v.dtype.kind == "f" else v for k, v in records.decode(data).items()}


def make_dataset(source: Any, decode: Callable[[Any], dict[str, np.ndarray]], *, seed: int, batch: int,
                 process_index: int | None = None, process_count: int | None = None) -> grain.MapDataset:
    """This process's records of `source`, shuffled by `seed` (anew each epoch), repeated forever, decoded and
    batched by `batch` (this process's rows of a global batch)."""
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    ds = grain.MapDataset.source(source)[pi::pc]
    if len(ds) < batch:
        raise ValueError(f"This process's share of the data ({len(ds)} records) is smaller than its batch ({batch}); "
                         f"prepare more data or lower train.batch_size.")
    return ds.shuffle(seed=seed).repeat(None).map(decode).batch(batch, drop_remainder=True)


def iterator(ds: grain.MapDataset, threads: int = 4, prefetch: int = 8) -> Any:
    """A checkpointable iterator over `ds` with `threads` reader threads (``get_state``/``set_state``)."""
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch)))


def sample_latents(mean: jax.Array, logvar: jax.Array, key: jax.Array, config: VAEConfig) -> jax.Array:
    """UNet latents from stored posteriors: ``scale(mean + exp(logvar/2)·ε)`` in float32, any leading dims."""
    shape = mean.shape
    dist = LatentDistribution(mean.reshape(-1, *shape[-3:]).astype(jnp.float32),
                              logvar.reshape(-1, *shape[-3:]).astype(jnp.float32))
    return latents_from_encoding(dist, config, key).reshape(shape)


class Stream:
    """The training loop's data: ``next()`` → (x, cond, ids) as global arrays shaped (A, B/A, ...), split over
    the mesh along axis 1; ``null_cond`` the unbatched null condition; ``iterator`` the Grain iterator whose state
    goes into checkpoints.

    Args:
      cfg: the training config (``data``, ``train.batch_size``/``grad_accum``/``seed``).
      mesh: the data mesh of the run.
      components: for ``data.kind: online``, loaded pipeline components of ``data.model`` (else loaded here).
    """

    def __init__(self, cfg: dict[str, Any], mesh: Any, components: Any = None):
        d, t = cfg["data"], cfg["train"]
        self.mesh, self.accum = mesh, t["grad_accum"]
        pc = jax.process_count()
        if t["batch_size"] % pc:
            raise ValueError(f"train.batch_size={t['batch_size']} must divide over the {pc} processes.")
        local = t["batch_size"] // pc
        if local % self.accum:
            raise ValueError(f"This process's batch ({local}) must divide into train.grad_accum={self.accum} parts.")
        self.online = d["kind"] == "online"
        if self.online:
            self._init_online(cfg, components)
        else:
            self.data = PreparedDataset.open(d["path"])
            self.vae_config = self.data.vae_config
            self.null_cond = self.data.null_cond
            ds = make_dataset(self.data.source(), _decode, seed=t["seed"], batch=local)
        self.iterator = iterator(ds if not self.online else self._ds, threads=d["workers"])
        key = jax.random.fold_in(jax.random.key(t["seed"]), 0x1A7E)  # the latents' own stream
        vae = self.vae_config
        self._sample = jax.jit(lambda m, lv, s: sample_latents(m, lv, jax.random.fold_in(key, s), vae),
                               out_shardings=sharding.batch_sharded(mesh, 1))

    def _init_online(self, cfg: dict[str, Any], components: Any) -> None:
        from perflow_jax.models.components import load_pipeline_components

        d, t = cfg["data"], cfg["train"]
        if not d["model"]:
            raise ValueError("data.kind=online needs data.model: the diffusers folder whose VAE and text encoders "
                             "encode the images.")
        res = d["image_size"]
        if not res:
            raise ValueError("data.kind=online needs data.image_size (the training resolution).")
        components = components if components is not None else load_pipeline_components(d["model"])
        self.encoders = prep.Encoders(components)  # this process's devices: it encodes its own rows
        self.vae_config = components.vae_config
        self.resolution = res
        null = self.encoders.texts([""], res)
        self.null_cond = UNetCondition.from_mapping({k: v[0] for k, v in null.items()})
        samples = OnlineSource(prep.list_inputs(d["path"].split(os.pathsep)), self.encoders.tokenize, res)
        self._ds = make_dataset(samples, lambda s: s, seed=t["seed"], batch=t["batch_size"] // jax.process_count())
        self._encode = jax.jit(self._encode_online)

    def _encode_online(self, params: Any, pixels: jax.Array, ids: jax.Array) -> tuple[Any, Any]:
        mean, logvar = self.encoders._encode_images(params, pixels)
        return (mean, logvar), self.encoders._encode_texts(params, ids, self.resolution)

    def _global(self, a: np.ndarray) -> jax.Array:
        a = np.asarray(a)
        return sharding.global_array_from_local(a.reshape(self.accum, -1, *a.shape[1:]), self.mesh, axis=1)

    def next(self, step: int) -> tuple[jax.Array, UNetCondition, np.ndarray]:
        """Step `step`'s batch: latents (A, b, C, h, w), their condition, and this process's record ids (B_local,)."""
        batch = next(self.iterator)
        if self.online:
            pixels, n = self.encoders._padded(batch["pixels"], None)
            ids, _ = self.encoders._padded(batch["ids"], None)
            (mean, logvar), text = self._encode(self.encoders.params, pixels, ids)
            mean, logvar, text = mean[:n], logvar[:n], {k: v[:n] for k, v in text.items()}
            batch = {"id": batch["id"], "mean": np.asarray(mean), "logvar": np.asarray(logvar),
                     **{k: np.asarray(v) for k, v in text.items()}}
        mean, logvar = self._global(batch["mean"]), self._global(batch["logvar"])
        x = self._sample(mean, logvar, jnp.asarray(step, jnp.uint32))
        cond = UNetCondition(**{k: self._global(batch[k]) if k in batch else None for k in COND_FIELDS})
        return x, cond, np.asarray(batch["id"]).reshape(-1)


class OnlineSource:
    """Random access to raw samples (``data.kind: online``): image files of folders and members of ``.tar``
    shards (read at their offsets), each as {id, pixels (3, R, R), ids (token ids)}. Samples that cannot be
    used are dropped when the source is indexed (folders) or replaced by the next usable one (images that fail
    to decode), so a batch never stops training."""

    def __init__(self, shards: list[prep.InputShard], tokenize: Callable[[list[str]], np.ndarray],
                 resolution: int | None = None):
        self.tokenize, self.resolution = tokenize, resolution
        self.rows: list[tuple[int, prep.Sample]] = []
        for s in shards:
            for pos, sample in enumerate(prep.iter_samples(s)):
                if sample.problem is None:
                    self.rows.append((s.index * prep.ID_STRIDE + pos, sample))
        if not self.rows:
            raise ValueError("data.path holds no usable image–caption samples.")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        for k in range(len(self.rows)):
            rid, s = self.rows[(i + k) % len(self.rows)]
            try:
                pixels = prep.load_image(s.image, self.resolution)
            except (OSError, ValueError, SyntaxError):
                continue
            return {"id": np.int64(rid), "pixels": pixels, "ids": self.tokenize([s.caption])[0]}
        raise ValueError("data.path holds no decodable images.")


__all__ = ["COND_FIELDS", "OnlineSource", "PreparedDataset", "Stream", "iterator", "make_dataset", "sample_latents"]
