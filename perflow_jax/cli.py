"""The ``perflow-jax`` command: ``sample``, ``generate``, ``convert``, ``train`` and ``bench``.

``perflow-jax sample`` generates images with a diffusers-format SD/SDXL model or a single-file checkpoint
(plus an optional PeRFlow ΔW and LoRAs) and writes PNGs and a grid; ``perflow-jax generate`` runs a
resumable generation job over a prompt file on every process and device (:mod:`perflow_jax.generate`);
``perflow-jax convert`` turns PyTorch weights into Flax checkpoints (or a merged model back into a diffusers
folder); ``perflow-jax train`` runs PeRFlow reflow training from a YAML config. The CLI turns JAX's
persistent compilation cache on (``--no-cache`` or ``PERFLOW_JAX_CACHE_DIR=off`` switches it off; ``bench``
manages its own).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def _positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return v


def _seed(text: str) -> int:
    v = int(text)
    if not 0 <= v < 2**32:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**32), got {v}")
    return v


def _lora_arg(text: str) -> tuple[str, float]:
    """``FILE[:SCALE]`` → (file, scale); scale defaults to 1.0."""
    path, sep, scale = text.rpartition(":")
    if sep:
        try:
            return path, float(scale)
        except ValueError:
            pass
    return text, 1.0


def _add_delta_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--delta-variant", default=None,
                   help="weights variant of a UNet-format --delta folder, e.g. v0-1 (default: its plain file, else "
                        "its single variant file)")
    p.add_argument("--delta-is-merged", action="store_true",
                   help="--delta holds merged PeRFlow UNet weights (a released pipeline or its unet/): ΔW = merged "
                        "- the UNet of --delta-base")
    p.add_argument("--delta-base", default=None,
                   help="with --delta-is-merged: the pipeline or UNet the merged weights were made from (default: "
                        "the model's own UNet)")


def _delta_options(args: argparse.Namespace) -> dict:
    return dict(delta_variant=args.delta_variant, delta_is_merged=args.delta_is_merged, delta_base=args.delta_base)


def _add_model_options(p: argparse.ArgumentParser, *, digits: bool) -> None:
    """--model, --base, --delta (and its options), --lora (shared by sample and generate)."""
    builtin = ("'digits' (built-in PeRFlow model), 'digits-guided' (its CFG-fixed variant) or 'digits-teacher', "
               if digits else "")
    p.add_argument("--model", required=True,
                   help=f"{builtin}a diffusers-format folder, a Hugging Face repo id (downloaded unless cached or "
                        "HF_HUB_OFFLINE=1), or a single-file .safetensors")
    p.add_argument("--base", default=None, help="for a single-file --model: a diffusers folder of the same family")
    p.add_argument("--delta", help="PeRFlow ΔW: delta_weights.safetensors, its folder, a UNet-format ΔW folder, or "
                                   "a repo id (e.g. hansyan/perflow-sd15-delta-weights)")
    _add_delta_options(p)
    p.add_argument("--lora", action="append", type=_lora_arg, default=[], metavar="FILE[:SCALE]",
                   help="merge a LoRA (diffusers/PEFT or kohya layout) after ΔW; repeatable")


def _add_dtype_options(p: argparse.ArgumentParser) -> None:
    """--dtype, --variant, --scheduler (shared by sample and generate)."""
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="params and activations (default fp32)")
    p.add_argument("--variant", default=None, help="weights variant, e.g. fp16")
    p.add_argument("--scheduler", default=None,
                   help="perflow (default; ddim for digits-teacher) or another registered scheduler")


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="perflow-jax", description="PeRFlow for Stable Diffusion in JAX/Flax.")
    p.add_argument("--no-cache", action="store_true", help="do not use JAX's persistent compilation cache")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sample", help="generate images")
    _add_model_options(s, digits=True)
    s.add_argument("--prompt", required=True, nargs="+", help="one or more prompts (digits 0-9 for 'digits')")
    s.add_argument("--negative-prompt", default=None)
    s.add_argument("--steps", type=_positive_int, default=None, help="inference steps (default: the family's)")
    s.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the family's)")
    s.add_argument("--num-images", type=_positive_int, default=4, help="images per prompt")
    s.add_argument("--batch-size", type=_positive_int, default=None,
                   help="images per compiled call; batch b uses seed + b. Default: as many as fit the memory "
                        "estimate (docs/pipelines.md), the images then independent of the split")
    s.add_argument("--seed", type=_seed, default=0, help="random seed in [0, 2**32)")
    s.add_argument("--height", type=int, default=None)
    s.add_argument("--width", type=int, default=None)
    _add_dtype_options(s)
    s.add_argument("--init-image", default=None, help="img2img: an RGB image file")
    s.add_argument("--strength", type=float, default=None, help="img2img strength in (0, 1] (default 0.6)")
    s.add_argument("--decode-chunk-size", type=_positive_int, default=None, help="VAE decode chunk (memory)")
    s.add_argument("--upscale", type=int, choices=(2,), default=None,
                   help="upscale the latents ×2 with the SD latent upscaler (--upscaler) before decoding")
    s.add_argument("--upscaler", default=None,
                   help="with --upscale: a diffusers latent-upscaler folder or cached repo id "
                        "(stabilityai/sd-x2-latent-upscaler)")
    s.add_argument("--upscale-steps", type=_positive_int, default=None, help="upscaler Euler steps (default 20)")
    s.add_argument("--upscale-guidance", type=float, default=None,
                   help="upscaler CFG scale (default 0: no guidance and no prompt, as in diffusers' example)")
    s.add_argument("--controlnet", action="append", type=_lora_arg, default=[], metavar="DIR_OR_FILE[:SCALE]",
                   help="a ControlNet (diffusers folder) and its conditioning scale (default 1); repeatable, one "
                        "--control-image each")
    s.add_argument("--control-image", action="append", default=[], metavar="FILE",
                   help="the control image of the matching --controlnet (an RGB image of the output size)")
    s.add_argument("--guess-mode", action="store_true", help="ControlNet guess mode (as diffusers)")
    s.add_argument("--refine", type=float, default=None, metavar="SCALE",
                   help="PeRFlow-Refiner: upscale the images by SCALE with --refine-controlnet (a Tile ControlNet)")
    s.add_argument("--refine-controlnet", default=None, metavar="DIR", help="the Tile ControlNet for --refine")
    s.add_argument("--refine-strength", type=float, default=None, help="refiner img2img strength (default 1.0)")
    s.add_argument("--vae-tile-size", type=_positive_int, default=None, metavar="PIXELS",
                   help="encode/decode larger images in blended VAE tiles of this size (e.g. 512 for 2048² images)")
    s.add_argument("--ip-adapter", default=None, metavar="FILE",
                   help="IP-Adapter or IP-Adapter Plus weights (ip-adapter*.safetensors) for an image prompt")
    s.add_argument("--ip-image", default=None, metavar="FILE", help="the image prompt (with --ip-adapter)")
    s.add_argument("--ip-scale", type=float, default=None, help="weight of the image prompt (default 1.0)")
    s.add_argument("--image-encoder", default=None, metavar="DIR",
                   help="the CLIP image encoder folder (default: the model's image_encoder/, else the one next to "
                        "the --ip-adapter file)")
    s.add_argument("--out", required=True,
                   help="output folder for PNGs and grid.png; a rerun replaces the images perflow-jax wrote there "
                        "and touches no other file")

    g = sub.add_parser("generate", help="a generation job: a prompt file → image shards, on every process and "
                                        "device, resumable (docs/generate.md)")
    _add_model_options(g, digits=False)
    g.add_argument("--prompts", required=True,
                   help=".txt (one prompt per line), .jsonl (prompt, negative_prompt, seed, guidance_scale, "
                        "num_images, id) or .csv")
    g.add_argument("--prompt-column", default="prompt", help="the prompt's column (.csv) or field (.jsonl)")
    g.add_argument("--negative-prompt", default=None, help="for prompts without their own negative_prompt")
    g.add_argument("--images-per-prompt", type=int, default=1, help="for prompts without their own num_images")
    g.add_argument("--steps", type=int, default=None, help="inference steps (default: the family's)")
    g.add_argument("--guidance", type=float, default=None,
                   help="CFG scale for prompts without their own guidance_scale (default: the family's)")
    g.add_argument("--seed", type=_seed, default=0, help="job seed in [0, 2**32)")
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--width", type=int, default=None)
    _add_dtype_options(g)
    g.add_argument("--decode-chunk-size", type=_positive_int, default=None, help="VAE decode chunk (memory)")
    g.add_argument("--global-batch", type=int, default=None,
                   help="images per step over all devices, a multiple of the device count (default: the memory "
                        "estimate's). The same per-device batch gives the same PNG bytes at any scale")
    g.add_argument("--shard-size", type=int, default=1000, help="images per shard (fixed for the job)")
    g.add_argument("--format", choices=("tar", "folder"), default="tar",
                   help="tar: webdataset shards (KEY.png + KEY.json); folder: PNGs and a .jsonl per shard")
    g.add_argument("--out", required=True, help="output folder (new, empty, or this job's: a rerun resumes it)")
    g.add_argument("--workers", type=_positive_int, default=None, help="PNG encoding threads (default: CPUs, ≤ 8)")
    g.add_argument("--log-jsonl", default=None, help="append machine-readable progress lines to this file")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="multi-process: process 0's address (or $PERFLOW_JAX_COORDINATOR_ADDRESS); TPU pods and "
                        "Slurm/MPI clusters are detected without it")
    g.add_argument("--num-processes", type=int, default=None,
                   help="multi-process: number of processes (or $PERFLOW_JAX_NUM_PROCESSES)")
    g.add_argument("--process-id", type=int, default=None,
                   help="multi-process: this process's index (or $PERFLOW_JAX_PROCESS_ID)")

    v = sub.add_parser("video", help="image to video with Stable Video Diffusion (--image), or text to video with "
                                     "AnimateDiff motion modules on SD1.5 (--motion-adapter, --prompt)")
    v.add_argument("--model", required=True, help="a diffusers StableVideoDiffusionPipeline folder (SVD), or an SD1.5 "
                                                  "diffusers folder (AnimateDiff)")
    v.add_argument("--image", default=None,
                   help="SVD: the conditioning image: RGB, sides multiples of 8 (e.g. 1024×576)")
    v.add_argument("--motion-adapter", default=None, metavar="DIR",
                   help="AnimateDiff: a diffusers MotionAdapter folder; selects text to video")
    v.add_argument("--prompt", default=None, help="AnimateDiff: the text prompt")
    v.add_argument("--negative-prompt", default=None, help="AnimateDiff: the negative prompt")
    v.add_argument("--delta", default=None, help="AnimateDiff: a PeRFlow ΔW merged into the SD1.5 UNet")
    v.add_argument("--lora", action="append", type=_lora_arg, default=[], metavar="FILE[:SCALE]",
                   help="AnimateDiff: a LoRA merged after the ΔW (repeatable)")
    v.add_argument("--scheduler", default=None, help="AnimateDiff: perflow (default) or another registered scheduler")
    v.add_argument("--guidance", type=float, default=None, help="AnimateDiff: CFG scale (default 7.5; ≤ 1: none)")
    v.add_argument("--height", type=_positive_int, default=None, help="AnimateDiff: frame height (default the model's)")
    v.add_argument("--width", type=_positive_int, default=None, help="AnimateDiff: frame width (default the model's)")
    v.add_argument("--frames", type=_positive_int, default=None,
                   help="frames to generate (default: the SVD model's; AnimateDiff 16)")
    v.add_argument("--fps", type=_positive_int, default=7, help="frame rate: conditions the model (as fps - 1) and "
                                                               "sets the written video's rate (default 7)")
    v.add_argument("--motion-bucket-id", type=int, default=None, help="SVD: amount of motion (default 127)")
    v.add_argument("--noise-aug-strength", type=float, default=None,
                   help="SVD: noise added to the conditioning image (default 0.02)")
    v.add_argument("--steps", type=_positive_int, default=None, help="inference steps (default SVD 25, AnimateDiff 4)")
    v.add_argument("--min-guidance", type=float, default=None, help="SVD: guidance of the first frame (default 1)")
    v.add_argument("--max-guidance", type=float, default=None, help="SVD: guidance of the last frame (default 3)")
    v.add_argument("--decode-chunk-size", type=_positive_int, default=None,
                   help="frames decoded together (default all; smaller saves memory, each chunk is its own clip)")
    v.add_argument("--seed", type=_seed, default=0, help="random seed in [0, 2**32)")
    v.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="UNet/encoder params and activations")
    v.add_argument("--variant", default=None, help="weights variant, e.g. fp16")
    v.add_argument("--out", required=True, help="the video: .mp4 (the [video] extra; else a .gif is written "
                                                "instead), .gif or .png (animated); a contact sheet "
                                                "NAME.sheet.png is written beside it")

    m = sub.add_parser("multiview", help="generate N views of an object with a multi-view UNet (MVDream-style)")
    m.add_argument("--model", required=True, help="a diffusers-format folder whose unet/ is a multi-view UNet")
    m.add_argument("--prompt", required=True, nargs="+", help="one or more prompts; N views each")
    m.add_argument("--negative-prompt", default="")
    m.add_argument("--image", default=None, metavar="FILE",
                   help="reference image for a model with reference-image layers (RGB; for reference='latent' "
                        "models of the output size, for reference='clip' any size)")
    m.add_argument("--image-encoder", default=None, metavar="DIR",
                   help="reference='clip' models: the CLIP image encoder folder (default: the model's image_encoder/)")
    m.add_argument("--views", type=_positive_int, default=4, help="views per prompt, evenly spaced in azimuth")
    m.add_argument("--elevation", type=float, default=15.0, help="camera elevation in degrees")
    m.add_argument("--distance", type=float, default=1.0, help="camera distance from the object")
    m.add_argument("--steps", type=_positive_int, default=4, help="inference steps")
    m.add_argument("--guidance", type=float, default=7.5, help="CFG scale (≤ 1: no guidance)")
    m.add_argument("--seed", type=_seed, default=0, help="random seed in [0, 2**32)")
    m.add_argument("--height", type=_positive_int, default=None)
    m.add_argument("--width", type=_positive_int, default=None)
    m.add_argument("--scheduler", default="perflow", help="perflow (default) or another registered scheduler")
    m.add_argument("--delta", default=None,
                   help="PeRFlow ΔW of the base SD family, merged into the shared 2D weights")
    m.add_argument("--out", required=True,
                   help="output folder for view_NNNN.png and contact_sheet.png; a rerun replaces what perflow-jax "
                        "wrote there and touches no other file")

    c = sub.add_parser("convert", help="convert a PyTorch diffusers folder to Flax checkpoints")
    c.add_argument("src", help="pipeline folder (model_index.json), one model folder, a Hugging Face repo id, or a "
                              "single-file .safetensors checkpoint")
    c.add_argument("dst", help="destination folder (created; written atomically)")
    c.add_argument("--to", choices=("flax", "diffusers"), default="flax",
                   help="flax: config.json + flax_model.msgpack per model; diffusers: PyTorch-layout safetensors")
    c.add_argument("--base", default=None, help="for a single-file src: a diffusers folder of the same family")
    c.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast params (default: keep)")
    c.add_argument("--delta", default=None, help="merge this PeRFlow ΔW into the UNet")
    _add_delta_options(c)
    c.add_argument("--lora", action="append", type=_lora_arg, default=[], metavar="FILE[:SCALE]",
                   help="merge a LoRA after ΔW; repeatable")
    c.add_argument("--variant", default=None, help="read this weights variant, e.g. fp16")
    c.add_argument("--overwrite", action="store_true",
                   help="replace dst if it is an empty folder or one perflow-jax wrote (never anything else)")

    sub.add_parser("bench", help="benchmark vs PyTorch diffusers (scripts/benchmark.py; arguments passed on)",
                   add_help=False)

    r = sub.add_parser("prepare", help="encode images + captions into ArrayRecord shards for training")
    r.add_argument("inputs", nargs="+", help="image folders (metadata.jsonl, or NAME.txt beside each image), "
                                            "webdataset .tar shards (img2dataset layout), or folders of .tar shards")
    r.add_argument("--model", required=True, help="the teacher's diffusers folder (or cached repo id): its VAE and "
                                                  "text encoder(s) encode the data")
    r.add_argument("--out", required=True, help="output folder (new or empty; rerun into it to resume)")
    r.add_argument("--resolution", type=_positive_int, default=512, help="square training size (512; SDXL 1024)")
    r.add_argument("--batch-size", type=_positive_int, default=16, help="images per encoder call")
    r.add_argument("--shard-size", type=_positive_int, default=1000, help="images per output shard (folders)")
    r.add_argument("--storage-dtype", choices=("bf16", "fp32"), default="bf16", help="stored arrays (default bf16)")
    r.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="encoder params and activations (fp32)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")

    t = sub.add_parser("train", help="PeRFlow reflow training from a YAML config")
    t.add_argument("--config", required=True, help="YAML training config (see configs/ and docs/training.md)")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=400")
    t.add_argument("--allow-config-change", nargs="+", action="extend", default=[], metavar="KEY",
                   help="when resuming the checkpoints in output_dir: config keys (e.g. train.learning_rate, or a "
                        "section such as perflow, or '*') that may differ from the run's stored config; "
                        "train.steps may grow without it")
    return p


DIGITS_MODELS = {"digits": "perflow", "digits-guided": "guided", "digits-teacher": "teacher"}


def _cmd_sample_digits(args: argparse.Namespace) -> None:
    """The built-in class-conditional digits model: each prompt is a digit; images are 8×8, saved ×8."""
    import numpy as np

    from perflow_jax.images import GRID, GRID_MAX_IMAGES, OutputFolder
    from perflow_jax.pipelines.digits import DEFAULT_MAX_BATCH, DigitsPipeline, save_grid

    if (args.delta or args.lora or args.base or args.init_image or args.upscale or args.upscaler
            or any(_delta_options(args).values()) or args.controlnet or args.control_image
            or args.refine is not None or args.refine_controlnet or args.guess_mode or args.ip_adapter
            or args.ip_image):
        raise CLIError("--delta (and its options), --lora, --base, --init-image, --upscale, --upscaler, "
                       "--ip-adapter/--ip-image and the ControlNet/refiner options apply to Stable Diffusion models, "
                       "not 'digits'.")
    unused = [flag for flag, value in (("--negative-prompt", args.negative_prompt), ("--height", args.height),
                                       ("--width", args.width), ("--dtype", args.dtype), ("--variant", args.variant),
                                       ("--strength", args.strength), ("--decode-chunk-size", args.decode_chunk_size),
                                       ("--vae-tile-size", args.vae_tile_size),
                                       ("--refine-strength", args.refine_strength),
                                       ("--ip-scale", args.ip_scale), ("--image-encoder", args.image_encoder))
              if value is not None]
    if unused:
        raise CLIError(f"{', '.join(unused)} {'is' if len(unused) == 1 else 'are'} not used by the built-in digits "
                       "model (8×8 float32 images, prompts are digits 0-9); leave "
                       f"{'it' if len(unused) == 1 else 'them'} out.")
    labels = []
    for p in args.prompt:
        if not (p.isdigit() and len(p) == 1):
            raise CLIError(f"the digits model takes digits 0-9 as prompts, got {p!r}.")
        labels += [int(p)] * args.num_images
    n = len(labels)
    out = OutputFolder(args.out, n)  # checked before any work
    pipe = DigitsPipeline.from_builtin(DIGITS_MODELS[args.model])
    kw = dict(num_inference_steps=args.steps or 4, guidance_scale=args.guidance, scheduler=args.scheduler)
    bs = args.batch_size or DEFAULT_MAX_BATCH
    batches = range(0, n, bs)
    # Compile every batch size the run uses (the first batch, and a smaller last one), then time the run.
    t0 = time.perf_counter()
    warm = sorted({min(bs, n - start) for start in (batches[0], batches[-1])})
    for size in warm:
        pipe(labels[:size], seed=args.seed, **kw)
    warm_s, run_s, grid_images, first_runs = time.perf_counter() - t0, 0.0, [], {}
    for b, start in enumerate(batches):
        t1 = time.perf_counter()
        images = pipe(labels[start:start + bs], seed=(args.seed + b) % 2**32, **kw)
        dt = time.perf_counter() - t1
        run_s += dt
        first_runs.setdefault(len(images), dt)
        out.save(np.kron(images, np.ones((1, 8, 8), np.uint8)), start)  # 8×8 digits are too small to see
        grid_images.extend(images[:GRID_MAX_IMAGES - len(grid_images)])
    grid_images = np.stack(grid_images)
    ncol = min(args.num_images, len(grid_images)) if len(args.prompt) > 1 else None
    grid = save_grid(grid_images, out.extra_path(GRID), ncol=ncol)
    out.finish()
    batched = f" in {len(batches)} batches" if len(batches) > 1 else ""
    print(f"{args.model} ({pipe.default_scheduler if args.scheduler is None else args.scheduler}, "
          f"{kw['num_inference_steps']} steps): compile {max(warm_s - sum(first_runs.values()), 0.0):.2f}s, "
          f"run {run_s:.3f}s for {n} images{batched}; wrote {n} PNGs and {grid}")


def _read_init_image(path: str, flag: str = "--init-image") -> np.ndarray:
    """An RGB image file as (H, W, 3) uint8; a missing or unreadable file is a one-line ValueError naming `flag`."""
    from perflow_jax.images import read_image

    return read_image(path, flag)


def _check_control_args(args: argparse.Namespace) -> None:
    """ControlNet and refiner flags that only make sense together."""
    if len(args.control_image) != len(args.controlnet):
        raise CLIError(f"got {len(args.controlnet)} --controlnet and {len(args.control_image)} --control-image; pass "
                       "one --control-image per --controlnet, in the same order.")
    if args.guess_mode and not args.controlnet:
        raise CLIError("--guess-mode applies to ControlNets; pass --controlnet and --control-image too.")
    if (args.refine is None) != (args.refine_controlnet is None):
        raise CLIError("--refine SCALE and --refine-controlnet DIR go together (the refiner needs a Tile ControlNet).")
    if args.refine_strength is not None and args.refine is None:
        raise CLIError("--refine-strength applies to --refine only.")
    if args.refine is not None and not args.refine >= 1.0:
        raise CLIError(f"--refine must be a scale ≥ 1, got {args.refine}.")


def _check_upscale_args(args: argparse.Namespace) -> None:
    """--upscale needs --upscaler (a latent upscaler's folder) and the --upscale-* options need --upscale; checked
    before any model loads."""
    if args.upscale is None:
        given = [f for f, v in (("--upscaler", args.upscaler), ("--upscale-steps", args.upscale_steps),
                                ("--upscale-guidance", args.upscale_guidance)) if v is not None]
        if given:
            raise CLIError(f"{', '.join(given)} {'needs' if len(given) == 1 else 'need'} --upscale 2.")
        return
    if args.upscaler is None:
        raise CLIError("--upscale 2 needs --upscaler DIR: a diffusers latent-upscaler folder "
                       "(stabilityai/sd-x2-latent-upscaler).")
    if args.upscale_guidance is not None and not (
            math.isfinite(args.upscale_guidance) and args.upscale_guidance >= 0):
        raise CLIError(f"--upscale-guidance must be a finite number ≥ 0, got {args.upscale_guidance}.")
    from perflow_jax.hub import resolve_model_path
    from perflow_jax.models.upscaler_unet import UpscalerUNetConfig

    UpscalerUNetConfig.from_json(os.path.join(resolve_model_path(args.upscaler), "unet"))  # a wrong folder: now


def _load_upscaler(args: argparse.Namespace, pipe: Any) -> Any:
    """The latent upscaler for --upscaler, checked against the text-to-image model's latents."""
    import jax.numpy as jnp

    from perflow_jax.pipelines.upscale import LatentUpscalePipeline

    t0 = time.perf_counter()
    up = LatentUpscalePipeline.from_pretrained(args.upscaler, dtype=getattr(jnp, DTYPES[args.dtype or "fp32"]),
                                               decode_chunk_size=args.decode_chunk_size)
    mine, theirs = pipe.components.vae_config, up.components.vae_config
    if (mine.latent_channels, mine.scaling_factor) != (theirs.latent_channels, theirs.scaling_factor):
        raise CLIError(f"--upscaler {args.upscaler!r} works on latents of {theirs.latent_channels} channels scaled by "
                       f"{theirs.scaling_factor}; {args.model!r} makes {mine.latent_channels} channels scaled by "
                       f"{mine.scaling_factor} (the SD ×2 latent upscaler is for SD1.x/SD2.x models).")
    print(f"loaded upscaler {args.upscaler} in {time.perf_counter() - t0:.1f}s")
    return up


def _read_ip_image(args: argparse.Namespace) -> np.ndarray | None:
    """The --ip-image (read before any work), after checking the image-prompt flags go together."""
    if (args.ip_adapter is None) != (args.ip_image is None):
        raise CLIError("--ip-adapter and --ip-image go together: pass the adapter file and the image prompt.")
    if args.ip_adapter is None:
        flags = (("--ip-scale", args.ip_scale), ("--image-encoder", args.image_encoder))
        unused = [f for f, v in flags if v is not None]
        if unused:
            raise CLIError(f"{' and '.join(unused)} apply to image prompts; pass --ip-adapter and --ip-image too.")
        return None
    if not os.path.isfile(args.ip_adapter):
        raise CLIError(f"--ip-adapter {args.ip_adapter!r} does not exist.")
    if args.ip_scale is not None:
        from perflow_jax.values import check_float

        check_float("--ip-scale", args.ip_scale)
    from perflow_jax.images import read_image

    return read_image(args.ip_image, "--ip-image")


def _pipeline_options(args: argparse.Namespace) -> dict:
    """``from_pretrained`` keywords of the model options sample and generate share (--base, --delta and its
    options, --lora, --scheduler, --dtype, --variant, --decode-chunk-size)."""
    import jax.numpy as jnp

    return dict(base=args.base, delta=args.delta, **_delta_options(args), loras=args.lora,
                scheduler=args.scheduler or "perflow", dtype=getattr(jnp, DTYPES[args.dtype or "fp32"]),
                variant=args.variant, decode_chunk_size=args.decode_chunk_size)


def _load_pipeline(args: argparse.Namespace, verbose: bool = True):
    """The StableDiffusionPipeline of the shared model options (:func:`_pipeline_options`)."""
    from perflow_jax.pipelines import StableDiffusionPipeline

    t0 = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(args.model, **_pipeline_options(args))
    if verbose:
        print(f"loaded {args.model} ({pipe.family}, scheduler {pipe.scheduler.name}) in "
              f"{time.perf_counter() - t0:.1f}s")
    return pipe


def _cmd_sample(args: argparse.Namespace) -> None:
    if args.model in DIGITS_MODELS:
        return _cmd_sample_digits(args)
    _check_upscale_args(args)
    import numpy as np
    from tqdm.auto import tqdm

    from perflow_jax.images import GRID, GRID_MAX_IMAGES, OutputFolder, make_grid, save_png
    from perflow_jax.pipelines import StableDiffusionControlNetPipeline, StableDiffusionPipeline

    _check_control_args(args)
    n = len(args.prompt) * args.num_images
    out = OutputFolder(args.out, n)  # checked before any work
    control_images = [_read_init_image(f, "--control-image") for f in args.control_image]
    init_image = None
    strength = 0.6 if args.strength is None else args.strength
    if args.init_image is not None:
        if not 0.0 < strength <= 1.0:
            raise CLIError(f"--strength must be in (0, 1], got {strength}.")
        init_image = _read_init_image(args.init_image)
    elif args.strength is not None:
        raise CLIError("--strength applies to img2img only; pass --init-image too, or leave --strength out.")
    ip_image = _read_ip_image(args)
    t0 = time.perf_counter()
    options = dict(_pipeline_options(args), vae_tile_size=args.vae_tile_size, ip_adapter=args.ip_adapter,
                   image_encoder=args.image_encoder, executable_cache=not args.no_cache)
    control: dict = {}
    if args.controlnet:
        pipe = StableDiffusionControlNetPipeline.from_pretrained(
            args.model, controlnets=[path for path, _ in args.controlnet], **options)
        control = dict(controlnet_conditioning_scale=[scale for _, scale in args.controlnet],
                       guess_mode=args.guess_mode)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(args.model, **options)
    refiner = (StableDiffusionControlNetPipeline.from_pipeline(
        pipe, [args.refine_controlnet], decode_chunk_size=args.decode_chunk_size, vae_tile_size=args.vae_tile_size)
        if args.refine is not None else None)
    print(f"loaded {args.model} ({pipe.family}, scheduler {pipe.scheduler.name}) in {time.perf_counter() - t0:.1f}s")
    up = _load_upscaler(args, pipe) if args.upscale else None

    # With --batch-size, batch b uses seed + b (as always). By default the batches hold what fits the memory
    # estimate, and image i of the run is image i of one big call (same seed, first_index = i), whatever the split.
    explicit = args.batch_size is not None
    size = init_image.shape[:2] if init_image is not None else (args.height, args.width)
    if up is not None:  # the upscaler's UNet and VAE run at twice the size: budget the batch for that
        height, width = size if init_image is not None else pipe._check_size(*size)
        size = (2 * height, 2 * width)
    bs = args.batch_size if explicit else pipe.default_batch_size(*size)
    grid_images, compile_s, run_s = [], 0.0, 0.0
    batches = range(0, n, bs)
    for b, start in enumerate(tqdm(batches, desc="batches", disable=len(batches) == 1)):
        chunk = [args.prompt[i // args.num_images] for i in range(start, min(start + bs, n))]
        seed, first = ((args.seed + b) % 2**32, 0) if explicit else (args.seed, start)
        kw = dict(negative_prompt=args.negative_prompt, num_inference_steps=args.steps,
                  guidance_scale=args.guidance, seed=seed, first_index=first,
                  output_type="uint8" if up is None else "latent", ip_adapter_image=ip_image,
                  ip_adapter_scale=1.0 if args.ip_scale is None else args.ip_scale)
        if control:
            kw.update(control, control_image=control_images[0] if len(control_images) == 1 else control_images)
        if init_image is not None:
            images = pipe.img2img(chunk, init_image, strength=strength, **kw)
        else:
            images = pipe(chunk, height=args.height, width=args.width, **kw)
        compile_s += pipe.stats.compile_seconds
        run_s += pipe.stats.run_seconds
        if up is not None:  # a stage after text-to-image: the latents, upscaled ×2, then decoded
            images = up(chunk, latents=images, negative_prompt=args.negative_prompt,
                        num_inference_steps=args.upscale_steps or 20, guidance_scale=args.upscale_guidance or 0.0,
                        seed=seed, first_index=first)
            compile_s += up.stats.compile_seconds
            run_s += up.stats.run_seconds
        if refiner is not None:
            images = refiner.refine(images, chunk, args.negative_prompt, scale=args.refine,
                                    strength=1.0 if args.refine_strength is None else args.refine_strength,
                                    num_inference_steps=args.steps, guidance_scale=args.guidance, seed=seed,
                                    first_index=first)
            compile_s += refiner.stats.compile_seconds
            run_s += refiner.stats.run_seconds
        out.save(images, start)
        grid_images.extend(images[:GRID_MAX_IMAGES - len(grid_images)])
    grid_images = np.stack(grid_images)
    ncols = min(args.num_images, len(grid_images)) if len(args.prompt) > 1 else None
    grid = save_png(make_grid(grid_images, ncols=ncols), out.extra_path(GRID))
    out.finish()
    batched = f" in {len(batches)} batches of up to {bs}" if len(batches) > 1 else ""
    print(f"compile {compile_s:.2f}s, run {run_s:.2f}s for {n} images{batched} "
          f"({n / max(run_s, 1e-9):.2f} images/s); wrote {n} PNGs and {grid}")


def _cmd_generate(args: argparse.Namespace) -> None:
    """A generation job (perflow_jax.generate.run): checks first, then jax.distributed, the model and the job."""
    from perflow_jax import generate, prompts, sharding

    if args.model in DIGITS_MODELS:
        raise CLIError("generate runs Stable Diffusion models; use `perflow-jax sample` for the digits model.")
    if args.images_per_prompt < 1:
        raise CLIError(f"--images-per-prompt must be ≥ 1, got {args.images_per_prompt}.")
    for flag, v in (("--steps", args.steps), ("--global-batch", args.global_batch), ("--shard-size", args.shard_size)):
        if v is not None and v < 1:
            raise CLIError(f"{flag} must be ≥ 1, got {v}.")
    generate.check_output(args.out)  # before any work: nothing is loaded or started for a bad job
    prompts.summarize(args.prompts, args.prompt_column, args.images_per_prompt)
    sharding.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    import jax

    main_process = jax.process_index() == 0
    pipe = _load_pipeline(args, verbose=main_process)
    model = {"model": args.model, "base": args.base, "delta": args.delta, **_delta_options(args),
             "loras": [[f, s] for f, s in args.lora], "variant": args.variant}
    result = generate.run(
        pipe, args.prompts, args.out, prompt_column=args.prompt_column, images_per_prompt=args.images_per_prompt,
        num_inference_steps=args.steps, guidance_scale=args.guidance, negative_prompt=args.negative_prompt,
        seed=args.seed, height=args.height, width=args.width, global_batch=args.global_batch,
        shard_size=args.shard_size, fmt=args.format, model=model, num_workers=args.workers,
        log_jsonl=args.log_jsonl, progress=not args.no_progress)
    if main_process:
        m = result.manifest
        print(f"compile {result.compile_seconds:.2f}s, run {result.run_seconds:.2f}s; "
              f"{m['counts']['shards_complete']}/{m['counts']['shards']} shards complete in {args.out} "
              f"({m['throughput']['images_this_run']} images this run, "
              f"{m['throughput']['images_per_second'] or 0:.2f} images/s)")


def _cmd_video(args: argparse.Namespace) -> None:
    from perflow_jax import video_io

    out = os.fspath(args.out)
    stem, ext = os.path.splitext(out)
    if ext.lower() not in video_io.VIDEO_FORMATS:
        raise CLIError(f"--out {out!r}: use a .mp4, .gif or .png (animated) file name.")
    if ext.lower() == ".mp4" and not video_io.has_mp4_writer():
        print("perflow-jax video: the [video] extra (imageio-ffmpeg) is not installed; writing a GIF instead.",
              file=sys.stderr)
        out = stem + ".gif"
    frames = _animatediff(args) if args.motion_adapter is not None else _svd(args)
    video_io.write_video(frames, out, args.fps)
    sheet = video_io.write_contact_sheet(frames, stem + ".sheet.png")
    print(f"wrote {len(frames)} frames to {out} and {sheet}")


_SVD_ONLY = ("--image", "--motion-bucket-id", "--noise-aug-strength", "--min-guidance", "--max-guidance")
_ANIMATEDIFF_ONLY = ("--prompt", "--negative-prompt", "--delta", "--lora", "--scheduler", "--guidance", "--height",
                     "--width")


def _given(args: argparse.Namespace, flags: tuple[str, ...]) -> list[str]:
    return [f for f in flags if getattr(args, f[2:].replace("-", "_")) not in (None, [])]


def _animatediff(args: argparse.Namespace) -> Any:
    """``perflow-jax video --motion-adapter``: AnimateDiff text to video on an SD1.5 model."""
    from perflow_jax.pipelines.animatediff import AnimateDiffPipeline

    if mixed := _given(args, _SVD_ONLY):
        raise CLIError(f"{', '.join(mixed)} {'is' if len(mixed) == 1 else 'are'} for SVD image to video; "
                       "--motion-adapter makes text-to-video frames from --prompt: drop them, or drop "
                       "--motion-adapter.")
    if args.prompt is None:
        raise CLIError("--motion-adapter (AnimateDiff text to video) needs --prompt.")
    if not os.path.isdir(args.motion_adapter):
        raise CLIError(f"--motion-adapter {args.motion_adapter!r} is not a folder (a diffusers MotionAdapter folder).")
    pipe = AnimateDiffPipeline.from_pretrained(args.model, args.motion_adapter, delta=args.delta, loras=args.lora,
                                               scheduler=args.scheduler or "perflow",
                                               dtype=DTYPES[args.dtype or "fp32"], variant=args.variant,
                                               decode_chunk_size=args.decode_chunk_size)
    return pipe(args.prompt, args.negative_prompt or "", num_frames=args.frames or 16,
                num_inference_steps=args.steps or 4, guidance_scale=7.5 if args.guidance is None else args.guidance,
                height=args.height, width=args.width, seed=args.seed)


def _svd(args: argparse.Namespace) -> Any:
    """``perflow-jax video --image``: Stable Video Diffusion image to video."""
    import numpy as np
    from PIL import Image

    from perflow_jax.pipelines.video import VideoPipeline

    if mixed := _given(args, _ANIMATEDIFF_ONLY):
        raise CLIError(f"{', '.join(mixed)} {'is' if len(mixed) == 1 else 'are'} for AnimateDiff text to video: "
                       "pass --motion-adapter DIR too, or drop them.")
    if args.image is None:
        raise CLIError("video needs --image (SVD image to video) or --motion-adapter with --prompt (AnimateDiff).")
    if not os.path.isfile(args.image):
        raise CLIError(f"--image {args.image!r} does not exist.")
    try:
        with Image.open(args.image) as im:
            if im.mode != "RGB":
                raise CLIError(f"--image {args.image!r} is a {im.mode!r} image; SVD needs RGB: convert it first.")
            image = np.asarray(im)
    except OSError as e:
        raise CLIError(f"--image {args.image!r} is not an image file PIL can read ({e}).") from None
    pipe = VideoPipeline.from_pretrained(args.model, dtype=DTYPES[args.dtype or "fp32"], variant=args.variant)
    pick = lambda value, default: default if value is None else value  # noqa: E731
    try:
        return pipe(image, num_frames=args.frames, num_inference_steps=pick(args.steps, 25), fps=args.fps,
                    motion_bucket_id=pick(args.motion_bucket_id, 127),
                    noise_aug_strength=pick(args.noise_aug_strength, 0.02),
                    min_guidance_scale=pick(args.min_guidance, 1.0), max_guidance_scale=pick(args.max_guidance, 3.0),
                    decode_chunk_size=args.decode_chunk_size, seed=args.seed)
    except ValueError as e:
        raise CLIError(f"--image {args.image!r}: {e}" if "image" in str(e) else str(e)) from None


def _cmd_multiview(args: argparse.Namespace) -> None:
    import numpy as np

    from perflow_jax.images import OutputFolder, make_grid, save_png
    from perflow_jax.pipelines import MultiViewPipeline

    sheet = "contact_sheet.png"
    n = len(args.prompt) * args.views
    out = OutputFolder(args.out, n, prefix="view", extra=(sheet,))  # checked before any work
    image = _read_init_image(args.image, "--image") if args.image is not None else None
    t0 = time.perf_counter()
    pipe = MultiViewPipeline.from_pretrained(args.model, delta=args.delta, scheduler=args.scheduler,
                                             image_encoder=args.image_encoder)
    print(f"loaded {args.model} (scheduler {pipe.scheduler.name}) in {time.perf_counter() - t0:.1f}s")
    t0 = time.perf_counter()
    images = pipe(args.prompt, args.negative_prompt, num_views=args.views, elevation=args.elevation,
                  distance=args.distance, reference_image=image, num_inference_steps=args.steps,
                  guidance_scale=args.guidance, seed=args.seed, height=args.height, width=args.width,
                  output_type="uint8")
    seconds = time.perf_counter() - t0
    out.save(images)
    path = save_png(make_grid(np.asarray(images), ncols=args.views), out.extra_path(sheet))
    out.finish()
    print(f"{n} views in {seconds:.2f}s (compile included); wrote {n} PNGs and {path}")


def _cmd_convert(args: argparse.Namespace) -> None:
    import jax.numpy as jnp

    from perflow_jax import delta
    from perflow_jax.io import check_destination
    from perflow_jax.models.components import convert_to_flax

    # Before any work: dst may not be, contain or lie inside the source, nor be or contain another input, and
    # --overwrite replaces only an empty folder or one perflow-jax wrote.
    inputs = [args.base, args.delta, args.delta_base, *(f for f, _ in args.lora)]
    check_destination(args.dst, [args.src], inputs=inputs, overwrite=args.overwrite, flag="--overwrite")

    dtype = getattr(jnp, DTYPES[args.dtype]) if args.dtype else None
    if args.to == "flax" and not args.lora and not os.path.isfile(args.src):
        if args.delta is None and any(_delta_options(args).values()):
            raise CLIError("--delta-variant, --delta-is-merged and --delta-base describe a ΔW: pass --delta too.")
        merge = delta.merger(args.delta, variant=args.delta_variant, is_merged=args.delta_is_merged,
                             base=args.delta_base) if args.delta else None
        info = convert_to_flax(args.src, args.dst, dtype=dtype, unet_transform=merge, variant=args.variant,
                               overwrite=args.overwrite)
        print(f"converted {', '.join(info['components'])} to {args.dst} in {info['seconds']:.1f}s")
        return
    from perflow_jax.models.export import save_pipeline
    from perflow_jax.pipelines import load_components

    t0 = time.perf_counter()
    comps = load_components(args.src, base=args.base, delta=args.delta, **_delta_options(args), loras=args.lora,
                            variant=args.variant)
    save_pipeline(comps, args.dst, to=args.to, dtype=dtype, overwrite=args.overwrite)
    print(f"wrote a {args.to} pipeline folder ({comps.family}) to {args.dst} in {time.perf_counter() - t0:.1f}s")


def _cmd_train(args: argparse.Namespace) -> None:
    import json

    from perflow_jax.training.train import train_from_config

    if not os.path.isfile(args.config):
        raise CLIError(f"--config {args.config!r} does not exist.")
    # --allow-config-change takes one or more KEYs, so it may swallow key=value overrides written after it.
    allow = [k for k in args.allow_config_change if "=" not in k]
    overrides = list(args.overrides) + [k for k in args.allow_config_change if "=" in k]
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise CLIError(f"overrides must be key=value, got {bad}.")
    summary = train_from_config(args.config, overrides, allow_config_change=allow)
    print(json.dumps(summary, indent=2, default=str))


def _cmd_prepare(args: argparse.Namespace) -> None:
    import json

    import jax.numpy as jnp

    from perflow_jax.sharding import initialize_distributed
    from perflow_jax.training.prepare import prepare

    initialize_distributed()  # several hosts: each prepares its share of the shards (a no-op in one process)
    storage = {"bf16": "bfloat16", "fp32": "float32"}[args.storage_dtype]
    report = prepare(args.model, args.inputs, args.out, resolution=args.resolution, batch_size=args.batch_size,
                     shard_size=args.shard_size, storage_dtype=storage,
                     compute_dtype=getattr(jnp, DTYPES[args.dtype or "fp32"]), progress=not args.no_progress)
    skipped = report.pop("skipped_samples")
    print(json.dumps(report, indent=2))
    for row in skipped:
        print(f"skipped {row['sample']}: {row['reason']}")


def _run_bench(argv: list[str]) -> int:
    """``perflow-jax bench ...`` = ``python scripts/benchmark.py ...`` from the source checkout (it needs torch,
    diffusers and the benchmark configs in scripts/configs, which are not part of the installed package)."""
    import runpy

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "benchmark.py")
    if not os.path.isfile(script):
        print("perflow-jax bench: error: scripts/benchmark.py not found; run it from a source checkout of "
              "perflow-jax installed with `pip install -e \".[test]\"`.", file=sys.stderr)
        return 2
    return int(runpy.run_path(script)["main"](argv) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 user error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"] or argv[1:2] == ["bench"] and argv[:1] == ["--no-cache"]:
        return _run_bench(argv[argv.index("bench") + 1:])
    args = _build_parser().parse_args(argv)
    from perflow_jax import enable_compilation_cache

    enable_compilation_cache(enable=not args.no_cache)  # the one place the CLI turns the persistent cache on
    try:
        {"sample": _cmd_sample, "generate": _cmd_generate, "video": _cmd_video, "multiview": _cmd_multiview,
         "convert": _cmd_convert, "prepare": _cmd_prepare,
         "train": _cmd_train}[args.command](args)
    except (CLIError, OSError, ValueError) as e:  # OSError: missing, unreadable or unwritable files and folders
        print(f"perflow-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
