"""``perflow-jax prepare``: images + captions → VAE latent distributions and text embeddings in ArrayRecord shards.

Inputs are image folders (``metadata.jsonl`` with ``file_name`` and ``text``, or ``NAME.txt`` beside each image)
and webdataset ``.tar`` shards in img2dataset's layout (``KEY.jpg`` + ``KEY.txt`` per sample). Each image is
resized (shorter side, bilinear) and center-cropped to the resolution and scaled to [-1, 1], as the reference's
torchvision transforms do. The VAE encodes it (jitted, batch split over this process's devices) and the
latent distribution's mean and log-variance are stored, so every epoch samples fresh latents; the text is the
last hidden state (SD1/SD2) or both encoders' penultimate states concatenated plus encoder 2's pooled embedding
(SDXL, with time ids ``(res, res, 0, 0, res, res)``). The null (``""``) condition is stored once.

Output folder::

    dataset.json            what was prepared (model, family, resolution, shapes, storage dtype, VAE config, shards)
    null.npz                the null condition (float32)
    shard-00000.array_record + shard-00000.json   records, and the shard's completion note (count, skipped images)
    report.json             totals and every skipped image with its reason

Each folder of up to ``shard_size`` images and each input ``.tar`` is one output shard; process i of n prepares
shards i, i+n, ... Shards whose note exists are done: a rerun with the same settings resumes where a killed run
stopped. Corrupt or unreadable images and samples without a caption are skipped and listed, never fatal.
Record ids are ``shard_index * 2**32 + position`` (the position among that input shard's samples).
"""

from __future__ import annotations

import dataclasses
import glob
import io as _io
import json
import os
import tarfile
import time
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from perflow_jax import sharding
from perflow_jax.io import atomic_file, check_creatable, read_json, write_json
from perflow_jax.pipelines.stable_diffusion import StableDiffusionPipeline
from perflow_jax.training import records

FORMAT = "perflow-jax prepared v1"
DATASET_JSON = "dataset.json"
NULL_FILE = "null.npz"
REPORT = "report.json"
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
STORAGE_DTYPES = ("bfloat16", "float32")
ID_STRIDE = 2**32


# ----------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------


class Sample(NamedTuple):
    """One input sample: where it came from, its image bytes and caption (None when missing), and why it
    cannot be used (None when it can)."""

    name: str
    image: bytes | None
    caption: str | None
    problem: str | None = None


@dataclasses.dataclass(frozen=True)
class InputShard:
    """An output shard's inputs: a ``.tar`` (`members` None), or a folder's (file, caption, problem) rows."""

    index: int
    source: str
    members: tuple[tuple[str, str | None, str | None, str | None], ...] | None = None

    @property
    def name(self) -> str:
        return f"shard-{self.index:05d}"


def _folder_rows(path: str) -> list[tuple[str, str | None, str | None, str | None]]:
    """(image file, caption, caption file, problem) of a folder: from metadata.jsonl, else every image with its
    NAME.txt."""
    meta = os.path.join(path, "metadata.jsonl")
    rows: list[tuple[str, str | None, str | None, str | None]] = []
    if os.path.isfile(meta):
        with open(meta, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    rows.append((os.path.join(path, str(row["file_name"])), str(row["text"]), None, None))
                except (ValueError, TypeError, KeyError) as e:
                    rows.append((f"{meta}:{n}", None, None, f"not a {{\"file_name\", \"text\"}} line ({e})"))
        return rows
    for file in sorted(os.listdir(path)):
        stem, ext = os.path.splitext(file)
        if ext.lower() not in IMAGE_EXTS:
            continue
        txt = os.path.join(path, stem + ".txt")
        problem = None if os.path.isfile(txt) else f"no caption file {stem}.txt"
        rows.append((os.path.join(path, file), None, txt if problem is None else None, problem))
    return rows


def list_inputs(inputs: Sequence[str], shard_size: int = 1000) -> list[InputShard]:
    """The output shards of `inputs` (folders and ``.tar`` files, or folders of ``.tar`` files), in order."""
    shards: list[InputShard] = []
    for path in inputs:
        if os.path.isfile(path) and path.endswith(".tar"):
            shards.append(InputShard(len(shards), path))
        elif os.path.isdir(path):
            tars = sorted(glob.glob(os.path.join(path, "*.tar")))
            rows = _folder_rows(path)
            if not rows and not tars:
                raise ValueError(f"{path!r} holds no images (with metadata.jsonl or NAME.txt captions) and no .tar "
                                 f"shards.")
            for start in range(0, len(rows), shard_size):
                shards.append(InputShard(len(shards), path, tuple(rows[start:start + shard_size])))
            shards.extend(InputShard(len(shards) + i, t) for i, t in enumerate(tars))
        else:
            raise ValueError(f"Input {path!r} is neither a folder nor a .tar file.")
    return shards


def iter_samples(shard: InputShard) -> Iterator[Sample]:
    """The samples of an input shard, in order; problems are reported in the samples, not raised."""
    if shard.members is not None:
        for file, caption, caption_file, problem in shard.members:
            if problem is not None:
                yield Sample(file, None, None, problem)
                continue
            try:
                with open(file, "rb") as f:
                    image = f.read()
                if caption_file is not None:
                    with open(caption_file, encoding="utf-8") as f:
                        caption = f.read().strip()
            except (OSError, UnicodeDecodeError) as e:
                yield Sample(file, None, None, f"unreadable ({type(e).__name__}: {e})")
                continue
            yield Sample(file, image, caption)
        return
    yield from _tar_samples(shard.source)


def _tar_samples(path: str) -> Iterator[Sample]:
    """webdataset samples: consecutive members sharing a key (the name up to its first dot)."""
    def sample(key: str, parts: dict[str, bytes]) -> Sample:
        name = f"{path}:{key}"
        image = next((parts[e] for e in ("jpg", "jpeg", "png", "webp", "bmp") if e in parts), None)
        if image is None:
            return Sample(name, None, None, "no image member")
        if "txt" not in parts:
            return Sample(name, None, None, "no .txt caption member")
        try:
            return Sample(name, image, parts["txt"].decode("utf-8").strip())
        except UnicodeDecodeError as e:
            return Sample(name, None, None, f"caption is not UTF-8 ({e.reason})")

    key, parts = None, {}
    try:
        with tarfile.open(path, "r") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                base = m.name.rsplit("/", 1)[-1]
                k, _, ext = base.partition(".")
                k = m.name[:len(m.name) - len(base)] + k
                if k != key and key is not None:
                    yield sample(key, parts)
                    parts = {}
                key = k
                f = tar.extractfile(m)
                parts[ext.lower()] = f.read() if f is not None else b""
    except (OSError, tarfile.TarError) as e:
        if key is not None:
            yield sample(key, parts)
        yield Sample(path, None, None, f"unreadable tar from here on ({type(e).__name__}: {e})")
        return
    if key is not None:
        yield sample(key, parts)


def load_image(data: bytes, resolution: int) -> np.ndarray:
    """Image bytes → (3, res, res) float32 in [-1, 1]: shorter side resized to `resolution` (bilinear), then
    center-cropped (torchvision's Resize + CenterCrop + Normalize(0.5, 0.5)). Raises OSError/ValueError if the
    bytes are not a decodable image."""
    from PIL import Image

    with Image.open(_io.BytesIO(data)) as im:
        im.load()
        img = im.convert("RGB")
    w, h = img.size
    scale = resolution / min(w, h)
    size = (max(resolution, int(w * scale)), max(resolution, int(h * scale)))
    img = img.resize(size, Image.BILINEAR)
    left = int(round((size[0] - resolution) / 2.0))
    top = int(round((size[1] - resolution) / 2.0))
    img = img.crop((left, top, left + resolution, top + resolution))
    return (np.asarray(img, np.float32) / 127.5 - 1.0).transpose(2, 0, 1)


# ----------------------------------------------------------------------------------------------------------
# Encoders
# ----------------------------------------------------------------------------------------------------------


class Encoders:
    """The VAE and text encoder(s) of a pipeline, jitted over this process's devices.

    Shares the pipeline's stages: :meth:`tokenize` and :meth:`encode_prompt` are
    :class:`~perflow_jax.pipelines.StableDiffusionPipeline`'s (the SD/SDXL text conditions), without its UNet.
    """

    def __init__(self, components: Any, dtype: Any = jnp.float32, devices: Sequence[jax.Device] | None = None):
        from perflow_jax.models.clip import CLIPTextModel, CLIPTextModelWithProjection
        from perflow_jax.models.vae import AutoencoderKL
        from perflow_jax.pipelines.defaults import model_family

        c = self.components = components
        self.family = model_family(c)
        self.mesh = sharding.data_mesh(list(devices) if devices is not None else jax.local_devices())
        self._batch = sharding.batch_sharded(self.mesh)
        rep = sharding.replicated(self.mesh)
        self.vae = AutoencoderKL(c.vae_config, dtype=dtype)
        self.text_encoder = CLIPTextModel(c.text_encoder_config, dtype=dtype)
        self.text_encoder_2 = (CLIPTextModelWithProjection(c.text_encoder_2_config, dtype=dtype)
                               if c.text_encoder_2_config is not None else None)
        params = {"vae": c.vae_params, "text_encoder": c.text_encoder_params}
        if c.text_encoder_2_params is not None:
            params["text_encoder_2"] = c.text_encoder_2_params
        self.params = jax.tree_util.tree_map(lambda a: jax.device_put(np.asarray(a, dtype), rep), params)
        self._images = jax.jit(self._encode_images, out_shardings=self._batch)
        self._texts = jax.jit(self._encode_texts, static_argnums=(2,), out_shardings=self._batch)

    tokenize = StableDiffusionPipeline.tokenize
    encode_prompt = StableDiffusionPipeline.encode_prompt

    def _encode_images(self, params: Any, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
        from perflow_jax.models.vae import AutoencoderKL

        dist = self.vae.apply({"params": params["vae"]}, pixels, method=AutoencoderKL.encode)
        return dist.mean.astype(jnp.float32), dist.logvar.astype(jnp.float32)

    def _encode_texts(self, params: Any, ids: jax.Array, resolution: int) -> dict[str, jax.Array]:
        cond = self.encode_prompt(params, ids, (resolution, resolution))
        return {k: v.astype(jnp.float32) for k, v in cond._asdict().items() if v is not None}

    def _padded(self, a: np.ndarray, rows: int | None) -> tuple[jax.Array, int]:
        """`a` padded (repeating its last row) to `rows` (one compiled shape per batch size), split over devices."""
        n = len(a)
        rows = sharding.padded_size(max(n, rows or 0), self.mesh)
        a = np.concatenate([a, np.repeat(a[-1:], rows - n, axis=0)]) if rows > n else a
        return jax.device_put(a, self._batch), n

    def images(self, pixels: np.ndarray, rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(B, 3, H, W) in [-1, 1] → the latent distribution's (mean, logvar), (B, C, H/f, W/f) float32; computed
        on a batch padded to `rows`."""
        x, n = self._padded(np.asarray(pixels, np.float32), rows)
        mean, logvar = self._images(self.params, x)
        return np.asarray(mean)[:n], np.asarray(logvar)[:n]

    def texts(self, captions: Sequence[str], resolution: int, rows: int | None = None) -> dict[str, np.ndarray]:
        """Captions → {encoder_hidden_states, [text_embeds, time_ids]} float32 arrays (B, ...)."""
        ids, n = self._padded(self.tokenize(list(captions)), rows)
        return {k: np.asarray(v)[:n] for k, v in self._texts(self.params, ids, resolution).items()}


# ----------------------------------------------------------------------------------------------------------
# Prepare
# ----------------------------------------------------------------------------------------------------------


def _settings(model: str, family: str, resolution: int, dtype: str, vae_config: Any, shards: list[InputShard],
              latent_shape: tuple[int, ...]) -> dict[str, Any]:
    return {"format": FORMAT, "model": os.path.abspath(model), "family": family, "resolution": resolution,
            "storage_dtype": dtype, "latent_shape": list(latent_shape),
            "vae_config": json.loads(json.dumps(dataclasses.asdict(vae_config))),
            "inputs": [[s.source, None if s.members is None else len(s.members)] for s in shards],
            "shards": [s.name for s in shards]}


def _own_file(name: str) -> bool:
    """Whether `name` is one prepare writes (or its temp name, which starts with a dot)."""
    return name.startswith((".", "shard-")) or name in (DATASET_JSON, NULL_FILE, REPORT)


def _check_out(out: str, settings: dict[str, Any] | None) -> None:
    """An output folder is new, empty, or a prepared folder of the same `settings` (then resumed; None: not
    compared yet)."""
    if os.path.lexists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out!r} exists and is not a folder.")
    if not os.path.isdir(out):
        check_creatable(out)
        return
    path = os.path.join(out, DATASET_JSON)
    if not os.path.isfile(path):
        # Another process of the same job may be writing its first files: only prepare's own names are allowed.
        if any(not _own_file(f) for f in os.listdir(out)):
            raise ValueError(f"--out {out!r} is a folder that holds other files; give an empty or new folder (or a "
                             f"folder perflow-jax prepare wrote, to resume it).")
        return
    if settings is None:
        return
    old = read_json(path)
    diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
    if diff:
        raise ValueError(f"{path} was prepared with other settings ({', '.join(diff)} differ); resume with the same "
                         f"model, inputs, resolution and dtype, or prepare into a new folder.")


def _decode(sample: Sample, resolution: int) -> tuple[np.ndarray | None, str | None]:
    if sample.problem is not None:
        return None, sample.problem
    try:
        return load_image(sample.image, resolution), None
    except (OSError, ValueError, SyntaxError) as e:  # PIL: UnidentifiedImageError is an OSError
        return None, f"not a readable image ({type(e).__name__}: {e})"


def _decoded(samples: Iterator[Sample], resolution: int, ahead: int
             ) -> Iterator[tuple[int, Sample, np.ndarray | None, str | None]]:
    """(position, sample, pixels, problem) in order, decoded by a thread pool up to `ahead` samples ahead of
    the consumer (PIL decodes and resizes without the GIL, so this overlaps the encoders' device work)."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    window: deque = deque()
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for pos, s in enumerate(samples):
            window.append((pos, s, pool.submit(_decode, s, resolution)))
            if len(window) > ahead:
                p, smp, fut = window.popleft()
                yield (p, smp, *fut.result())
        while window:
            p, smp, fut = window.popleft()
            yield (p, smp, *fut.result())


def _write_shard(out: str, shard: InputShard, encoders: Encoders, resolution: int, dtype: np.dtype,
                 batch_size: int, bar: Any) -> dict[str, Any]:
    """Encode one input shard into ``<name>.array_record`` and write its note; returns the note."""
    from array_record.python.array_record_module import ArrayRecordWriter

    skipped: list[dict[str, str]] = []
    count = 0
    path = os.path.join(out, shard.name + ".array_record")
    with atomic_file(path) as tmp:
        writer = ArrayRecordWriter(tmp, "group_size:1")
        pending: list[tuple[int, np.ndarray, str]] = []

        def flush() -> None:
            nonlocal count
            if not pending:
                return
            mean, logvar = encoders.images(np.stack([p for _, p, _ in pending]), batch_size)
            text = encoders.texts([c for _, _, c in pending], resolution, batch_size)
            for i, (pos, _, _) in enumerate(pending):
                rec = {"id": np.asarray(shard.index * ID_STRIDE + pos, np.int64),
                       "mean": mean[i].astype(dtype), "logvar": logvar[i].astype(dtype)}
                rec.update({k: v[i].astype(dtype if k != "time_ids" else np.float32) for k, v in text.items()})
                writer.write(records.encode(rec))
            count += len(pending)
            bar.update(len(pending))
            pending.clear()

        for pos, s, pixels, problem in _decoded(iter_samples(shard), resolution, 2 * batch_size):
            if problem is not None:
                skipped.append({"sample": s.name, "reason": problem})
                bar.update(1)
                continue
            pending.append((pos, pixels, s.caption))
            if len(pending) == batch_size:
                flush()
        flush()
        writer.close()
    note = {"shard": shard.name, "source": shard.source, "records": count, "skipped": skipped}
    write_json(os.path.join(out, shard.name + ".json"), note)
    return note


def prepare(model: str, inputs: Sequence[str], out: str, *, resolution: int = 512, batch_size: int = 16,
            storage_dtype: str = "bfloat16", shard_size: int = 1000, compute_dtype: Any = jnp.float32,
            progress: bool = True, components: Any = None, encoders: Encoders | None = None) -> dict[str, Any]:
    """Prepare `inputs` for training with `model` (a diffusers SD/SDXL folder or cached repo id) into `out`.

    Every argument is checked before the first file is written; a rerun into the same `out` with the same
    settings skips the shards already done. Returns the report (also written to ``report.json`` by a process
    that finds every shard done). `components` may pass already-loaded
    :class:`~perflow_jax.models.components.PipelineComponents` of `model`, and `encoders` their
    :class:`Encoders` (reusing its compiled programs across calls).
    """
    from tqdm.auto import tqdm

    for name, value in (("resolution", resolution), ("batch_size", batch_size), ("shard_size", shard_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if storage_dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage dtype must be one of {STORAGE_DTYPES}, got {storage_dtype!r}.")
    if not inputs:
        raise ValueError("Give at least one input folder or .tar file.")
    for p in inputs:
        if not os.path.exists(p):
            raise ValueError(f"Input {p!r} does not exist.")
    shards = list_inputs(inputs, shard_size)
    _check_out(out, None)  # before loading the model
    if encoders is not None:
        components = encoders.components
    if components is None:
        from perflow_jax.models.components import load_pipeline_components

        components = load_pipeline_components(model)
    factor = 2 ** (len(components.vae_config.block_out_channels) - 1)
    if resolution % factor:
        raise ValueError(f"resolution={resolution} must be a multiple of the VAE's downscale factor {factor}.")
    latent_shape = (components.vae_config.latent_channels, resolution // factor, resolution // factor)
    encoders = encoders if encoders is not None else Encoders(components, compute_dtype)
    settings = _settings(model, encoders.family, resolution, storage_dtype, components.vae_config, shards,
                         latent_shape)
    _check_out(out, settings)
    os.makedirs(out, exist_ok=True)
    # Every process writes the same null condition and settings (atomic renames), so none waits for another.
    null = encoders.texts([""], resolution)
    with atomic_file(os.path.join(out, NULL_FILE)) as tmp, open(tmp, "wb") as f:
        np.savez(f, **{k: v[0] for k, v in null.items()})
    write_json(os.path.join(out, DATASET_JSON), settings)

    mine = [s for s in shards if s.index % jax.process_count() == jax.process_index()]
    todo = [s for s in mine if not os.path.isfile(os.path.join(out, s.name + ".json"))]
    total = sum(len(s.members) for s in todo if s.members is not None)
    bar = tqdm(total=total or None, disable=not progress, desc="prepare", unit="img")
    t0, done = time.perf_counter(), 0
    try:
        for s in todo:
            done += _write_shard(out, s, encoders, resolution, np.dtype(records.DTYPES[storage_dtype]), batch_size,
                                 bar)["records"]
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    report = collect_report(out, shards)
    report.update({"encoded_now": done, "seconds": seconds, "images_per_second": done / max(seconds, 1e-9)})
    if report["complete"]:  # whichever process finishes last sees every note
        write_json(os.path.join(out, REPORT), report)
    return report


def collect_report(out: str, shards: Sequence[InputShard] | None = None) -> dict[str, Any]:
    """Totals over the shard notes present: records, skipped samples (with reasons), and whether all are done."""
    names = [s.name for s in shards] if shards is not None else read_json(os.path.join(out, DATASET_JSON))["shards"]
    notes = [read_json(os.path.join(out, n + ".json")) for n in names if os.path.isfile(os.path.join(out, n + ".json"))]
    skipped = [row for note in notes for row in note["skipped"]]
    return {"shards": len(names), "shards_done": len(notes), "complete": len(notes) == len(names),
            "records": sum(n["records"] for n in notes), "skipped": len(skipped), "skipped_samples": skipped}


__all__ = ["DATASET_JSON", "Encoders", "FORMAT", "ID_STRIDE", "InputShard", "NULL_FILE", "REPORT", "Sample",
           "collect_report", "iter_samples", "list_inputs", "load_image", "prepare"]
