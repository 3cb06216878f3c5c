"""End-to-end benchmark: perflow-jax (PeRFlow) against PyTorch diffusers, same machine, same weights.

One run measures, for a grid of step counts and batch sizes at one resolution:

1. images/s of ``perflow_jax.pipelines.StableDiffusionPipeline`` (PeRFlow) and of diffusers'
   ``StableDiffusionPipeline`` with DDIM (one UNet call per step, like PeRFlow), and their ratio;
2. overhead against the limit: pipeline time / (text encode + N x UNet forward + VAE decode), each timed alone
   through the pipeline's own public stages (``encode_prompt``, ``model_fn``, ``decode``), jitted;
   likewise the multi-view UNet on N = 1, 2, 4 views against N x the plain UNet on one view
   (``scripts/bench_multiview.py``);
3. compile time cold (fresh persistent-cache folder) and warm (same folder, a second process), and that a
   new prompt / seed / guidance scale does not recompile (``pipe.stats.num_compiled``);
4. scheduler-only cost per step (a jitted loop with a free denoiser) against one UNet forward;
5. peak memory per framework (RSS high-water mark of a separate process on CPU; device stats on GPU);
6. on GPU only: cuDNN vs XLA attention and fp16/bf16 at 512x512 against PyTorch fp16 SDPA;
7. Stable Video Diffusion on a tiny random SVD: the pipeline's overhead over its parts and frames/s of both
   frameworks (``scripts/benchmark_video.py``, unless ``--no-torch``).

Models: ``--preset sd15`` is the real SD1.5 architecture (the package's shipped configs,
``perflow_jax/models/configs/sd15``) with random weights, ``--preset tiny`` a small model for CPU smoke runs,
``--model DIR`` a diffusers folder with real weights. Presets are built with PyTorch diffusers, saved with
``save_pretrained`` (with a stand-in CLIP tokenizer of the config's vocabulary size) and that one folder is
loaded by both frameworks.

Timings are medians over ``--repeats`` rounds with ``block_until_ready`` (and CUDA synchronisation for
PyTorch). In a round both pipelines and every stage alone run once each, interleaved, so background load hits
them alike. Before timing, each call runs once (compile + warm-up) plus ``--warmup`` untimed rounds. CFG is on
(guidance != 1), so every step is one UNet call on 2 x batch. The report (Markdown + PNG chart + JSON) can
be re-rendered from the JSON with ``--from-json`` (``--notes FILE`` appends a hand-written section).

Usage (CPU, bounded):  python scripts/benchmark.py --preset sd15 --resolution 64 --steps 4 --batches 1 2
                       python scripts/benchmark.py --preset tiny --write-docs --docs-dir /tmp/docs
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "scripts", "configs")
PRESETS = ("sd15", "tiny")
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
PROMPT = "a red cat on the mat"  # short: the tiny preset's tokenizer is byte-level with 16 positions
PROBE_TAG = "BENCHMARK_PROBE "
OVERHEAD_GOAL = 1.05


# --------------------------------------------------------------------------------------------------------
# Building the benchmark model (random weights, shipped configs)
# --------------------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's reversible byte → printable-unicode symbols, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = [], 0
    for b in range(256):
        if b in printable:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def write_tokenizer(folder: str, vocab_size: int, max_length: int) -> None:
    """A stand-in CLIP BPE tokenizer with exactly `vocab_size` entries (bytes, word-final bytes, a few merges,
    filler tokens, then ``<|startoftext|>`` and ``<|endoftext|>`` as the two highest ids, as in CLIP)."""
    os.makedirs(folder, exist_ok=True)
    symbols = _bytes_to_unicode()
    merges = ["a t</w>", "t h", "th e</w>", "o n</w>", "r e", "a n", "an d</w>", "o f</w>", "i n</w>", "e r</w>"]
    vocab = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in merges]
    if len(vocab) + 2 > vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is too small for the {len(vocab) + 2}-entry stand-in tokenizer.")
    vocab += [f"<filler{i}>" for i in range(vocab_size - 2 - len(vocab))] + ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({tok: i for i, tok in enumerate(vocab)}, f)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"model_max_length": max_length, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                   "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "tokenizer_class": "CLIPTokenizer"},
                  f)


def _read_json(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def model_config(preset: str, component: str) -> dict[str, Any]:
    """`component`'s config: ``scripts/configs/<preset>/<component>.json`` if present (the tiny preset), else
    the real architecture shipped with the package (``perflow_jax/models/configs/<preset>/``, e.g. sd15)."""
    path = os.path.join(CONFIGS, preset, f"{component}.json")
    if os.path.isfile(path):
        return _read_json(path)
    from perflow_jax.models.single_file import family_config

    return family_config(preset, component)


def build_preset(preset: str, folder: str, seed: int = 0) -> str:
    """Build the diffusers pipeline of `preset` (:func:`model_config`, plus the scheduler and tokenizer settings
    in ``scripts/configs/<preset>``) with random weights and
    ``save_pretrained`` it to `folder` (reused if it already holds one). Returns `folder`."""
    if os.path.isfile(os.path.join(folder, "model_index.json")):
        return folder
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    cfg_dir = os.path.join(CONFIGS, preset)
    tok = _read_json(os.path.join(cfg_dir, "tokenizer_settings.json"))
    te_cfg = model_config(preset, "text_encoder")
    if tok["vocab_size"] != te_cfg["vocab_size"]:
        raise ValueError(f"{preset}: tokenizer vocab_size {tok['vocab_size']} != text encoder {te_cfg['vocab_size']}")
    tmp = tempfile.mkdtemp(prefix=".build-", dir=os.path.dirname(os.path.abspath(folder)) or ".")
    try:
        write_tokenizer(os.path.join(tmp, "_tok"), tok["vocab_size"], tok["model_max_length"])
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(model_config(preset, "unet")).eval()
        vae = AutoencoderKL.from_config(model_config(preset, "vae")).eval()
        text_encoder = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in te_cfg.items() if k != "architectures"}))
        scheduler = DDIMScheduler.from_config(_read_json(os.path.join(cfg_dir, "scheduler.json")))
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder.eval(),
                                       tokenizer=CLIPTokenizer.from_pretrained(os.path.join(tmp, "_tok")),
                                       unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        pipe.save_pretrained(tmp)
        # Keep the model's own scheduler class (PNDM for SD1.5) in the folder, as a real checkpoint has it.
        shutil.copy(os.path.join(cfg_dir, "scheduler.json"), os.path.join(tmp, "scheduler", "scheduler_config.json"))
        for name in ("vocab.json", "merges.txt"):  # recent transformers save only tokenizer.json; keep both
            shutil.copy(os.path.join(tmp, "_tok", name), os.path.join(tmp, "tokenizer", name))
        shutil.rmtree(os.path.join(tmp, "_tok"))
        if os.path.exists(folder):
            shutil.rmtree(folder)
        os.rename(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


# --------------------------------------------------------------------------------------------------------
# Timing and environment helpers
# --------------------------------------------------------------------------------------------------------


def measure(fn: Callable[[], Any], repeats: int, warmup: int, sync: Callable[[Any], Any]) -> dict[str, Any]:
    """Median wall time of ``sync(fn())`` over `repeats` runs after `warmup` runs (seconds)."""
    for _ in range(warmup):
        sync(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
    return {"median": statistics.median(times), "min": min(times), "times": times}


def _jax_sync(x: Any) -> Any:
    import jax

    return jax.block_until_ready(x)


def _torch_sync(x: Any) -> Any:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return x


def peak_rss_mib() -> float:
    """This process's resident-set high-water mark in MiB: ``VmHWM`` from /proc/self/status on Linux (reset at
    exec, unlike ``ru_maxrss``, which a child started by fork/vfork + exec inherits from its parent's size),
    else ``ru_maxrss``."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def _version(module: str) -> str:
    """`module`'s version, or "not installed" (the PyTorch side is optional with --no-torch --model)."""
    try:
        return importlib.metadata.version(module)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def required_modules(args: argparse.Namespace) -> list[str]:
    """What this run imports beyond perflow-jax's own dependencies: the PyTorch side (unless --no-torch), the
    libraries that build a random-weight preset (unless --model), matplotlib for the report's chart."""
    need = []
    if not args.no_torch or args.model is None:
        need += ["torch", "diffusers"]
    if args.out or args.write_docs:
        need.append("matplotlib")
    return [m for m in dict.fromkeys(need) if not _installed(m)]


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken or blocked install counts as missing
        return False


def environment(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    """Machine, versions, date and load, for the report."""
    import jax

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    dev = jax.devices()[0]
    return {
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python scripts/benchmark.py " + " ".join(argv),
        "machine": f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}",
        "jax_device": f"{dev.device_kind} ({jax.default_backend()}), {jax.device_count()} device(s)",
        "torch_device": None if args.no_torch else _torch_device(),
        "torch_threads": None if args.no_torch else _torch_threads(),
        "loadavg_start": list(os.getloadavg()),
        "versions": {"python": platform.python_version(),
                     **{m: _version(m) for m in ("jax", "jaxlib", "flax", "numpy", "torch", "diffusers",
                                                 "transformers")}},
    }


def _quiet() -> None:
    """No per-call truncation warnings or progress bars from diffusers / transformers."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    if _installed("diffusers"):
        import diffusers

        diffusers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.disable_progress_bar()


def _torch_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _jax_dtype(name: str) -> Any:
    import jax.numpy as jnp

    return getattr(jnp, DTYPES[name])


def _torch_dtype(name: str) -> Any:
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


# --------------------------------------------------------------------------------------------------------
# Pipelines
# --------------------------------------------------------------------------------------------------------


def load_jax_pipeline(folder: str, dtype: str, cache: str | None, **kwargs: Any) -> Any:
    """perflow-jax's pipeline (PeRFlow scheduler) on `folder`, with JAX's persistent compilation cache turned on
    at `cache` first (None: left off)."""
    from perflow_jax import enable_compilation_cache
    from perflow_jax.pipelines.stable_diffusion import StableDiffusionPipeline

    if cache:
        enable_compilation_cache(cache)
    return StableDiffusionPipeline.from_pretrained(folder, scheduler="perflow", dtype=_jax_dtype(dtype),
                                                   executable_cache=cache is not None, **kwargs)


def load_torch_pipeline(folder: str, dtype: str) -> Any:
    """diffusers' StableDiffusionPipeline on the same folder, with DDIM (one UNet call per step)."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, dtype=_torch_dtype(dtype), safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    torch.set_grad_enabled(False)
    return pipe.to(_torch_device())


def run_jax(pipe: Any, batch: int, steps: int, res: int, guidance: float, seed: int = 0,
            prompt: str = PROMPT) -> Any:
    return pipe([prompt] * batch, num_inference_steps=steps, guidance_scale=guidance, seed=seed, height=res,
                width=res)


def run_torch(pipe: Any, batch: int, steps: int, res: int, guidance: float) -> Any:
    import torch

    gen = torch.Generator(device="cpu").manual_seed(0)
    with torch.inference_mode():
        return pipe([PROMPT] * batch, num_inference_steps=steps, guidance_scale=guidance, height=res, width=res,
                    generator=gen, output_type="np").images


# --------------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------------


def _jax_components(jpipe: Any, batch: int, args: argparse.Namespace) -> dict[str, Callable[[], Any]]:
    """The pipeline's own public stages, each jitted alone (compiled and warmed by the first call): text
    encode (``encode_prompt``) of cond + uncond as one 2B batch, one UNet forward on 2B latents through the
    denoise stage's model function (``model_fn``), VAE decode (``decode``) of B latents."""
    import jax
    import jax.numpy as jnp

    p = jpipe.params
    n_ctx = 2 * batch if args.guidance != 1.0 else batch
    size = (args.resolution, args.resolution)
    lat = args.resolution // jpipe.vae_scale_factor
    key = jax.random.key(0)
    ids = jnp.asarray(jpipe.tokenize([PROMPT] * n_ctx))
    x = jax.random.normal(key, (n_ctx, jpipe.components.unet_config.in_channels, lat, lat), jnp.float32)
    z = jax.random.normal(key, (batch, jpipe.components.vae_config.latent_channels, lat, lat), jnp.float32)
    t = jnp.full((n_ctx,), 500, jnp.int32)
    encode = jax.jit(jpipe.encode_prompt, static_argnames="size")
    unet = jax.jit(lambda p, x, t, c: jpipe.model_fn(p)(x, t, c))
    decode = jax.jit(jpipe.decode, static_argnames="output_type")
    cond = jax.block_until_ready(encode(p, ids, size=size))
    return {"jax_text_encode": lambda: encode(p, ids, size=size),
            "jax_unet": lambda: unet(p, x, t, cond),
            "jax_vae_decode": lambda: decode(p, z, output_type="float")}


def _torch_components(tpipe: Any, batch: int, args: argparse.Namespace) -> dict[str, Callable[[], Any]]:
    """The same three stages in PyTorch (under ``torch.inference_mode``), for the kernel-speed comparison."""
    import torch

    dev, tdt = tpipe.device, tpipe.unet.dtype
    n_ctx = 2 * batch if args.guidance != 1.0 else batch
    lat = args.resolution // tpipe.vae_scale_factor
    ids = torch.ones((n_ctx, tpipe.tokenizer.model_max_length), dtype=torch.long, device=dev)
    x = torch.randn((n_ctx, 4, lat, lat), device=dev, dtype=tdt)
    z = torch.randn((batch, 4, lat, lat), device=dev, dtype=tdt)
    t = torch.full((n_ctx,), 500, device=dev)
    with torch.inference_mode():
        ctx = tpipe.text_encoder(ids)[0]

    def inference(fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            with torch.inference_mode():
                return fn()
        return run

    return {"torch_text_encode": inference(lambda: tpipe.text_encoder(ids)[0]),
            "torch_unet": inference(lambda: tpipe.unet(x, t, ctx).sample),
            "torch_vae_decode": inference(lambda: tpipe.vae.decode(z).sample)}


def bench_grid(jpipe: Any, tpipe: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Per (steps, batch): both pipelines and every stage alone, timed in interleaved rounds.

    Each round runs every measured call once, in a fixed order, so a change of background load hits all of
    them alike and the ratios stay fair. Every call runs once untimed first (JAX: compile + warm-up; the
    pipeline's compile time is recorded), then ``--warmup`` untimed rounds, then ``--repeats`` timed rounds.
    """
    rows, stages = [], {}
    for steps in args.steps:
        for batch in args.batches:
            calls: dict[str, tuple[Callable[[], Any], Callable[[Any], Any]]] = {
                "jax": (lambda b=batch, s=steps: run_jax(jpipe, b, s, args.resolution, args.guidance), _jax_sync)}
            if tpipe is not None:
                calls["torch"] = (lambda b=batch, s=steps: run_torch(tpipe, b, s, args.resolution, args.guidance),
                                  _torch_sync)
            if batch not in stages:
                stages[batch] = {k: (f, _jax_sync) for k, f in _jax_components(jpipe, batch, args).items()}
                if tpipe is not None:
                    torch_stages = _torch_components(tpipe, batch, args)
                    stages[batch].update({k: (f, _torch_sync) for k, f in torch_stages.items()})
            calls.update(stages[batch])
            row: dict[str, Any] = {"steps": steps, "batch": batch}
            for name, (fn, sync) in calls.items():
                t0 = time.perf_counter()
                sync(fn())
                if name == "jax":
                    row["jax_first_call_s"] = time.perf_counter() - t0
                    row["jax_compile_s"] = jpipe.stats.compile_seconds
            times: dict[str, list[float]] = {name: [] for name in calls}
            for r in range(args.warmup + args.repeats):
                for name, (fn, sync) in calls.items():
                    t0 = time.perf_counter()
                    sync(fn())
                    if r >= args.warmup:
                        times[name].append(time.perf_counter() - t0)
            for name, ts in times.items():
                row[f"{name}_s"] = statistics.median(ts)
                row[f"{name}_times"] = ts
            row["jax_ips"] = batch / row["jax_s"]
            if tpipe is not None:
                row["torch_ips"] = batch / row["torch_s"]
                row["ratio"] = row["jax_ips"] / row["torch_ips"]
            for side in ("jax", "torch") if tpipe is not None else ("jax",):
                limit = row[f"{side}_text_encode_s"] + steps * row[f"{side}_unet_s"] + row[f"{side}_vae_decode_s"]
                prefix = "" if side == "jax" else "torch_"
                row[f"{prefix}limit_s"], row[f"{prefix}overhead"] = limit, row[f"{side}_s"] / limit
            rows.append(row)
            print(f"[grid] steps={steps} batch={batch}: perflow-jax {row['jax_ips']:.4f} img/s"
                  + (f", diffusers {row['torch_ips']:.4f} img/s, ratio {row['ratio']:.3f}" if tpipe else "")
                  + f"; overhead {row['overhead']:.3f} (pipeline {row['jax_s']:.3f}s, limit {row['limit_s']:.3f}s)",
                  flush=True)
    return rows


def bench_controlnet(jpipe: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The ControlNet pipeline's overhead over its parts, each measured alone: text encode, then per step the UNet
    and a ControlNet (random init, conditioning embedding down to the latent size) on the CFG batch, then VAE decode.
    ``overhead = pipeline / (encode + steps · (UNet + ControlNet) + decode)``; goal ≤ 1.05. First steps value and
    batch size only; interleaved rounds as in :func:`bench_grid`."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from perflow_jax.models.controlnet import (
        ControlNetConfig,
        ControlNetModel,
        controlnet_apply,
        init_controlnet_params,
    )
    from perflow_jax.pipelines.controlnet import StableDiffusionControlNetPipeline

    steps, batch = args.steps[0], args.batches[0]
    levels = jpipe.vae_scale_factor.bit_length()  # conditioning embedding: one level per VAE halving, plus one
    config = ControlNetConfig.from_unet(jpipe.components.unet_config,
                                        conditioning_embedding_out_channels=(16, 32, 96, 256)[:levels])
    params = jax.tree_util.tree_map(np.asarray, init_controlnet_params(config, jax.random.key(1)))
    cpipe = StableDiffusionControlNetPipeline(jpipe.components, jpipe.scheduler, [(config, params)],
                                              dtype=jpipe.dtype, mesh=jpipe.mesh)
    image = np.random.default_rng(0).uniform(0, 1, (batch, args.resolution, args.resolution, 3)).astype(np.float32)
    n_ctx = 2 * batch if args.guidance > 1.0 else batch
    lat = args.resolution // jpipe.vae_scale_factor
    x = jax.random.normal(jax.random.key(0), (n_ctx, config.in_channels, lat, lat), jnp.float32)
    t = jnp.full((n_ctx,), 500, jnp.int32)
    hint = jnp.asarray(np.concatenate([image] * (n_ctx // batch)).transpose(0, 3, 1, 2))
    net = ControlNetModel(config, dtype=cpipe.dtype)
    cond = jax.block_until_ready(jax.jit(cpipe.encode_prompt, static_argnames="size")(
        cpipe.params, jnp.asarray(cpipe.tokenize([PROMPT] * n_ctx)), size=(args.resolution, args.resolution)))
    cnet = jax.jit(lambda p, x, t, c, h: controlnet_apply(net, p, x, t, c, h, 1.0))
    cparams = cpipe.params["controlnets"][0]
    comps = _jax_components(jpipe, batch, args)
    calls = {
        "pipeline": lambda: cpipe([PROMPT] * batch, image, num_inference_steps=steps, guidance_scale=args.guidance,
                                  height=args.resolution, width=args.resolution),
        "text_encode": comps["jax_text_encode"], "unet": comps["jax_unet"],
        "controlnet": lambda: cnet(cparams, x, t, cond, hint),
        "vae_decode": comps["jax_vae_decode"]}
    for fn in calls.values():
        _jax_sync(fn())
    times: dict[str, list[float]] = {name: [] for name in calls}
    for r in range(args.warmup + args.repeats):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            _jax_sync(fn())
            if r >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    row: dict[str, Any] = {"steps": steps, "batch": batch, **{f"{k}_s": statistics.median(v) for k, v in times.items()}}
    row["limit_s"] = row["text_encode_s"] + steps * (row["unet_s"] + row["controlnet_s"]) + row["vae_decode_s"]
    row["overhead"] = row["pipeline_s"] / row["limit_s"]
    print(f"[controlnet] steps={steps} batch={batch}: pipeline {row['pipeline_s']:.3f}s, limit {row['limit_s']:.3f}s, "
          f"overhead {row['overhead']:.3f} (goal ≤ {OVERHEAD_GOAL})", flush=True)
    return row


def _video_module() -> Any:
    """scripts/benchmark_video.py (the Stable Video Diffusion row), imported from beside this script."""
    import importlib

    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    return importlib.import_module("benchmark_video")


def bench_multiview(jpipe: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Multi-view UNet (the pipeline's UNet plus fresh camera layers, cross-view attention over N views) on the N
    views of one sample against N × the plain UNet on one view (``scripts/bench_multiview.py``), N = 1, 2, 4."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from bench_multiview import measure_views

    rows = measure_views(jpipe.components.unet_config, jpipe.components.unet_params, args.resolution, [1, 2, 4],
                         jpipe.dtype, args.repeats)
    for r in rows:
        print(f"[multiview] N={r['views']}: {r['views_per_s']:.2f} views/s, multi-view / (N x UNet) "
              f"{r['ratio_vs_n_unet']:.2f}", flush=True)
    return rows


def check_recompile(jpipe: Any, args: argparse.Namespace) -> dict[str, Any]:
    """New prompt, seed and guidance at an already compiled shape must reuse the compiled program."""
    steps, batch = args.steps[0], args.batches[0]
    run_jax(jpipe, batch, steps, args.resolution, args.guidance)
    before = jpipe.stats.num_compiled
    run_jax(jpipe, batch, steps, args.resolution, args.guidance + 2.5, seed=1234, prompt="a different prompt")
    return {"num_compiled_before": before, "num_compiled_after": jpipe.stats.num_compiled,
            "compile_seconds_on_new_inputs": jpipe.stats.compile_seconds,
            "recompiled": jpipe.stats.num_compiled != before}


def bench_scheduler(jpipe: Any, tpipe: Any, grid: list[dict[str, Any]], args: argparse.Namespace
                    ) -> list[dict[str, Any]]:
    """Scheduler + loop cost per step (jitted lax.scan with a free denoiser) against one UNet forward."""
    import jax
    import jax.numpy as jnp

    from perflow_jax import sampling

    sched = jpipe.scheduler
    lat = args.resolution // jpipe.vae_scale_factor
    rows = []
    for batch in args.batches:
        x = jax.random.normal(jax.random.key(0), (batch, 4, lat, lat), jnp.float32)
        loop = jax.jit(lambda st, x: sampling.sample(sched, st, lambda s, t, i: s, x))
        for steps in args.steps:
            state = jpipe.scheduler_state(steps, x.shape)
            per_step = measure(lambda st=state, x=x, f=loop: f(st, x), max(args.repeats, 5), 1,
                               _jax_sync)["median"] / steps
            unet_s = next(r["jax_unet_s"] for r in grid if r["batch"] == batch)
            row = {"batch": batch, "steps": steps, "jax_step_s": per_step, "unet_s": unet_s,
                   "jax_fraction": per_step / unet_s}
            if tpipe is not None:
                row["torch_ddim_step_s"] = _torch_scheduler_step(tpipe, batch, steps, lat, max(args.repeats, 5))
            rows.append(row)
    return rows


def bench_convs(jpipe: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One 3x3 conv per UNet level (its channels at its spatial size, batch 2B, NHWC) three ways: XLA's native
    convolution, our ``layers.Conv2D`` as the UNet runs it (im2col + one matmul on CPU where
    ``layers.uses_im2col_on_cpu``, the native conv otherwise), and PyTorch's conv2d.

    Shows whether a UNet-stage gap between the frameworks comes from convolution kernels at the spatial sizes
    of this run."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from perflow_jax.models.layers import Conv2D

    def native_conv(x: jax.Array, w: jax.Array) -> jax.Array:
        return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))

    rows, n = [], 2 * args.batches[0] if args.guidance != 1.0 else args.batches[0]
    size = args.resolution // jpipe.vae_scale_factor
    rng = np.random.default_rng(0)
    for level, ch in enumerate(jpipe.components.unet_config.block_out_channels):
        hw = max(1, size // 2**level)
        x = rng.standard_normal((n, hw, hw, ch), np.float32)
        w = (rng.standard_normal((3, 3, ch, ch)) * 0.01).astype(np.float32)
        xj, wj = jnp.asarray(x), jnp.asarray(w)
        conv = Conv2D(ch, (3, 3), padding=((1, 1), (1, 1)), use_bias=False)
        ours = jax.jit(lambda a, b, c=conv: c.apply({"params": {"kernel": b}}, a))
        row = {"level": level, "spatial": hw, "channels": ch, "batch": n}
        for name, fn in (("xla_native", jax.jit(native_conv)), ("ours", ours)):
            row[f"{name}_s"] = measure(lambda f=fn, a=xj, b=wj: f(a, b), max(args.repeats, 3), 1, _jax_sync)["median"]
        xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().to(_torch_device())
        wt = torch.from_numpy(w).permute(3, 2, 0, 1).contiguous().to(_torch_device())
        with torch.inference_mode():
            row["torch_s"] = measure(lambda a=xt, b=wt: torch.nn.functional.conv2d(a, b, padding=1),
                                     max(args.repeats, 3), 1, _torch_sync)["median"]
        rows.append(row)
        print(f"[conv] level {level} {hw}x{hw}x{ch}: " + ", ".join(f"{k}={v * 1e3:.1f}ms" for k, v in row.items()
                                                                    if k.endswith("_s")), flush=True)
    return rows


def _torch_scheduler_step(tpipe: Any, batch: int, steps: int, lat: int, repeats: int) -> float:
    import torch
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(tpipe.scheduler.config)
    sched.set_timesteps(steps)
    x = torch.randn((batch, 4, lat, lat), device=tpipe.device)

    def loop() -> Any:
        y = x
        for t in sched.timesteps:
            y = sched.step(y, t, y).prev_sample
        return y

    return measure(loop, repeats, 1, _torch_sync)["median"] / steps


# --------------------------------------------------------------------------------------------------------
# Separate processes: compile cold/warm and peak memory per framework
# --------------------------------------------------------------------------------------------------------


def run_probe(kind: str, folder: str, args: argparse.Namespace, cache_dir: str | None = None) -> dict[str, Any]:
    """Run this script in a fresh process for one generation at the first grid point; returns its report."""
    cmd = [sys.executable, os.path.abspath(__file__), "--probe", kind, "--model", folder, "--dtype", args.dtype,
           "--steps", str(args.steps[0]), "--batches", str(args.batches[0]), "--resolution", str(args.resolution),
           "--guidance", str(args.guidance)]
    if cache_dir:
        cmd += ["--cache-dir", cache_dir]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(PROBE_TAG)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"probe {kind} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    out = json.loads(lines[-1][len(PROBE_TAG):])
    out["process_wall_s"] = wall
    print(f"[probe {kind}{' ' + os.path.basename(cache_dir) if cache_dir else ''}] "
          + ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in out.items()), flush=True)
    return out


class CompileLog(logging.Handler):
    """Per-program compile times of one process, from JAX's own compile log (``jax_log_compiles``): tracing,
    lowering to MLIR, and XLA compilation (or loading from the persistent cache, counted as ``cache_hit``)."""

    _PATTERNS = (("trace", re.compile(r"Finished tracing (?:\+ transforming )?(\S+) for \w+ in ([\d.]+) sec")),
                 ("lower", re.compile(r"Finished jaxpr to MLIR module conversion (\S+) in ([\d.]+) sec")),
                 ("compile", re.compile(r"Finished XLA compilation of (\S+) in ([\d.]+) sec")),
                 ("cache_hit", re.compile(r"Persistent compilation cache hit for '([^']+)'()")))

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.programs: dict[str, dict[str, float]] = {}

    def __enter__(self) -> CompileLog:
        import jax

        jax.config.update("jax_log_compiles", True)
        logging.getLogger("jax").addHandler(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        import jax

        logging.getLogger("jax").removeHandler(self)
        jax.config.update("jax_log_compiles", False)

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        for what, pattern in self._PATTERNS:
            m = pattern.search(msg)
            if m:
                name = re.sub(r"^jit[(_]|\)$", "", m.group(1))
                entry = self.programs.setdefault(name, {"trace": 0.0, "lower": 0.0, "compile": 0.0, "cache_hit": 0})
                entry[what] += float(m.group(2)) if m.group(2) else 1
                return

    def table(self) -> list[dict[str, Any]]:
        """Programs by total time (trace + lower + compile), each with its share of the sum."""
        rows = [{"program": k, **v, "total": v["trace"] + v["lower"] + v["compile"]} for k, v in self.programs.items()]
        total = sum(r["total"] for r in rows) or 1.0
        for r in rows:
            r["share"] = r["total"] / total
        return sorted(rows, key=lambda r: -r["total"])


def probe_main(args: argparse.Namespace) -> int:
    """Body of a probe process: load (until the params are on the device, ready), generate once, report
    timings, the programs the first image compiled, and peak memory."""
    t0 = time.perf_counter()
    if args.probe == "torch":
        _quiet()
    steps, batch = args.steps[0], args.batches[0]
    report: dict[str, Any] = {}
    if args.probe == "jax":
        import jax

        report["import_s"] = time.perf_counter() - t0
        with CompileLog() as log:
            t1 = time.perf_counter()
            pipe = load_jax_pipeline(args.model, args.dtype, args.cache_dir)
            jax.block_until_ready(pipe.params)
            report["load_s"] = time.perf_counter() - t1
            report["rss_after_load_mib"] = peak_rss_mib()
            t1 = time.perf_counter()
            run_jax(pipe, batch, steps, args.resolution, args.guidance)
            report["first_call_s"] = time.perf_counter() - t1
        report["compile_s"] = pipe.stats.compile_seconds
        report["programs"] = log.table()
        report["peak_rss_mib"] = peak_rss_mib()
        stats = jax.devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            report["device_peak_mib"] = stats["peak_bytes_in_use"] / 2**20
    else:
        import torch

        report["import_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        pipe = load_torch_pipeline(args.model, args.dtype)
        report["load_s"] = time.perf_counter() - t1
        report["rss_after_load_mib"] = peak_rss_mib()
        t1 = time.perf_counter()
        run_torch(pipe, batch, steps, args.resolution, args.guidance)
        report["first_call_s"] = time.perf_counter() - t1
        report["peak_rss_mib"] = peak_rss_mib()
        if torch.cuda.is_available():
            report["device_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    report["time_to_first_image_s"] = time.perf_counter() - t0
    print(PROBE_TAG + json.dumps(report), flush=True)
    return 0


STARTUP_GOALS = {"cold": 1.5, "warm": 1.2, "load": 1.5}  # perflow-jax / diffusers, at most


def run_startup(folder: str, work: str, args: argparse.Namespace) -> dict[str, Any]:
    """Time to first image and load alone, each in fresh processes (imports count): perflow-jax with an empty
    compilation-cache folder (cold), then again with the same folder (warm), and diffusers twice (it has no
    compile cache; each of its runs is paired with one of ours). Probes alternate so background load hits both."""
    shutil.rmtree(os.path.join(work, "startup"), ignore_errors=True)  # its param-shapes folder goes too
    cache = os.path.join(work, "startup", "compilation-cache")
    cold = run_probe("jax", folder, args, cache)
    torch_1 = run_probe("torch", folder, args) if not args.no_torch else None
    warm = run_probe("jax", folder, args, cache)
    torch_2 = run_probe("torch", folder, args) if not args.no_torch else None
    out: dict[str, Any] = {"cold": cold, "warm": warm, "torch": [t for t in (torch_1, torch_2) if t]}
    if torch_1 and torch_2:
        rows = [("cold", "time to first image, cold compile cache", cold["process_wall_s"], torch_1["process_wall_s"]),
                ("warm", "time to first image, warm compile cache", warm["process_wall_s"], torch_2["process_wall_s"]),
                ("load", "weight loading (params on the device, ready)", warm["load_s"], torch_2["load_s"])]
        out["rows"] = [{"key": k, "what": w, "jax_s": j, "torch_s": t, "ratio": j / t, "goal": STARTUP_GOALS[k]}
                       for k, w, j, t in rows]
    return out


def startup_lines(st: dict[str, Any]) -> list[str]:
    """The startup section of the report: the table against diffusers and where perflow-jax's time goes."""
    cold, warm = st["cold"], st["warm"]
    lines = ["Fresh processes (interpreter start and imports count); time to first image is the process's wall "
             "time; load ends when the params are on the device and ready (`block_until_ready`). diffusers has no "
             "compile cache: its two runs are paired with the cold and the warm run.", ""]
    if "rows" in st:
        lines += ["| | perflow-jax s | diffusers s | **ratio** | goal |", "|---|---:|---:|---:|---:|"]
        for r in st["rows"]:
            lines.append(f"| {r['what']} | {r['jax_s']:.2f} | {r['torch_s']:.2f} | **{r['ratio']:.2f}** | "
                         f"≤ {r['goal']} |")
        lines.append("")
    lines += ["| perflow-jax | imports s | load s | compile s | first call s (compile + run) | process wall s |",
              "|---|---:|---:|---:|---:|---:|"]
    for name, p in (("cold", cold), ("warm", warm)):
        lines.append(f"| {name} | {_f(p['import_s'], 2)} | {_f(p['load_s'], 2)} | {_f(p['compile_s'], 2)} | "
                     f"{_f(p['first_call_s'], 2)} | {_f(p['process_wall_s'], 2)} |")
    for i, t in enumerate(st.get("torch", []), 1):
        lines.append(f"| diffusers run {i} | {_f(t['import_s'], 2)} | {_f(t['load_s'], 2)} | – | "
                     f"{_f(t['first_call_s'], 2)} | {_f(t['process_wall_s'], 2)} |")
    for name, p in (("cold", cold), ("warm", warm)):
        progs = p.get("programs") or []
        lines += ["", f"Programs compiled for the first image ({name}; trace / lower to MLIR / XLA compile or "
                  "cache load, seconds):", "", "| program | trace | lower | compile | cache hit | share |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in progs[:8]:
            lines.append(f"| `{r['program']}` | {r['trace']:.2f} | {r['lower']:.2f} | {r['compile']:.2f} | "
                         f"{'yes' if r['cache_hit'] else 'no'} | {r['share']:.0%} |")
        if len(progs) > 8:
            rest = progs[8:]
            lines.append(f"| {len(rest)} others | {sum(r['trace'] for r in rest):.2f} | "
                         f"{sum(r['lower'] for r in rest):.2f} | {sum(r['compile'] for r in rest):.2f} | | "
                         f"{sum(r['share'] for r in rest):.0%} |")
    return lines + [""]


# --------------------------------------------------------------------------------------------------------
# GPU section (cuDNN vs XLA attention, fp16/bf16 at 512x512, against PyTorch fp16 SDPA)
# --------------------------------------------------------------------------------------------------------


def bench_gpu(jpipe: Any, folder: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Half-precision 512x512 images/s for each (dtype, attention) of perflow-jax and PyTorch fp16 (SDPA)."""
    import jax
    import torch

    from perflow_jax.pipelines.stable_diffusion import StableDiffusionPipeline

    res, steps, batch = 512, args.steps[0], args.batches[-1]
    rows = []
    for dtype in ("bf16", "fp16"):
        for impl in ("cudnn", "xla"):
            pipe = StableDiffusionPipeline(jpipe.components, jpipe.scheduler, dtype=_jax_dtype(dtype),
                                           attention_implementation=impl)
            try:
                r = measure(lambda p=pipe: run_jax(p, batch, steps, res, args.guidance), args.repeats, args.warmup,
                            _jax_sync)
                stats = jax.devices()[0].memory_stats() or {}
                rows.append({"framework": "perflow-jax", "dtype": dtype, "attention": impl, "batch": batch,
                             "steps": steps, "s": r["median"], "ips": batch / r["median"],
                             "peak_mib": stats.get("peak_bytes_in_use", 0) / 2**20})
            except Exception as e:  # noqa: BLE001 - e.g. cuDNN attention unsupported on this GPU/dtype
                rows.append({"framework": "perflow-jax", "dtype": dtype, "attention": impl, "error": str(e)[:200]})
            del pipe
    tpipe = load_torch_pipeline(folder, "fp16")  # diffusers' default attention processor: PyTorch SDPA
    torch.cuda.reset_peak_memory_stats()
    r = measure(lambda: run_torch(tpipe, batch, steps, res, args.guidance), args.repeats, args.warmup, _torch_sync)
    rows.append({"framework": "diffusers", "dtype": "fp16", "attention": "SDPA", "batch": batch, "steps": steps,
                 "s": r["median"], "ips": batch / r["median"], "peak_mib": torch.cuda.max_memory_allocated() / 2**20})
    return rows


# --------------------------------------------------------------------------------------------------------
# Report: JSON, Markdown, chart
# --------------------------------------------------------------------------------------------------------


def _f(v: float | None, nd: int = 3) -> str:
    return "–" if v is None else f"{v:.{nd}f}"


def render_markdown(res: dict[str, Any], chart_name: str | None) -> str:
    env, a = res["environment"], res["settings"]
    lines = [
        "# Benchmarks: perflow-jax vs PyTorch diffusers",
        "",
        "Generated by `scripts/benchmark.py` (`perflow-jax bench`); rerun it to regenerate this page.",
        "",
        "## Setup",
        "",
        f"- Date: {env['date_utc']}; command: `{env['command']}`",
        f"- Machine: {env['machine']}; JAX device: {env['jax_device']}; "
        + (f"PyTorch device: {env['torch_device']} ({env['torch_threads']} intra-op threads)"
           if env.get("torch_device") else "PyTorch side skipped (--no-torch)"),
        f"- Load average (1/5/15 min) at start: {', '.join(f'{x:.2f}' for x in env['loadavg_start'])}; at end: "
        f"{', '.join(f'{x:.2f}' for x in res['loadavg_end'])}",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
        f"- Model: {a['model_desc']}",
        f"- Shapes: {a['resolution']}x{a['resolution']} images ({a['latent']}x{a['latent']} latents), steps "
        f"{a['steps']}, batch {a['batches']}, guidance {a['guidance']} (CFG on: each step is one UNet call on "
        f"2 x batch), dtype {a['dtype']}",
        "- perflow-jax: PeRFlow scheduler, one jitted program per shape (text encode → lax.scan over steps → VAE "
        "decode). diffusers: `StableDiffusionPipeline` with `DDIMScheduler` (one UNet call per step), "
        "`output_type=\"np\"`.",
        f"- Timing: median of {a['repeats']} interleaved rounds (each round runs both pipelines and every stage "
        f"once), after a first compile + warm-up call and {a['warmup']} more untimed round(s); "
        "`block_until_ready` / CUDA sync; images/s = batch / median seconds per call (tokenisation and host "
        "transfer included on both sides).",
        "",
        "Ratios are taken within one run on one machine with the same weights, and interleaving exposes both sides "
        "to the same background load; absolute numbers move with the load. The frameworks do not slow down alike "
        "on oversubscribed cores, though (PyTorch's OpenMP pool degrades much more than XLA's), so trust runs "
        "whose load average stayed below the core count.",
        "",
    ]
    if chart_name:
        lines += [f"![images/s and time breakdown]({chart_name})", ""]
    lines += ["## 1. End-to-end images/s", "",
              "| steps | batch | perflow-jax img/s | diffusers img/s | ratio (jax / torch) | perflow-jax s/call "
              "| diffusers s/call |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["grid"]:
        lines.append(f"| {r['steps']} | {r['batch']} | {_f(r['jax_ips'])} | {_f(r.get('torch_ips'))} | "
                     f"**{_f(r.get('ratio'), 2)}** | {_f(r['jax_s'])} | {_f(r.get('torch_s'))} |")
    lines += ["", "## 2. Overhead against the limit", "",
              "Limit = text encode (cond + uncond, one 2B batch) + N x UNet forward (2B) + VAE decode (B), each "
              "the pipeline's own stage (`encode_prompt`, `model_fn`, `decode`) jitted and timed alone with the "
              f"pipeline's params. Goal: overhead ≤ {OVERHEAD_GOAL}.", "",
              "| steps | batch | pipeline s | text encode s | N x UNet s | VAE decode s | limit s | overhead |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["grid"]:
        mark = "" if r["overhead"] <= OVERHEAD_GOAL else " ⚠"
        lines.append(f"| {r['steps']} | {r['batch']} | {_f(r['jax_s'])} | {_f(r['jax_text_encode_s'])} | "
                     f"{_f(r['steps'] * r['jax_unet_s'])} | {_f(r['jax_vae_decode_s'])} | {_f(r['limit_s'])} | "
                     f"**{_f(r['overhead'], 3)}**{mark} |")
    c = res.get("controlnet")
    if c:
        mark = "" if c["overhead"] <= OVERHEAD_GOAL else " ⚠"
        lines += ["", "ControlNet text-to-image (one net, random weights) against its parts alone: limit = text encode "
                  "+ N x (UNet + ControlNet, each on the CFG batch) + VAE decode.", "",
                  "| steps | batch | pipeline s | text encode s | N x UNet s | N x ControlNet s | VAE decode s | "
                  "limit s | overhead |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
                  f"| {c['steps']} | {c['batch']} | {_f(c['pipeline_s'])} | {_f(c['text_encode_s'])} | "
                  f"{_f(c['steps'] * c['unet_s'])} | {_f(c['steps'] * c['controlnet_s'])} | {_f(c['vae_decode_s'])} | "
                  f"{_f(c['limit_s'])} | **{_f(c['overhead'], 3)}**{mark} |"]
    if res.get("video"):
        lines += _video_module().markdown(res["video"], OVERHEAD_GOAL)


    if res.get("multiview"):
        lines += ["", "Multi-view UNet (the UNet plus camera layers, self-attention over the N views of one sample) "
                  "against N x the plain UNet on one view (`scripts/bench_multiview.py`):", "",
                  "| N | multi-view s | views/s | UNet, 1 view s | multi-view / (N x UNet) |",
                  "|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['views']} | {_f(r['multiview_s'], 4)} | {_f(r['views_per_s'], 2)} | "
                  f"{_f(r['unet_1view_s'], 4)} | {_f(r['ratio_vs_n_unet'], 2)} |" for r in res["multiview"]]
    lines += ["", "Stages alone, perflow-jax (XLA) vs PyTorch, seconds (same rounds), and the same sum for diffusers "
              "(its pipeline time / its own limit):", "",
              "| steps | batch | text encode jax | text encode torch | UNet jax | UNet torch | VAE decode jax | "
              "VAE decode torch | diffusers pipeline / limit |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["grid"]:
        lines.append(f"| {r['steps']} | {r['batch']} | {_f(r['jax_text_encode_s'], 4)} | "
                     f"{_f(r.get('torch_text_encode_s'), 4)} | {_f(r['jax_unet_s'], 4)} | "
                     f"{_f(r.get('torch_unet_s'), 4)} | {_f(r['jax_vae_decode_s'], 4)} | "
                     f"{_f(r.get('torch_vae_decode_s'), 4)} | {_f(r.get('torch_overhead'))} |")
    convs = res.get("convs")
    if convs:
        lines += ["", "One 3x3 convolution per UNet level (the level's channels at its spatial size in this run, batch "
                  "2B), ms: XLA's native convolution, `layers.Conv2D` as the UNet runs it (on CPU im2col + one matmul "
                  "for maps of ≤ 4 positions, or ≤ 64 positions with ≥ 512 channels; the native conv otherwise), "
                  "and PyTorch's `conv2d`:", "",
                  "| level | spatial | channels | XLA native conv | perflow-jax Conv2D | PyTorch conv2d |",
                  "|---:|---:|---:|---:|---:|---:|"]
        for c in convs:
            lines.append(f"| {c['level']} | {c['spatial']}x{c['spatial']} | {c['channels']} | "
                         f"{c['xla_native_s'] * 1e3:.1f} | {c['ours_s'] * 1e3:.1f} | {c['torch_s'] * 1e3:.1f} |")
    lines += ["", "## 3. Compile time", ""]
    if "startup" in res:
        lines += ["### Startup against diffusers", ""] + startup_lines(res["startup"])
    comp = res.get("compile")
    if comp:
        cold, warm = comp["cold"], comp["warm"]
        lines += [f"One generation at steps {a['steps'][0]}, batch {a['batches'][0]} in a fresh process; cold = "
                  "empty persistent compilation-cache folder, warm = the same folder in a second process.", "",
                  "| | compile s | first call s | load s | time to first image s (in-process) | process wall s |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, p in (("cold", cold), ("warm", warm)):
            lines.append(f"| {name} | {_f(p['compile_s'], 2)} | {_f(p['first_call_s'], 2)} | {_f(p['load_s'], 2)} | "
                         f"{_f(p['time_to_first_image_s'], 2)} | {_f(p['process_wall_s'], 2)} |")
        if "torch" in res.get("memory", {}):
            t = res["memory"]["torch"]
            lines.append(f"| diffusers (no compile) | – | {_f(t['first_call_s'], 2)} | {_f(t['load_s'], 2)} | "
                         f"{_f(t['time_to_first_image_s'], 2)} | {_f(t['process_wall_s'], 2)} |")
        lines.append("")
    else:
        lines += ["Not measured in this run (`--no-probes`).", ""]
    rc = res["recompile_check"]
    lines += [f"Recompile check (new prompt, seed {1234} and guidance {a['guidance'] + 2.5} at an already compiled "
              f"shape): compiled programs {rc['num_compiled_before']} → {rc['num_compiled_after']}, "
              f"**{'RECOMPILED' if rc['recompiled'] else 'no recompile'}** (lookup "
              f"{rc['compile_seconds_on_new_inputs'] * 1e3:.2f} ms).", "",
              "First call of each grid shape in the benchmark process (compile included; persistent compilation "
              f"cache: {a['cache_note']}):",
              "", "| steps | batch | first call s | of which compile s |", "|---:|---:|---:|---:|"]
    for r in res["grid"]:
        lines.append(f"| {r['steps']} | {r['batch']} | {_f(r['jax_first_call_s'], 2)} | {_f(r['jax_compile_s'], 2)} |")
    lines += ["", "## 4. Scheduler cost per step", "",
              "A jitted `sampling.sample` loop whose denoiser returns its input: the PeRFlow step plus the scan "
              "overhead, per step, against one UNet forward (2B). diffusers' `DDIMScheduler.step` (eager) for "
              "reference.", "",
              "| batch | steps | PeRFlow step (jax) ms | UNet forward ms | step / UNet | DDIM step (torch) ms |",
              "|---:|---:|---:|---:|---:|---:|"]
    for r in res["scheduler"]:
        tms = r.get("torch_ddim_step_s")
        lines.append(f"| {r['batch']} | {r['steps']} | {r['jax_step_s'] * 1e3:.4f} | {r['unet_s'] * 1e3:.2f} | "
                     f"{r['jax_fraction']:.2e} | {'–' if tms is None else f'{tms * 1e3:.4f}'} |")
    lines += ["", "## 5. Peak memory", ""]
    mem = res.get("memory")
    if mem:
        lines += [f"Separate processes, one generation at steps {a['steps'][0]}, batch {a['batches'][0]}. CPU: "
                  "resident-set high-water mark (`VmHWM`; includes the loaded weights and, for perflow-jax, the "
                  "PyTorch→Flax conversion; diffusers memory-maps the safetensors files, so its weights count only "
                  "once touched); GPU: device peak bytes.", "",
                  "| framework | RSS after load MiB | peak RSS MiB | device peak MiB |", "|---|---:|---:|---:|"]
        for name, key in (("perflow-jax (cold process)", "jax"), ("diffusers", "torch")):
            if key in mem:
                m = mem[key]
                lines.append(f"| {name} | {m['rss_after_load_mib']:.0f} | {m['peak_rss_mib']:.0f} | "
                             f"{_f(m.get('device_peak_mib'), 0)} |")
        lines.append("")
    else:
        lines += ["Not measured in this run (`--no-probes`).", ""]
    lines += ["## 6. GPU: attention implementation and half precision at 512x512", ""]
    gpu = res.get("gpu")
    if gpu:
        lines += ["| framework | dtype | attention | batch | steps | img/s | peak MiB |",
                  "|---|---|---|---:|---:|---:|---:|"]
        for r in gpu:
            if "error" in r:
                lines.append(f"| {r['framework']} | {r['dtype']} | {r['attention']} | failed: {r['error']} | | | |")
            else:
                lines.append(f"| {r['framework']} | {r['dtype']} | {r['attention']} | {r['batch']} | {r['steps']} | "
                             f"{r['ips']:.3f} | {r['peak_mib']:.0f} |")
        lines += ["", "perflow-jax peak is the device's cumulative peak since process start."]
    else:
        lines += ["**Not run**: no GPU in this run. On a GPU the script runs this section automatically: perflow-jax "
                  "bf16 and fp16 with `attention_implementation='cudnn'` and `'xla'` against diffusers fp16 "
                  "(PyTorch SDPA), 512x512, the first step count and the largest batch of the grid."]
    notes = res.get("notes")
    if notes:
        lines += ["", "## Notes", "", notes.strip()]
    return "\n".join(lines) + "\n"


def render_startup_markdown(res: dict[str, Any]) -> str:
    """The report of a ``--startup`` run."""
    env, a = res["environment"], res["settings"]
    lines = ["# Startup: perflow-jax vs PyTorch diffusers", "",
             "Generated by `scripts/benchmark.py --startup`; rerun it to regenerate this page.", "",
             f"- Date: {env['date_utc']}; command: `{env['command']}`",
             f"- Machine: {env['machine']}; JAX device: {env['jax_device']}; load average at the end: "
             f"{', '.join(f'{x:.1f}' for x in res.get('loadavg_end', []))}",
             f"- Model: {a['model_desc']}; {a['resolution']}x{a['resolution']}, {a['steps'][0]} steps, batch "
             f"{a['batches'][0]}, guidance {a['guidance']}, {a['dtype']}", ""]
    return "\n".join(lines + startup_lines(res["startup"]))


def render_chart(res: dict[str, Any], path: str) -> None:
    """Images/s of both frameworks per grid point, and pipeline time against its limit broken down."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    e2e = ov = res["grid"]
    labels = [f"{r['steps']} steps\nbatch {r['batch']}" for r in e2e]
    xs = np.arange(len(e2e))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(8, 2.4 * len(e2e) + 4), 4.2))
    w = 0.38
    ax1.bar(xs - w / 2, [r["jax_ips"] for r in e2e], w, label="perflow-jax (PeRFlow)", color="tab:blue")
    if all("torch_ips" in r for r in e2e):
        ax1.bar(xs + w / 2, [r["torch_ips"] for r in e2e], w, label="diffusers (DDIM)", color="tab:orange")
        for x, r in zip(xs, e2e, strict=True):
            ax1.text(x, max(r["jax_ips"], r["torch_ips"]) * 1.02, f"×{r['ratio']:.2f}", ha="center", fontsize=8)
    ax1.set_xticks(xs, labels, fontsize=8)
    ax1.set_ylabel("images / s")
    ax1.set_title("End-to-end throughput", fontsize=10)
    ax1.legend(fontsize=8)
    bottom = np.zeros(len(ov))
    for key, name, color in (("jax_text_encode_s", "text encode", "tab:green"), ("jax_unet_s", "N × UNet", "tab:blue"),
                             ("jax_vae_decode_s", "VAE decode", "tab:purple")):
        vals = np.array([r[key] * (r["steps"] if key == "jax_unet_s" else 1) for r in ov])
        ax2.bar(xs - w / 2, vals, w, bottom=bottom, label=name, color=color)
        bottom += vals
    ax2.bar(xs + w / 2, [r["jax_s"] for r in ov], w, label="pipeline (measured)", color="tab:gray")
    for x, r in zip(xs, ov, strict=True):
        ax2.text(x, max(r["jax_s"], r["limit_s"]) * 1.02, f"{r['overhead']:.3f}", ha="center", fontsize=8)
    ax2.set_xticks(xs, labels, fontsize=8)
    ax2.set_ylabel("seconds per call")
    ax2.set_title("perflow-jax: pipeline vs limit (overhead above bars)", fontsize=10)
    ax2.legend(fontsize=7)
    a = res["settings"]
    fig.suptitle(f"{a.get('model_short', '')} {a['resolution']}×{a['resolution']} images, {a['dtype']}, "
                 f"{res['environment']['jax_device']}, {res['environment']['date_utc']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


# --------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="perflow-jax bench", description=__doc__.splitlines()[0])
    m = p.add_mutually_exclusive_group()
    m.add_argument("--preset", choices=PRESETS, default="sd15",
                   help="random-weight model (default sd15: the real SD1.5 shapes shipped with the package)")
    m.add_argument("--model", default=None, help="a diffusers SD1.x/2.x folder (real weights) instead of a preset")
    p.add_argument("--model-cache", default=None,
                   help="folder to build the preset model in and reuse on later runs (default: a temp folder)")
    p.add_argument("--steps", type=int, nargs="+", default=[4, 8], help="step counts (default 4 8)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8], help="batch sizes (default 1 4 8)")
    p.add_argument("--resolution", type=int, default=None, help="image height = width (default: 512 for sd15 and "
                   "--model, 32 for tiny); on CPU use 64 or 128 for sd15")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed rounds after each call's first (compile + warm-up) run (default 1)")
    p.add_argument("--guidance", type=float, default=4.5, help="CFG scale (≠ 1: batched CFG on both sides)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the main comparison")
    p.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--cache-dir", default=None,
                   help="persistent compilation cache of the benchmark process (default: a fresh temp folder); "
                        "the cold/warm probes always use their own fresh folder")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch diffusers side")
    p.add_argument("--no-probes", action="store_true", help="skip the cold/warm compile and memory processes")
    p.add_argument("--startup", action="store_true",
                   help="measure only startup (time to first image cold and warm, load alone, against diffusers) "
                        "in fresh processes at the first grid point, and report that")
    p.add_argument("--out", default=None, help="write the report (NAME.json, NAME.md, NAME.png) here")
    p.add_argument("--write-docs", action="store_true", help="also write the report to --docs-dir")
    p.add_argument("--docs-dir", default=os.path.join(ROOT, "docs", "benchmarks"),
                   help="where --write-docs writes (default docs/benchmarks/)")
    p.add_argument("--name", default="benchmarks", help="report file name without extension (default benchmarks)")
    p.add_argument("--notes", default=None, help="a Markdown file appended to the report as 'Notes'")
    p.add_argument("--from-json", default=None, help="re-render the report from a saved benchmark.json; no runs")
    p.add_argument("--probe", choices=("jax", "torch"), default=None, help=argparse.SUPPRESS)
    return p


def write_report(res: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """Write ``NAME.json`` (re-renderable with ``--from-json``), ``NAME.md`` and the ``NAME.png`` chart (not for
    a ``--startup`` run) to --out and, with --write-docs, to --docs-dir. Each file is written to a temp name and
    renamed."""
    from perflow_jax.io import atomic_file

    written = []
    targets = ([args.out] if args.out else []) + ([args.docs_dir] if args.write_docs else [])
    for folder in targets:
        os.makedirs(folder, exist_ok=True)
        base = os.path.join(folder, args.name)
        with atomic_file(base + ".json") as tmp, open(tmp, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=1)
        if "grid" in res:
            with atomic_file(base + ".png") as tmp:
                render_chart(res, tmp)
            written.append(base + ".png")
        with atomic_file(base + ".md") as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write(render_markdown(res, os.path.basename(base) + ".png") if "grid" in res
                    else render_startup_markdown(res))
        written += [base + ".json", base + ".md"]
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark (or one probe process); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    # On a GPU, JAX would otherwise preallocate most of the device memory and starve PyTorch in this process.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if args.resolution is None:
        args.resolution = 32 if (args.preset == "tiny" and args.model is None) else 512
    if args.probe:
        return probe_main(args)
    missing = [] if args.from_json else required_modules(args)
    if missing:
        why = ("--model DIR with --no-torch needs neither" if args.model is None and args.no_torch else
               "install the test extras (pip install -e \".[test]\" -c constraints/test.txt)")
        print(f"perflow-jax bench: error: this run needs {' and '.join(missing)}, not installed here: the presets "
              f"are built, and the PyTorch side runs, with PyTorch diffusers; {why}.", file=sys.stderr)
        return 2
    if args.from_json:
        res = _read_json(args.from_json)
        if args.notes:
            with open(args.notes, encoding="utf-8") as f:
                res["notes"] = f.read()
        for path in write_report(res, args):
            print(f"wrote {path}")
        return 0

    _quiet()
    import jax

    work = tempfile.mkdtemp(prefix="perflow-bench-")
    try:
        if args.model:
            folder, desc = args.model, f"`{args.model}` (its own weights)"
        else:
            folder = args.model_cache or os.path.join(work, "model")
            t0 = time.perf_counter()
            build_preset(args.preset, folder)
            print(f"[build] {args.preset} model in {folder} ({time.perf_counter() - t0:.1f}s)", flush=True)
            desc = (f"preset `{args.preset}` (random weights, "
                    + ("the published SD1.5 architecture from `perflow_jax/models/configs/sd15`: UNet 860M params, "
                       "CLIP ViT-L/14 text encoder, VAE)" if args.preset == "sd15"
                       else f"configs in `scripts/configs/{args.preset}`)"))
        if args.torch_threads and not args.no_torch:
            import torch

            torch.set_num_threads(args.torch_threads)
        env = environment(args, argv)
        res: dict[str, Any] = {"environment": env}

        if args.startup or not args.no_probes:
            st = res["startup"] = run_startup(folder, work, args)
            res["compile"] = {"cold": st["cold"], "warm": st["warm"]}
            res["memory"] = {"jax": st["cold"], **({"torch": st["torch"][0]} if st["torch"] else {})}
        if args.startup:
            res["settings"] = {"model_desc": desc, "resolution": args.resolution, "steps": args.steps[:1],
                               "batches": args.batches[:1], "guidance": args.guidance, "dtype": args.dtype}
            res["loadavg_end"] = list(os.getloadavg())
            for path in write_report(res, args):
                print(f"wrote {path}")
            print("\n".join(startup_lines(res["startup"])))
            return 0

        cache = args.cache_dir or os.path.join(work, "cache")
        jpipe = load_jax_pipeline(folder, args.dtype, cache)
        tpipe = None if args.no_torch else load_torch_pipeline(folder, args.dtype)
        short = os.path.basename(os.path.normpath(args.model)) if args.model else f"{args.preset} (random weights)"
        res["settings"] = {"model_desc": desc, "model_short": short, "resolution": args.resolution,
                           "latent": args.resolution // jpipe.vae_scale_factor, "steps": args.steps,
                           "batches": args.batches, "guidance": args.guidance, "dtype": args.dtype,
                           "repeats": args.repeats, "warmup": args.warmup,
                           "cache_note": args.cache_dir if args.cache_dir else "a fresh temp folder"}
        res["grid"] = bench_grid(jpipe, tpipe, args)
        res["recompile_check"] = check_recompile(jpipe, args)
        res["scheduler"] = bench_scheduler(jpipe, tpipe, res["grid"], args)
        res["controlnet"] = bench_controlnet(jpipe, args)
        if not args.no_torch:  # the tiny SVD is built with PyTorch diffusers
            res["video"] = _video_module().bench_video(work, steps=args.steps[0], repeats=args.repeats,
                                                       warmup=args.warmup)


        res["multiview"] = bench_multiview(jpipe, args)
        if not args.no_torch:
            res["convs"] = bench_convs(jpipe, args)
        if jax.default_backend() == "gpu" and not args.no_torch and _torch_device() == "cuda":
            res["gpu"] = bench_gpu(jpipe, folder, args)
        res["loadavg_end"] = list(os.getloadavg())
        if args.notes:
            with open(args.notes, encoding="utf-8") as f:
                res["notes"] = f.read()
        for path in write_report(res, args):
            print(f"wrote {path}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
