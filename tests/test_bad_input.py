"""Bad input: every case of the Bad input issue, one row each, with the clear error (or behaviour) expected.

Each row is run in-process, through ``perflow_jax.cli.main([...])`` (exit status 2 and a one-line error on
stderr) or through a Python API call (the named exception and message). Every row also checks that nothing was
lost or left behind: the files under the row's work folder are snapshotted before and after, and apart from the
row's declared output folder, nothing may be created, changed or removed.

Placeholders in CLI rows: ``{w}`` the row's work folder, ``{out}`` its output folder (``{w}/out``), ``{tiny}`` a
tiny SD1-style diffusers folder (read-only for the rows: the snapshot covers it too).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from perflow_jax.cli import main
from tests.support.tiny_sd import make_tiny_pipeline


@dataclasses.dataclass(frozen=True)
class Row:
    """One bad input.

    Attributes:
      id: a short name (the pytest id).
      error: a regex fragment the error text must contain (``re.search``).
      argv: CLI arguments (placeholders as in the module docstring), or None for an API row.
      call: for an API row, ``call(work: Path, tiny: Path)``, which must raise `raises`.
      raises: the exception type an API row raises.
      setup: ``setup(work, tiny)`` prepares the row's inputs under `work` before the snapshot.
      writes_output: the row is allowed to write (only) under ``{out}``; error rows must not create it.
      exit_code: the CLI exit status expected (2 for a user error).
    """

    id: str
    error: str
    argv: tuple[str, ...] | None = None
    call: Callable[[Path, Path], object] | None = None
    raises: type[BaseException] = ValueError
    setup: Callable[[Path, Path], None] | None = None
    writes_output: bool = False
    exit_code: int = 2


def _snapshot(*roots: Path, skip: Path | None = None) -> dict[str, tuple[int, int, int]]:
    """path → (size, mtime_ns, mode) of every file and folder under `roots` (except `skip` and below)."""
    seen: dict[str, tuple[int, int, int]] = {}
    for root in roots:
        for folder, dirs, files in os.walk(root):
            if skip is not None and Path(folder).resolve().is_relative_to(skip.resolve()):
                dirs[:] = []
                continue
            for name in dirs + files:
                p = os.path.join(folder, name)
                st = os.lstat(p)
                seen[p] = (st.st_size, st.st_mtime_ns, st.st_mode)
    return seen


def run_row(row: Row, work: Path, tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Run one row and check its error text and that no file outside its output changed."""
    work.mkdir(parents=True, exist_ok=True)
    out = work / "out"
    if row.setup is not None:
        row.setup(work, tiny)
    before = _snapshot(work, tiny, skip=out)
    capsys.readouterr()
    if row.argv is not None:
        argv = [a.format(w=work, out=out, tiny=tiny) for a in row.argv]
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse's own usage errors
            rc = e.code
        err = capsys.readouterr().err
        assert rc == row.exit_code, f"exit {rc}, stderr: {err[-2000:]}"
        if row.exit_code == 2:
            lines = [ln for ln in err.strip().splitlines() if ln.strip()]
            assert lines, "no error message"
            assert "Traceback" not in err, err[-3000:]
        assert re.search(row.error, err), f"{row.error!r} not in {err!r}"
    else:
        assert row.call is not None
        with pytest.raises(row.raises, match=row.error):
            row.call(work, tiny)
    after = _snapshot(work, tiny, skip=out)
    changed = sorted(set(before) ^ set(after)) + sorted(p for p in before if p in after and before[p] != after[p])
    assert not changed, f"files outside the output changed: {changed[:10]}"
    if not row.writes_output:
        assert not out.exists() or not any(out.iterdir()), f"an error row wrote into {out}"


# ----------------------------------------------------------------------------------------------------------
# The rows, by area (each area's list is kept together; add rows to the end of the area's list)
# ----------------------------------------------------------------------------------------------------------

# Files, folders and the CLI: data loss, --out, temp files, modes, tracebacks turned into one-line errors.
FILE_ROWS: list[Row] = [
    Row("convert-missing-source", r"is neither an existing file or folder", argv=("convert", "{w}/nope", "{out}")),
]

# Numbers and values: non-finite or wrongly typed numbers refused where they enter; PeRFlow step limits.


def _tensors(file: str, **tensors: object) -> Callable[[Path, Path], None]:
    """A setup writing `tensors` (name → NumPy array) as ``{w}/<file>`` (safetensors)."""

    def setup(work: Path, tiny: Path) -> None:
        from safetensors.numpy import save_file

        save_file({k.replace("__", "."): v for k, v in tensors.items()}, str(work / file))

    return setup


def _truncated_delta(work: Path, tiny: Path) -> None:
    _tensors("full.safetensors", w=np.ones((64, 64), np.float32))(work, tiny)
    data = (work / "full.safetensors").read_bytes()
    (work / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    (work / "full.safetensors").unlink()


def _model_copy(edit: Callable[[Path], None]) -> Callable[[Path, Path], None]:
    """A setup copying the tiny model to ``{w}/sd`` and applying `edit(copy)`."""

    def setup(work: Path, tiny: Path) -> None:
        shutil.copytree(tiny, work / "sd")
        edit(work / "sd")

    return setup


def _edit_json(file: str, **changes: object) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        path = root / file
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))

    return edit


def _write(file: str, text: str) -> Callable[[Path], None]:
    return lambda root: (root / file).write_text(text)


def _digits(steps: object = 4, guidance: object = None, seed: object = 0) -> Callable[[Path, Path], object]:
    """An API call of the digits pipeline that must fail on a number before anything is loaded or compiled."""
    from perflow_jax.pipelines.digits import DigitsPipeline

    pipe = DigitsPipeline({}, {"num_time_windows": 1})
    return lambda w, t: pipe.sample_float([3], num_inference_steps=steps, guidance_scale=guidance, seed=seed)


def _start_step(work: Path, tiny: Path) -> object:
    from perflow_jax import sampling, schedulers

    sched = schedulers.get("perflow")
    state = sched.set_timesteps(4)
    return sampling.sample(sched, state, lambda x, t, i: x, np.zeros((1, 2), np.float32), start_step=1.5)


def _load_delta(file: str) -> Callable[[Path, Path], object]:
    from perflow_jax.delta import load_delta

    return lambda w, t: load_delta(w / file, {})


def _load_lora(file: str) -> Callable[[Path, Path], object]:
    from perflow_jax.lora import load_lora

    return lambda w, t: load_lora(w / file)


def _merge_lora_scale(work: Path, tiny: Path) -> object:
    from perflow_jax.lora import LoRA, merge_loras

    return merge_loras(None, [(LoRA(str(work / "style.safetensors"), "diffusers", {}), float("nan"))])


def _merge_overflow(work: Path, tiny: Path) -> object:
    from perflow_jax.delta import merge

    return merge({"conv": {"kernel": np.full((2,), 3e38, np.float32)}},
                 {"conv": {"kernel": np.full((2,), 3e38, np.float32)}})


def _scheduler(name: str, **fields: object) -> Callable[[Path, Path], object]:
    from perflow_jax import schedulers

    return lambda w, t: schedulers.get(name, **fields)


def _perflow_steps(n: int, **fields: object) -> Callable[[Path, Path], object]:
    from perflow_jax.schedulers import perflow

    return lambda w, t: perflow.set_timesteps(perflow.PeRFlowConfig(**fields), n)


def _load_tokenizer(work: Path, tiny: Path) -> object:
    from perflow_jax.models.components import load_tokenizer

    return load_tokenizer(str(work / "sd" / "tokenizer"))


_SAMPLE_TINY = ("sample", "--model", "{tiny}", "--prompt", "a cat", "--out", "{out}")
_SAMPLE_COPY = ("sample", "--model", "{w}/sd", "--prompt", "a cat", "--out", "{out}")
_NAN_DELTA = _tensors("nan.safetensors", conv_in__weight=np.array([1.0, np.nan], np.float32))

NUMBER_ROWS: list[Row] = [
    # 1. PeRFlow step counts beyond what the windows hold (timestep 0 in the last window divides by zero)
    Row("digits-steps-1001", r"num_inference_steps=1001 is too many .* at most 1000 steps",
        argv=("sample", "--model", "digits", "--prompt", "3", "--steps", "1001", "--out", "{out}")),
    Row("sd-steps-10000", r"num_inference_steps=10000 is too many .* at most 1003 steps",
        argv=(*_SAMPLE_TINY, "--steps", "10000")),
    Row("perflow-set-timesteps-1004", r"at most 1003 steps", call=_perflow_steps(1004)),
    Row("perflow-windows-too-many", r"num_time_windows=1001 is too many",
        call=_perflow_steps(4, num_time_windows=1001)),
    # 2. guidance on digits: finite and ≥ 0, as in the SD pipeline
    Row("digits-guidance-nan", r"guidance_scale must be a finite number, got nan",
        argv=("sample", "--model", "digits", "--prompt", "3", "--guidance", "nan", "--out", "{out}")),
    Row("digits-guidance-inf", r"guidance_scale must be a finite number, got inf",
        argv=("sample", "--model", "digits-teacher", "--prompt", "3", "--guidance", "inf", "--out", "{out}")),
    Row("digits-guidance-negative", r"guidance_scale must be a finite number ≥ 0, got -1.0",
        call=_digits(guidance=-1.0)),
    # 3. LoRA scales, ΔW and LoRA tensors: finite floats only (float32 overflow included)
    Row("lora-scale-nan", r"scale of LoRA '.*style.safetensors' must be a finite number, got nan",
        argv=(*_SAMPLE_TINY, "--lora", "{w}/style.safetensors:nan"),
        setup=_tensors("style.safetensors", w=np.ones(2, np.float32))),
    Row("lora-scale-inf-convert", r"scale of LoRA '.*style.safetensors' must be a finite number, got inf",
        argv=("convert", "{tiny}", "{out}", "--lora", "{w}/style.safetensors:inf"),
        setup=_tensors("style.safetensors", w=np.ones(2, np.float32))),
    Row("lora-merge-scale-nan", r"scale of LoRA '.*style.safetensors' must be a finite number", call=_merge_lora_scale),
    Row("delta-nan-cli", r"nan.safetensors': tensor 'conv_in.weight' holds NaN or infinite values",
        argv=(*_SAMPLE_TINY, "--delta", "{w}/nan.safetensors"), setup=_NAN_DELTA),
    Row("delta-inf", r"tensor 'b' holds NaN or infinite values", call=_load_delta("inf.safetensors"),
        setup=_tensors("inf.safetensors", b=np.array([np.inf], np.float16))),
    Row("delta-bool", r"tensor 'b' has dtype bool; it must be floating point", call=_load_delta("bool.safetensors"),
        setup=_tensors("bool.safetensors", b=np.ones(3, bool))),
    Row("delta-int", r"tensor 'b' has dtype int32; it must be floating point", call=_load_delta("int.safetensors"),
        setup=_tensors("int.safetensors", b=np.ones(3, np.int32))),
    Row("delta-float64-overflow", r"tensor 'b' holds values beyond float32's range",
        call=_load_delta("big.safetensors"), setup=_tensors("big.safetensors", b=np.array([1e300], np.float64))),
    Row("delta-merge-overflow", r"conv/kernel has NaN or infinite values after the merge", call=_merge_overflow),
    Row("lora-nan", r"tensor 'unet.a.lora_A.weight' holds NaN", call=_load_lora("nan.safetensors"),
        setup=_tensors("nan.safetensors", unet__a__lora_A__weight=np.array([[np.nan]], np.float32),
                                         unet__a__lora_B__weight=np.ones((1, 1), np.float32))),
    Row("lora-bool", r"tensor 'unet.a.lora_B.weight' has dtype bool", call=_load_lora("bool.safetensors"),
        setup=_tensors("bool.safetensors", unet__a__lora_A__weight=np.ones((1, 1), np.float32),
                                         unet__a__lora_B__weight=np.ones((1, 1), bool))),
    # 4. scheduler configs: beta_start ≤ beta_end, finite floats, numbers not strings
    Row("beta-start-above-end", r"beta_start=0.02 exceeds beta_end=0.01",
        call=_scheduler("ddim", beta_start=0.02, beta_end=0.01)),
    Row("perflow-beta-start-above-end", r"exceeds beta_end", call=_scheduler("perflow", beta_start=0.5, beta_end=0.1)),
    Row("scheduler-eta-inf", r"DDIMConfig.eta must be a finite number, got inf", call=_scheduler("ddim", eta=np.inf)),
    Row("perflow-t-clean-nan", r"PeRFlowConfig.t_clean must be a finite number",
        call=_scheduler("perflow", t_clean=np.nan)),
    Row("scheduler-beta-string", r"beta_start must be a number, got str", raises=TypeError,
        call=_scheduler("euler", beta_start="0.001")),
    # 5. step counts: NumPy integers are accepted everywhere (test_numbers_numpy_int_steps), floats and bools refused
    Row("digits-steps-float", r"num_inference_steps must be an integer, got float", raises=TypeError,
        call=_digits(steps=4.0)),
    Row("digits-steps-bool", r"num_inference_steps must be an integer, got bool", raises=TypeError,
        call=_digits(steps=True)),
    # 6. sampling.sample's start_step
    Row("sample-start-step-float", r"start_step must be an integer, got float 1.5", raises=TypeError, call=_start_step),
    # 7. model configs and tokenizers
    Row("unet-cross-attention-null", r"unet/config.json': UNet config cross_attention_dim must be a positive integer",
        argv=_SAMPLE_COPY, setup=_model_copy(_edit_json("unet/config.json", cross_attention_dim=None))),
    Row("vae-scaling-factor-string", r"vae/config.json': VAEConfig.scaling_factor must be a number",
        argv=_SAMPLE_COPY, setup=_model_copy(_edit_json("vae/config.json", scaling_factor="0.18"))),
    Row("clip-layer-norm-eps-nan", r"text_encoder/config.json': CLIPTextConfig.layer_norm_eps must be a finite",
        argv=_SAMPLE_COPY, setup=_model_copy(_edit_json("text_encoder/config.json", layer_norm_eps=float("nan")))),
    Row("tokenizer-vocab-broken", r"tokenizer/vocab.json' is not valid JSON",
        argv=_SAMPLE_COPY, setup=_model_copy(_write("tokenizer/vocab.json", '{"a": 1,'))),
    Row("tokenizer-merges-broken", r"tokenizer/merges.txt' line 2 is not a merge", call=_load_tokenizer,
        setup=_model_copy(_write("tokenizer/merges.txt", "#version: 0.2\nabc\n"))),
    Row("tokenizer-max-length-1e30", r"model_max_length=1e\+30 is not a usable length", call=_load_tokenizer,
        setup=_model_copy(_edit_json("tokenizer/tokenizer_config.json", model_max_length=1e30))),
    Row("tokenizer-max-length-nan", r"model_max_length must be a positive integer", call=_load_tokenizer,
        setup=_model_copy(_edit_json("tokenizer/tokenizer_config.json", model_max_length=float("nan")))),
    # 8. an unreadable ΔW file is not blamed on the model family
    Row("delta-truncated", r"(?s)\A(?!.*model family).*Could not read '.*trunc.safetensors' as safetensors.*truncated",
        argv=(*_SAMPLE_TINY, "--delta", "{w}/trunc.safetensors"), setup=_truncated_delta),
    # 9. digits seeds: ints in [0, 2**32)
    Row("digits-seed-negative", r"seed must be an integer in \[0, 4294967295\], got -1", call=_digits(seed=-1)),
    Row("digits-seed-too-big", r"seed must be an integer in \[0, 4294967295\], got 4294967296",
        call=_digits(seed=2**32)),
    Row("digits-seed-float", r"seed must be an integer, got float", raises=TypeError, call=_digits(seed=1.0)),
]


def test_numbers_numpy_int_steps(tiny: Path) -> None:
    """Both pipelines take NumPy integers for step counts (as the schedulers do) and refuse floats and bools."""
    from perflow_jax.pipelines import StableDiffusionPipeline
    from perflow_jax.pipelines.digits import DigitsPipeline

    digits = DigitsPipeline({}, {"num_time_windows": 1})
    seen = []
    digits._sampler = lambda sched, steps, batch: seen.append(steps) or (lambda *a: np.zeros((batch, 1, 8, 8)))
    digits.sample_float([3], num_inference_steps=np.int64(4), guidance_scale=np.float32(2.0), seed=np.uint32(7))
    assert seen == [4] and type(seen[0]) is int
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny))
    request = pipe.build_request("a cat", num_inference_steps=np.int64(4), seed=np.int64(-3))  # compiles nothing
    assert request.spec.num_inference_steps == 4 and type(request.spec.num_inference_steps) is int
    for bad in (4.0, True):
        with pytest.raises(TypeError, match="num_inference_steps must be an int"):
            pipe.build_request("a cat", num_inference_steps=bad)
    for bad, match in ((float("nan"), "must be a finite number"), ("2", "must be a number"),
                       (-1.0, "must be a finite number ≥ 0")):
        with pytest.raises(ValueError, match=f"guidance_scale {match}"):
            pipe.build_request("a cat", guidance_scale=bad)


def test_numbers_tokenizer_max_length_capped(tiny: Path, tmp_path: Path) -> None:
    """transformers' "unset" model_max_length (1e30, or a value above the text encoder's positions) is capped to
    the text encoder's max_position_embeddings when a pipeline folder is loaded."""
    from perflow_jax.models.components import load_pipeline_components

    shutil.copytree(tiny, tmp_path / "sd")
    _edit_json("tokenizer/tokenizer_config.json", model_max_length=1e30)(tmp_path / "sd")
    comps = load_pipeline_components(str(tmp_path / "sd"))
    assert comps.tokenizer.model_max_length == comps.text_encoder_config.max_position_embeddings


# Training: configs, resume under a changed config, non-finite losses, a default install.
TRAINING_ROWS: list[Row] = [
]

ROWS = FILE_ROWS + NUMBER_ROWS + TRAINING_ROWS


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny SD1-style diffusers folder the rows may read (never write)."""
    root = tmp_path_factory.mktemp("bad_input")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        make_tiny_pipeline(str(root / "sd"), "sd15")
    finally:
        torch.set_num_threads(threads)
    shutil.rmtree(root / "sd" / "_tok", ignore_errors=True)
    return root / "sd"


def test_row_ids_are_unique() -> None:
    ids = [r.id for r in ROWS]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input(row: Row, tmp_path: Path, tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_row(row, tmp_path / "w", tiny, capsys)
