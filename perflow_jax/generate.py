"""Generation jobs: a prompt file → sharded images, on every process and device, resumable, identical at any scale.

:func:`run` is ``perflow-jax generate`` as a Python call. The job is what the prompt file, the images per prompt,
the shard size and the sampling settings define; the layout (processes, devices, batch) only decides who does it:

- **Images and shards.** Images are numbered in prompt order; shard ``k`` holds a fixed range of them and is
  written by process ``k mod P`` (:mod:`perflow_jax.shards`). Each process streams the prompt file, takes the
  images of its own missing shards, tokenizes only those and feeds them as its rows of one global batch, sharded
  over a ``("data",)`` mesh of all devices; it reads back only its own rows (no gather to one host) and encodes
  and writes its shards in a background thread pool while the devices run the next batch. Padding rows (the end
  of a process's work) are dropped.
- **Noise.** Image ``i`` of a prompt starts from ``normal(fold_in(k, 0))`` with
  ``k = fold_in(fold_in(key(job seed), prompt key), i)``, the prompt key being the prompt's index in the file or a
  hash of its ``id`` (:func:`perflow_jax.prompts.prompt_key`); a prompt with its own ``seed`` uses
  ``k = fold_in(key(seed), i)``, the noise of ``pipe(prompt, seed=seed)``'s image ``i``. Nothing of the layout
  enters, so with the same per-device batch the PNG bytes are the same on 1 device, N devices or N hosts.
  (Schedulers that inject noise at every step draw it per global batch: their images do depend on the layout.)
- **Guidance.** Classifier-free guidance is on for the whole job when the job's or any prompt's guidance scale
  is above 1; then a prompt with a scale ≤ 1 runs at scale 1 (its conditional prediction).
- **Resume.** ``job.json`` records the settings when the job starts; a rerun with other settings is refused with
  the setting named, and a rerun with the same ones skips the complete shards (with any process count).
  ``manifest.json`` (counts, settings, versions, layout, throughput) is written by process 0 at the end.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import json
import os
import platform
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from perflow_jax import __version__, prompts, sharding, shards, values
from perflow_jax.io import check_creatable, read_json, write_json
from perflow_jax.pipelines.stable_diffusion import GenerationInputs, GenerationSpec, StableDiffusionPipeline

JOB_FILE = "job.json"
MANIFEST_FILE = "manifest.json"
DEFAULT_SHARD_SIZE = 1000


class RowInputs(NamedTuple):
    """Per-row inputs of the job's program besides the token ids (all (B,))."""

    seed: jax.Array  # uint32: the prompt's own seed, else the job seed
    prompt_key: jax.Array  # uint32: folded into the key when the prompt has no seed of its own
    keyed: jax.Array  # bool: fold prompt_key in (the prompt has no seed of its own)
    image: jax.Array  # uint32: image index within its prompt
    guidance: jax.Array  # float32: the row's CFG scale


class _Row(NamedTuple):
    number: int
    prompt: prompts.Prompt
    image: int


@dataclasses.dataclass
class JobResult:
    """What :func:`run` did: images and shards written by this process, and timings."""

    images: int
    shards: int
    compile_seconds: float
    run_seconds: float
    manifest: dict[str, Any] | None  # process 0's manifest.json, else None


def run(pipe: StableDiffusionPipeline, prompt_file: str, out: str, *, prompt_column: str = "prompt",
        images_per_prompt: int = 1, num_inference_steps: int | None = None, guidance_scale: float | None = None,
        negative_prompt: str | None = None, seed: int = 0, height: int | None = None, width: int | None = None,
        global_batch: int | None = None, shard_size: int = DEFAULT_SHARD_SIZE, fmt: str = "tar",
        model: dict[str, Any] | None = None, num_workers: int | None = None, log_jsonl: str | None = None,
        progress: bool = True) -> JobResult:
    """Generate every image of `prompt_file` into shards in `out` (see the module docstring).

    Start ``jax.distributed`` first in a multi-process job (:func:`perflow_jax.sharding.initialize_distributed`,
    before building `pipe`); every process then calls this with the same arguments. `model` describes the model
    in the per-image records and ``job.json`` (default: the pipeline's path, family, scheduler and dtype; the CLI
    adds ΔW and LoRAs). `global_batch` (default: the memory estimate's) must divide over the devices.
    Raises ValueError (or OSError) with a one-line message for bad input, before any device work.
    """
    check_output(out)
    images_per_prompt = values.check_int("images_per_prompt", images_per_prompt, min_value=1)
    shard_size = values.check_int("shard_size", shard_size, min_value=1)
    seed = values.check_seed("seed", seed)
    if fmt not in shards.SHARD_FORMATS:
        raise ValueError(f"format must be one of {shards.SHARD_FORMATS}, got {fmt!r}.")
    summary = prompts.summarize(prompt_file, prompt_column, images_per_prompt)
    height, width = pipe._check_size(height, width)
    steps = values.check_int("num_inference_steps", pipe.defaults.num_inference_steps if num_inference_steps is None
                             else num_inference_steps, min_value=1)
    guidance = values.check_float("guidance_scale", pipe.defaults.guidance_scale if guidance_scale is None
                                  else guidance_scale, min_value=0.0)
    mesh = pipe.mesh
    ndev = sharding.num_data_shards(mesh)
    batch = global_batch if global_batch is not None else pipe.default_batch_size(height, width)
    batch = values.check_int("global_batch", batch, min_value=1)
    if batch % ndev:
        raise ValueError(f"global_batch {batch} does not divide over the {ndev} devices; use a multiple of {ndev}.")
    any_negative = summary.any_negative or negative_prompt is not None
    spec = GenerationSpec(
        batch=batch, height=height, width=width, num_inference_steps=steps,
        use_cfg=max(guidance, summary.max_guidance or 0.0) > 1.0,
        zero_negative=not any_negative and pipe.family == "sdxl" and pipe.force_zeros_for_empty_prompt,
        has_latents=True, output_type="uint8")
    pipe.scheduler_state(steps, pipe.latent_shape(spec))  # the scheduler refuses bad step counts before job.json
    model = dict(model or {}) or {"model": pipe.components.path}
    model.update(family=pipe.family, scheduler=pipe.scheduler.name, dtype=pipe.dtype.name)
    settings = {
        "prompts_sha256": summary.sha256, "prompt_column": prompt_column, "num_prompts": summary.num_prompts,
        "images_per_prompt": images_per_prompt, "num_images": summary.num_images, "shard_size": shard_size,
        "format": fmt, "negative_prompt": negative_prompt, "seed": seed, "steps": steps, "guidance_scale": guidance,
        "use_cfg": spec.use_cfg, "height": height, "width": width, **model}
    check_settings(out, settings)
    pid, nproc = jax.process_index(), jax.process_count()
    if pid == 0 and not os.path.isfile(os.path.join(out, JOB_FILE)):
        write_json(os.path.join(out, JOB_FILE), {"settings": settings, "started": time.time()})

    total_shards = shards.num_shards(summary.num_images, shard_size)
    mine = [k for k in range(total_shards) if shards.owner(k, nproc) == pid and not shards.is_complete(out, k, fmt)]
    local_n = batch // ndev * sum(d.process_index == pid for d in mesh.devices.flat)
    my_images = sum(len(shards.shard_range(k, summary.num_images, shard_size)) for k in mine)
    per_process = _allgather_int(my_images)
    num_steps = max(-(-n // local_n) for n in per_process)

    record = dict(steps=steps, height=height, width=width, **model)
    writer = _ShardWriter(out, fmt, summary.num_images, shard_size, num_workers, 4 * local_n, seed, negative_prompt)
    rows = _rows(prompt_file, prompt_column, images_per_prompt, mine, summary.num_images, shard_size)
    feeder = _Feeder(pipe, spec, seed, guidance, negative_prompt, local_n, mesh)
    bar = _Progress(pid == 0 and progress, log_jsonl if pid == 0 else None, sum(per_process), per_process, local_n)

    compiled, compile_s, t_run, pending = None, 0.0, None, None
    try:
        for step in range(num_steps):
            chunk = [r for _, r in zip(range(local_n), rows, strict=False)]
            args = feeder.inputs(chunk)
            if compiled is None:
                t0 = time.perf_counter()
                compiled = _compile(pipe, spec, args)
                compile_s = time.perf_counter() - t0
                t_run = time.perf_counter()
                bar.start()  # rate and ETA count from here, not from before the compile
            images = compiled(*args)  # dispatched; the previous batch is written while this one runs
            if pending is not None:
                writer.add(*pending)
            pending = (images, chunk, record, feeder.guidance_of)
            bar.update(step)
        if pending is not None:
            writer.add(*pending)
        written = writer.close()
    finally:
        writer.shutdown()
        bar.close()
    run_s = time.perf_counter() - t_run if t_run is not None else 0.0
    _barrier("perflow_jax.generate.done")
    manifest = None
    if pid == 0:
        manifest = _write_manifest(out, settings, summary, total_shards, fmt, spec, ndev, nproc, sum(per_process),
                                   compile_s, run_s)
    return JobResult(images=my_images, shards=written, compile_seconds=compile_s, run_seconds=run_s,
                     manifest=manifest)


# ----------------------------------------------------------------------------------------------------------
# Checks before any work
# ----------------------------------------------------------------------------------------------------------


def check_output(out: str) -> None:
    """`out` must be a new folder, an empty one, or one a generation job wrote (it holds ``job.json``)."""
    if not str(out).strip():
        raise ValueError("--out is an empty path; give the folder to write the shards to.")
    if os.path.lexists(out) and not os.path.isdir(out):
        raise FileExistsError(f"--out {out!r} is an existing file, not a folder; choose a folder for the shards.")
    if os.path.isdir(out) and os.listdir(out) and not os.path.isfile(os.path.join(out, JOB_FILE)):
        raise FileExistsError(f"--out {out!r} holds files of no generation job (no {JOB_FILE}); choose a new or "
                              "empty folder.")
    if not os.path.exists(out):
        check_creatable(out)


def check_settings(out: str, settings: dict[str, Any]) -> None:
    """A resumed job must have the settings it started with (``job.json``): else a ValueError naming the first
    setting that differs."""
    path = os.path.join(out, JOB_FILE)
    if not os.path.isfile(path):
        return
    old = read_json(path).get("settings")
    if not isinstance(old, dict):
        raise ValueError(f"{path!r} has no 'settings' object; it was not written by perflow-jax generate.")
    new = json.loads(json.dumps(settings))  # as JSON would hold it (tuples → lists)
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            raise ValueError(f"{path}: the job in {out!r} was started with {key}={old.get(key)!r}, this run has "
                             f"{key}={new.get(key)!r}; rerun with the job's settings or choose a new --out.")


# ----------------------------------------------------------------------------------------------------------
# Rows and inputs
# ----------------------------------------------------------------------------------------------------------


def _rows(prompt_file: str, column: str, per: int, mine: Sequence[int], num_images: int, shard_size: int
          ) -> Iterator[_Row]:
    """The images of shards `mine` (ascending), streamed from the prompt file in image order."""
    if not mine:
        return
    wanted = iter(mine)
    k = next(wanted)
    lo, hi = k * shard_size, min((k + 1) * shard_size, num_images)
    n = 0
    for p in prompts.read_prompts(prompt_file, column):
        count = p.num_images if p.num_images is not None else per
        for i in range(count):
            while n >= hi:
                k = next(wanted, None)
                if k is None:
                    return
                lo, hi = k * shard_size, min((k + 1) * shard_size, num_images)
            if n >= lo:
                yield _Row(n, p, i)
            n += 1


def row_noise(seed: jax.Array, prompt_key: jax.Array, keyed: jax.Array, image: jax.Array,
              shape: tuple[int, ...]) -> jax.Array:
    """One image's initial noise (float32 `shape`): ``normal(fold_in(k, 0))`` with ``k = fold_in(fold_in(key(seed),
    prompt_key), image)`` when `keyed`, else ``k = fold_in(key(seed), image)`` (the pipeline's image `image`)."""
    base = jax.random.key(seed)
    data = jnp.where(keyed, jax.random.key_data(jax.random.fold_in(base, prompt_key)), jax.random.key_data(base))
    k = jax.random.fold_in(jax.random.wrap_key_data(data), image)
    return jax.random.normal(jax.random.fold_in(k, 0), shape)


def job_program(pipe: StableDiffusionPipeline, spec: GenerationSpec):
    """``fn(params, state, ids, neg_ids, rows, seed) -> uint8 images``: the pipeline's stages with per-row noise
    (:func:`row_noise`) and per-row guidance."""
    shape = pipe.latent_shape(spec)[1:]

    def program(params: Any, state: Any, ids: jax.Array, neg_ids: jax.Array, rows: RowInputs,
                seed: jax.Array) -> jax.Array:
        size = (spec.height, spec.width)
        cond = pipe.encode_prompt(params, ids, size)
        uncond = pipe.encode_prompt(params, neg_ids, size, zero_text=spec.zero_negative) if spec.use_cfg else None
        noise = jax.vmap(lambda *r: row_noise(*r, shape))(rows.seed, rows.prompt_key, rows.keyed, rows.image)
        x = pipe.prepare_latents(params, spec, state, GenerationInputs(ids, neg_ids, rows.image, latents=noise), seed)
        x = pipe.denoise(params, spec, state, x, cond, uncond, rows.guidance, seed)
        return pipe.decode(params, x, spec.output_type)

    return program


_PROGRAMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # pipeline → {spec: compiled job program}


def _compile(pipe: StableDiffusionPipeline, spec: GenerationSpec, args: tuple) -> Any:
    """The job program for `spec`, compiled once per pipeline (a sweep of jobs on one pipeline reuses it)."""
    cache = _PROGRAMS.setdefault(pipe, {})
    if spec not in cache:
        rep, batch = sharding.replicated(pipe.mesh), sharding.batch_sharded(pipe.mesh)
        fn = jax.jit(job_program(pipe, spec), in_shardings=(rep, rep, batch, batch, batch, rep),
                     out_shardings=batch)
        cache[spec] = fn.lower(*args).compile()
    return cache[spec]


class _Feeder:
    """Builds one step's program arguments from this process's rows (padded to its share of the batch)."""

    def __init__(self, pipe: StableDiffusionPipeline, spec: GenerationSpec, seed: int, guidance: float,
                 negative: str | None, local_n: int, mesh: Any):
        self.pipe, self.spec, self.seed, self.guidance, self.negative = pipe, spec, seed, guidance, negative
        self.local_n, self.mesh = local_n, mesh
        self.state = pipe.scheduler_state(spec.num_inference_steps, pipe.latent_shape(spec))
        self.seed_array = sharding.global_array(np.uint32(seed), sharding.replicated(mesh))

    def guidance_of(self, p: prompts.Prompt) -> float:
        return self.guidance if p.guidance_scale is None else p.guidance_scale

    def inputs(self, chunk: Sequence[_Row]) -> tuple:
        n = self.local_n
        rows = list(chunk) or [_Row(0, prompts.Prompt(index=0, line=0, prompt=""), 0)]  # an idle process: padding
        rows += [rows[-1]] * (n - len(rows))
        texts = [r.prompt.prompt for r in rows]
        negatives = [r.prompt.negative_prompt if r.prompt.negative_prompt is not None else self.negative or ""
                     for r in rows]
        g = np.array([self.guidance_of(r.prompt) for r in rows], np.float32)
        local = RowInputs(
            seed=np.array([self.seed if r.prompt.seed is None else r.prompt.seed for r in rows], np.uint32),
            prompt_key=np.array([prompts.prompt_key(r.prompt) for r in rows], np.uint32),
            keyed=np.array([r.prompt.seed is None for r in rows]),
            image=np.array([r.image for r in rows], np.uint32),
            guidance=np.maximum(g, 1.0) if self.spec.use_cfg else g)
        put = lambda a: sharding.global_array_from_local(a, self.mesh)  # noqa: E731
        return (self.pipe.params, self.state, put(self.pipe.tokenize(texts)), put(self.pipe.tokenize(negatives)),
                RowInputs(*map(put, local)), self.seed_array)


def local_rows_of(x: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in row order (no communication)."""
    parts = {s.index[0].start or 0: s.data for s in x.addressable_shards}
    return np.concatenate([np.asarray(parts[k]) for k in sorted(parts)])


# ----------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------


class _ShardWriter:
    """Encodes images in a thread pool and writes each shard (in a second pool) once all its images are in."""

    def __init__(self, out: str, fmt: str, num_images: int, shard_size: int, num_workers: int | None,
                 max_pending: int, seed: int, negative: str | None):
        self.out, self.fmt, self.num_images, self.shard_size = out, fmt, num_images, shard_size
        self.seed, self.negative = seed, negative
        workers = num_workers or max(1, min(8, (os.cpu_count() or 2)))
        self.encoders = cf.ThreadPoolExecutor(workers, thread_name_prefix="perflow-png")
        self.writers = cf.ThreadPoolExecutor(1, thread_name_prefix="perflow-shard")
        self.slots = threading.BoundedSemaphore(max(1, max_pending))
        self.open: dict[int, list[cf.Future]] = {}
        self.written: list[cf.Future] = []

    def add(self, images: jax.Array, chunk: Sequence[_Row], record: dict[str, Any], guidance_of: Any) -> None:
        """Queue the real rows of one step's output (padding rows dropped)."""
        self._raise_failed()
        pixels = local_rows_of(images)[:len(chunk)]
        for row, image in zip(chunk, pixels, strict=True):
            self.slots.acquire()
            meta = _image_record(row, record, guidance_of(row.prompt), self.seed, self.negative)
            fut = self.encoders.submit(self._encode, row.number, image, meta)
            k = row.number // self.shard_size
            self.open.setdefault(k, []).append(fut)
            if len(self.open[k]) == len(shards.shard_range(k, self.num_images, self.shard_size)):
                self.written.append(self.writers.submit(self._write, k, self.open.pop(k)))

    def _encode(self, number: int, image: np.ndarray, meta: dict[str, Any]) -> shards.ShardImage:
        try:
            return shards.ShardImage(shards.image_key(number), shards.encode_png(image), meta)
        finally:
            self.slots.release()

    def _write(self, k: int, futures: list[cf.Future]) -> str:
        return shards.write_shard(self.out, k, self.fmt, [f.result() for f in futures])

    def _raise_failed(self) -> None:
        for f in self.written:
            if f.done() and f.exception() is not None:
                raise f.exception()

    def close(self) -> int:
        """Wait for every shard; returns how many were written (an incomplete shard would be a bug)."""
        if self.open:
            raise RuntimeError(f"shards {sorted(self.open)} did not receive all their images.")
        for f in self.written:
            f.result()
        return len(self.written)

    def shutdown(self) -> None:
        self.encoders.shutdown(wait=True, cancel_futures=True)
        self.writers.shutdown(wait=True, cancel_futures=True)


def _image_record(row: _Row, record: dict[str, Any], guidance: float, seed: int, negative: str | None
                  ) -> dict[str, Any]:
    """The per-image JSON: the image's prompt, negative prompt, noise (seed; prompt_key when folded in), guidance,
    and the job's sampling and model settings; nothing that depends on the layout."""
    p = row.prompt
    return {"image": row.number, "prompt_index": p.index, "image_index": row.image, "id": p.id, "prompt": p.prompt,
            "negative_prompt": p.negative_prompt if p.negative_prompt is not None else negative,
            "seed": seed if p.seed is None else p.seed, "prompt_key": prompts.prompt_key(p) if p.seed is None else None,
            "guidance_scale": guidance, **record}


# ----------------------------------------------------------------------------------------------------------
# Progress, collectives, manifest
# ----------------------------------------------------------------------------------------------------------


class _Progress:
    """Process 0's bar (images/s and ETA over the whole job) and optional JSON-lines log."""

    def __init__(self, show: bool, log_jsonl: str | None, total: int, per_process: Sequence[int], local_n: int):
        from tqdm.auto import tqdm

        self.total, self.per_process, self.local_n = total, list(per_process), local_n
        self.bar = tqdm(total=total, unit="img", desc="generate", disable=not show, smoothing=0.1)
        self.log = open(log_jsonl, "a", encoding="utf-8") if log_jsonl else None  # noqa: SIM115 - closed in close()
        self.t0, self.done = time.perf_counter(), 0

    def start(self) -> None:
        self.bar.reset(total=self.total)
        self.t0 = time.perf_counter()

    def update(self, step: int) -> None:
        # Every process runs the same steps; after step s, process p has run min(n_p, (s + 1)·local_n) images.
        done = sum(min(n, (step + 1) * self.local_n) for n in self.per_process)
        self.bar.update(done - self.done)
        self.done = done
        if self.log is not None:
            dt = time.perf_counter() - self.t0
            rate = done / dt if dt > 0 else 0.0
            self.log.write(json.dumps({"step": step, "images": done, "total": self.total, "seconds": round(dt, 3),
                                       "images_per_s": round(rate, 3),
                                       "eta_s": round((self.total - done) / rate, 1) if rate > 0 else None}) + "\n")
            self.log.flush()

    def close(self) -> None:
        self.bar.close()
        if self.log is not None:
            self.log.close()


def _allgather_int(x: int) -> list[int]:
    """`x` of every process (process order); no communication in one process."""
    if jax.process_count() == 1:
        return [int(x)]
    from jax.experimental import multihost_utils

    return [int(v) for v in np.asarray(multihost_utils.process_allgather(np.array([x], np.int64))).reshape(-1)]


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _write_manifest(out: str, settings: dict[str, Any], summary: prompts.PromptFileSummary, total_shards: int,
                    fmt: str, spec: GenerationSpec, ndev: int, nproc: int, images_run: int, compile_s: float,
                    run_s: float) -> dict[str, Any]:
    import flax

    complete = sum(shards.is_complete(out, k, fmt) for k in range(total_shards))
    manifest = {
        "counts": {"prompts": summary.num_prompts, "images": summary.num_images, "shards": total_shards,
                   "shards_complete": complete},
        "settings": settings,
        "layout": {"processes": nproc, "devices": ndev, "global_batch": spec.batch,
                   "per_device_batch": spec.batch // ndev, "platform": jax.devices()[0].platform},
        "versions": {"perflow_jax": __version__, "jax": jax.__version__, "flax": flax.__version__,
                     "numpy": np.__version__, "python": platform.python_version()},
        "throughput": {"images_this_run": images_run, "compile_seconds": round(compile_s, 3),
                       "run_seconds": round(run_s, 3),
                       "images_per_second": round(images_run / run_s, 3) if run_s > 0 else None},
    }
    write_json(os.path.join(out, MANIFEST_FILE), manifest)
    return manifest


__all__ = ["DEFAULT_SHARD_SIZE", "JOB_FILE", "MANIFEST_FILE", "JobResult", "RowInputs", "check_output",
           "check_settings", "job_program", "local_rows_of", "row_noise", "run"]
