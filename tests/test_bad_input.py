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


def _files(files: dict[str, str]) -> Callable[[Path, Path], None]:
    """A setup writing text files under the work folder: ``{"a/b.txt": "text"}``."""
    def setup(work: Path, tiny: Path) -> None:
        for name, text in files.items():
            path = work / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    return setup


def _model_beside_keep(work: Path, tiny: Path) -> None:
    """The issue's repro: ``p/sd`` a model folder with the user's ``p/keep.txt`` beside it."""
    shutil.copytree(tiny, work / "p" / "sd")
    (work / "p" / "keep.txt").write_text("hi")
    (work / "p" / "delta.safetensors").write_text("not read")


def _api_convert_into_parent(work: Path, tiny: Path) -> None:
    from perflow_jax.models.components import convert_to_flax

    convert_to_flax(work / "p" / "sd", work / "p", overwrite=True, progress=False)


def _api_save_pipeline_into_parent(work: Path, tiny: Path) -> None:
    from perflow_jax.models.components import load_pipeline_components
    from perflow_jax.models.export import save_pipeline

    save_pipeline(load_pipeline_components(work / "p" / "sd"), work / "p", overwrite=True)


def _api_write_json_nan(work: Path, tiny: Path) -> None:
    from perflow_jax.io import write_json

    write_json(work / "out" / "scheduler_config.json", {"beta_start": 0.1, "betas": [1.0, float("nan")]})


_SD = ("sample", "--model", "{tiny}", "--prompt", "x")
_DIGITS = ("sample", "--model", "digits", "--prompt", "1")

FILE_ROWS: list[Row] = [
    Row("convert-missing-source", r"is neither an existing file or folder", argv=("convert", "{w}/nope", "{out}")),
    # 1. Data loss: a destination that is, contains or lies inside an input is refused up front, even with
    # --overwrite; --overwrite replaces only an empty folder or one perflow-jax wrote.
    Row("convert-dst-is-src", r"is the source", argv=("convert", "{w}/p/sd", "{w}/p/sd", "--overwrite"),
        setup=_model_beside_keep),
    Row("convert-dst-parent-of-src", r"contains the source .*choose another destination",
        argv=("convert", "{w}/p/sd", "{w}/p", "--overwrite"), setup=_model_beside_keep),
    Row("convert-dst-inside-src", r"lies inside the source", argv=("convert", "{w}/p/sd", "{w}/p/sd/flax"),
        setup=_model_beside_keep),
    Row("convert-dst-contains-delta", r"contains the source .*delta\.safetensors",
        argv=("convert", "{tiny}", "{w}/p", "--delta", "{w}/p/delta.safetensors", "--overwrite"),
        setup=_model_beside_keep),
    Row("convert-overwrite-foreign-folder", r"holds files perflow-jax did not write \('keep\.txt'\); --overwrite",
        argv=("convert", "{tiny}", "{w}/dst", "--overwrite"), setup=_files({"dst/keep.txt": "mine"})),
    Row("convert-overwrite-file", r"is an existing file, not a folder",
        argv=("convert", "{tiny}", "{w}/dst.txt", "--overwrite"), setup=_files({"dst.txt": "mine"})),
    Row("convert-dst-under-file", r"is a file, not a folder", argv=("convert", "{tiny}", "{w}/f/sub"),
        setup=_files({"f": "a file"})),
    Row("convert-empty-dst", r"empty path", argv=("convert", "{tiny}", "")),
    Row("api-convert-into-parent", r"contains the source", call=_api_convert_into_parent, setup=_model_beside_keep),
    Row("api-save-pipeline-into-parent", r"contains the source", call=_api_save_pipeline_into_parent,
        setup=_model_beside_keep),
    # 2. --out is checked before any work (before the model loads); nothing is written.
    Row("out-empty", r"--out is empty", argv=(*_SD, "--out", "")),
    Row("out-empty-digits", r"--out is empty", argv=(*_DIGITS, "--out", "")),
    Row("out-is-file", r"--out .* is a file, not a folder", argv=(*_SD, "--out", "{w}/f"), setup=_files({"f": "x"})),
    Row("out-under-file", r"--out .* lies under .*which is a file", argv=(*_DIGITS, "--out", "{w}/f/o"),
        setup=_files({"f": "x"})),
    Row("out-holds-foreign-image", r"already holds 'image_0000\.png', which perflow-jax did not write",
        argv=(*_DIGITS, "--out", "{w}/o"), setup=_files({"o/image_0000.png": "mine"})),
    Row("out-foreign-manifest", r"holds a \.perflow-jax-manifest\.json that perflow-jax did not write",
        argv=(*_DIGITS, "--out", "{w}/o"), setup=_files({"o/.perflow-jax-manifest.json": "[]"})),
    # 3. Tracebacks that are now one-line errors.
    Row("digits-seed-negative", r"--seed: must be an integer in \[0, 2\*\*32\)",
        argv=(*_DIGITS, "--seed", "-1", "--out", "{out}")),
    Row("sd-seed-too-large", r"--seed: must be an integer in \[0, 2\*\*32\)",
        argv=(*_SD, "--seed", str(2**32), "--out", "{out}")),
    Row("init-image-not-an-image", r"--init-image .*img\.png' is not an image file PIL can read",
        argv=(*_SD, "--init-image", "{w}/img.png", "--out", "{out}"), setup=_files({"img.png": "not a png"})),
    Row("config-json-list", r"config\.json' holds a JSON list; expected a JSON object",
        argv=("convert", "{w}/unet", "{out}"), setup=_files({"unet/config.json": "[1, 2]"})),
    Row("config-json-invalid-names-file", r"unet/config\.json' is not valid JSON",
        argv=("convert", "{w}/unet", "{out}"), setup=_files({"unet/config.json": "{oops"})),
    Row("model-index-list", r"model_index\.json' holds a JSON list; expected a JSON object",
        argv=("sample", "--model", "{w}/m", "--prompt", "x", "--out", "{out}"),
        setup=_files({"m/model_index.json": "[]"})),
    # 7. Smaller: the CLI names --overwrite; NaN is never written into JSON; digits refuses options it ignored.
    Row("convert-exists-says-overwrite-flag", r"already exists; choose another destination or pass --overwrite",
        argv=("convert", "{tiny}", "{w}/dst"), setup=_files({"dst/a": "x"})),
    Row("write-json-nan", r"betas\[1\] is not a finite number", call=_api_write_json_nan),
    Row("digits-height", r"--height is not used by the built-in digits model",
        argv=(*_DIGITS, "--height", "8", "--out", "{out}")),
    Row("digits-dtype-negative-prompt", r"--negative-prompt, --dtype are not used by the built-in digits model",
        argv=(*_DIGITS, "--dtype", "bf16", "--negative-prompt", "2", "--out", "{out}")),
    Row("sd-strength-without-init-image", r"--strength applies to img2img only",
        argv=(*_SD, "--strength", "0.5", "--out", "{out}")),
]

# Files, folders and the CLI: the behaviours (not errors) of the area.


def test_files_out_not_writable(tmp_path: Path, tiny: Path, capsys: pytest.CaptureFixture[str],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    """2. A read-only --out folder is refused before the model loads."""
    work = tmp_path / "w"
    ro = work / "ro"

    def setup(w: Path, t: Path) -> None:
        ro.mkdir(parents=True)
        ro.chmod(0o555)

    if os.geteuid() == 0:  # root may write anywhere: stand in for the kernel's answer to a non-root user
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == ro else real_access(p, mode, **kw))
    try:
        run_row(Row("out-read-only", r"--out .*ro/o'.* is not writable", argv=(*_DIGITS, "--out", "{w}/ro/o"),
                    setup=setup), work, tiny, capsys)
    finally:
        ro.chmod(0o755)


def test_files_rerun_replaces_only_own_images(tmp_path: Path) -> None:
    """2, 9. A rerun into the same folder replaces the images the last run wrote (none stale when it writes
    fewer) and touches no other file; a run killed midway is still cleaned up by the next one."""
    import numpy as np

    from perflow_jax.images import GRID, OutputFolder, save_png
    from perflow_jax.io import MANIFEST

    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "image_0007.png").write_text("mine too: beyond this run's names")
    imgs = np.zeros((6, 4, 4), np.uint8)

    def run(n: int, finish: bool = True) -> list[str]:
        f = OutputFolder(out, n)
        f.save(imgs[:n])
        save_png(imgs[0], f.extra_path(GRID))
        if finish:
            f.finish()
        return sorted(os.listdir(out))

    mine = ["image_0007.png", "notes.txt"]
    assert run(3) == sorted([MANIFEST, GRID, "image_0000.png", "image_0001.png", "image_0002.png", *mine])
    assert run(3) == sorted([MANIFEST, GRID, "image_0000.png", "image_0001.png", "image_0002.png", *mine])
    assert run(1) == sorted([MANIFEST, GRID, "image_0000.png", *mine])
    run(5, finish=False)  # killed before it finished: its manifest already lists all five
    assert run(2) == sorted([MANIFEST, GRID, "image_0000.png", "image_0001.png", *mine])
    assert (out / "notes.txt").read_text() == "mine"
    with pytest.raises(FileExistsError, match="image_0007.png"):  # a run of 8 would replace the user's file
        OutputFolder(out, 8)


def test_files_modes_follow_umask(tmp_path: Path, tiny: Path) -> None:
    """5. Converted folders, PNGs and JSON get the process umask's modes (0644 / 0755 under umask 022)."""
    import numpy as np

    from perflow_jax.images import save_png
    from perflow_jax.io import write_json
    from perflow_jax.models.components import convert_to_flax

    old = os.umask(0o022)
    try:
        convert_to_flax(tiny, tmp_path / "flax", progress=False)
        save_png(np.zeros((2, 2), np.uint8), tmp_path / "png" / "a.png")
        write_json(tmp_path / "json" / "c.json", {"a": 1})
    finally:
        os.umask(old)
    seen = 0
    for sub in ("flax", "png", "json"):
        for root, _dirs, files in os.walk(tmp_path / sub):
            assert os.stat(root).st_mode & 0o777 == 0o755, root
            for name in files:
                assert os.stat(os.path.join(root, name)).st_mode & 0o777 == 0o644, os.path.join(root, name)
                seen += 1
    assert seen > 10


def test_files_stale_temps_of_dead_processes_removed(tmp_path: Path, tiny: Path) -> None:
    """6. A later write into a folder removes the temps of dead processes of this host, and only those."""
    import subprocess
    import sys

    from perflow_jax import io
    from perflow_jax.models.components import convert_to_flax

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host, parent = io._host(), tmp_path / "models"
    stale_dir = parent / f".vae_flax.tmp-{host}-{dead.pid}-0123abcd"
    stale_file = parent / f".image_0000.png.tmp-{host}-{dead.pid}-89abcdef"
    live = parent / f".vae_flax.tmp-{host}-{os.getpid()}-0123abce"
    other_host = parent / f".vae_flax.tmp-other-host.example-{dead.pid}-0123abcf"
    not_ours = parent / ".vae_flax.k2j3h4x"
    for d in (stale_dir, live, other_host, not_ours):
        (d / "unet").mkdir(parents=True)
        (d / "unet" / "flax_model.msgpack").write_text("partial")
    stale_file.write_text("partial")
    convert_to_flax(tiny / "vae", parent / "vae_flax", progress=False)
    assert sorted(p.name for p in parent.iterdir()) == sorted([live.name, other_host.name, not_ours.name, "vae_flax"])
    assert (live / "unet" / "flax_model.msgpack").read_text() == "partial"


def test_files_overwrite_replaces_only_own_model_folder(tmp_path: Path, tiny: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """1. --overwrite replaces a folder perflow-jax wrote, or an empty one; a user's file added to it stops it."""
    dst = tmp_path / "vae_flax"
    argv = ["--no-cache", "convert", str(tiny / "vae"), str(dst)]
    assert main(argv) == 0, capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0, capsys.readouterr().err
    (dst / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main([*argv, "--overwrite"]) == 2
    assert "holds files perflow-jax did not write ('notes.txt')" in capsys.readouterr().err
    assert (dst / "notes.txt").read_text() == "mine" and (dst / "flax_model.msgpack").is_file()
    (tmp_path / "empty").mkdir()
    assert main(["--no-cache", "convert", str(tiny / "vae"), str(tmp_path / "empty"), "--overwrite"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["empty", "vae_flax"]  # no temp left behind


def test_files_huge_num_images_runs_in_batches(tmp_path: Path, tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """4. --num-images 10000000 is generated batch by batch (default batch from the memory estimate), never in
    one allocation; image i keeps its index in the run (first_index), so the split does not change the images."""
    import numpy as np

    from perflow_jax.pipelines import digits
    from perflow_jax.pipelines import stable_diffusion as sd

    class Stop(Exception):
        pass

    calls: list[tuple[int, int, int]] = []

    def generate(self, request):  # noqa: ANN001, ANN202
        calls.append((request.spec.batch, request.num_images, int(np.asarray(request.inputs.index)[0])))
        if len(calls) == 3:
            raise Stop
        return np.zeros((request.num_images, 32, 32, 3), np.uint8)

    monkeypatch.setattr(sd.StableDiffusionPipeline, "generate", generate)
    monkeypatch.setattr(sd, "DEFAULT_BATCH_MEMORY", 1)  # one image per batch
    with pytest.raises(Stop):
        main(["--no-cache", *(a.format(tiny=tiny) for a in _SD), "--num-images", "10000000", "--height", "32",
              "--width", "32", "--out", str(tmp_path / "o")])
    assert calls == [(1, 1, 0), (1, 1, 1), (1, 1, 2)]

    sizes: list[int] = []

    def call(self, labels, **kw):  # noqa: ANN001, ANN003, ANN202
        sizes.append(len(labels))
        if len(sizes) == 3:
            raise Stop
        return np.zeros((len(labels), 8, 8), np.uint8)

    monkeypatch.setattr(digits.DigitsPipeline, "__call__", call)
    monkeypatch.setattr(digits.DigitsPipeline, "from_builtin", classmethod(lambda cls, which: cls(None, {})))
    with pytest.raises(Stop):
        main(["--no-cache", *_DIGITS, "--num-images", "10000000", "--out", str(tmp_path / "d")])
    big = digits.DEFAULT_MAX_BATCH
    assert sizes == [10_000_000 % big, big, big]  # compile both batch sizes, then run the first batch


def test_files_memory_estimate_is_the_stated_one() -> None:
    """4. The per-image memory estimate behind the default --batch-size is the one documented."""
    from types import SimpleNamespace

    from perflow_jax import sharding
    from perflow_jax.models.unet import UNetConfig
    from perflow_jax.models.vae import VAEConfig
    from perflow_jax.pipelines import StableDiffusionPipeline

    configs = Path(__file__).resolve().parent.parent / "perflow_jax" / "models" / "configs"
    for family, size, gib in (("sd15", 512, 1.46875), ("sd15", 768, 6.1171875), ("sdxl", 1024, 3.5)):
        fake = SimpleNamespace(
            components=SimpleNamespace(unet_config=UNetConfig.from_json(configs / family / "unet.json"),
                                       vae_config=VAEConfig.from_json(configs / family / "vae.json")),
            vae_scale_factor=8, unet=SimpleNamespace(attention_chunk_size=None), mesh=sharding.data_mesh(),
            _check_size=lambda h, w: (h, w))
        fake.estimate_image_bytes = lambda h, w, fake=fake: StableDiffusionPipeline.estimate_image_bytes(fake, h, w)
        assert StableDiffusionPipeline.estimate_image_bytes(fake, size, size) == gib * 2**30
        per_device = max(1, int(8 // gib))  # the 8 GiB default budget where JAX reports no device memory
        assert StableDiffusionPipeline.default_batch_size(fake, size, size) == per_device * fake.mesh.size


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
    Row("digits-steps-1004", r"num_inference_steps=1004 is too many .* at most 1003 steps",
        argv=("sample", "--model", "digits", "--prompt", "3", "--steps", "1004", "--out", "{out}")),
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
    Row("digits-api-seed-negative", r"seed must be an integer in \[0, 4294967295\], got -1", call=_digits(seed=-1)),
    Row("digits-api-seed-too-big", r"seed must be an integer in \[0, 4294967295\], got 4294967296",
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
# The behaviours that need real training (a diverging run stops and keeps its last good checkpoint; an allowed
# change resumes; `perflow-jax train` on the digits model without scikit-learn/matplotlib) are in
# tests/test_training.py: test_training_nonfinite_loss_and_config_change_on_resume, test_training_cli_digits_*.
_DIGITS_YAML = Path(__file__).resolve().parent.parent / "configs" / "digits_perflow.yaml"


def _write(name: str, text: str) -> Callable[[Path, Path], None]:
    """A setup that writes the file `name` into the work folder ({w} in `text` is the work folder)."""
    return lambda work, tiny: (work / name).write_text(text.replace("{w}", str(work)), encoding="utf-8")


def _digits_yaml(work: Path, tiny: Path) -> None:
    shutil.copy(_DIGITS_YAML, work / "digits.yaml")


def _made_run(*overrides: str, stored: bool = True) -> Callable[[Path, Path], None]:
    """A setup: {w}/digits.yaml, and a run folder {w}/run whose checkpoints (a real orbax checkpoint at step 2
    of a stand-in state: the resume check reads no weights) belong to that config with `overrides`."""
    def setup(work: Path, tiny: Path) -> None:
        import json

        import numpy as np
        import orbax.checkpoint as ocp

        from perflow_jax.training import train as train_lib

        _digits_yaml(work, tiny)
        cfg = train_lib.load_config(str(work / "digits.yaml"), [f"output_dir={work / 'run'}", *overrides])
        ckpt = work / "run" / "checkpoints"
        manager = ocp.CheckpointManager(ckpt, options=ocp.CheckpointManagerOptions(
            create=True, enable_async_checkpointing=False))
        try:
            manager.save(2, args=ocp.args.StandardSave({"step": np.zeros((), np.int32)}))
            manager.wait_until_finished()
        finally:
            manager.close()
        if stored:
            (ckpt / train_lib.RUN_CONFIG).write_text(json.dumps(cfg), encoding="utf-8")

    return setup


_TRAIN = ("train", "--config", "{w}/digits.yaml")
_RUN = "output_dir={w}/run"

TRAINING_ROWS: list[Row] = [
    # Resume under a changed config: refused before anything is read or written, naming old → new.
    Row("train-resume-changed-lr", r"made with another config \(train\.learning_rate: 0\.0002 → 0\.001\).*"
        r"--allow-config-change train\.learning_rate", argv=(*_TRAIN, _RUN, "train.learning_rate=1e-3"),
        setup=_made_run()),
    Row("train-resume-changed-windows", r"perflow\.num_time_windows: 1 → 4; train\.learning_rate: 0\.0002 → 0\.001\)"
        r".*--allow-config-change perflow\.num_time_windows train\.learning_rate",
        argv=(*_TRAIN, _RUN, "perflow.num_time_windows=4", "train.learning_rate=1e-3",
              "--allow-config-change", "train.steps"), setup=_made_run()),
    Row("train-resume-partly-allowed", r"\(perflow\.num_time_windows: 1 → 2\)",
        argv=(*_TRAIN, _RUN, "--allow-config-change", "train.learning_rate", "perflow.num_time_windows=2",
              "train.learning_rate=1e-3"), setup=_made_run()),
    Row("train-resume-steps-below-checkpoint", r"train\.steps=1 is below the latest checkpoint, step 2",
        argv=(*_TRAIN, _RUN, "train.steps=1", "--allow-config-change", "*"), setup=_made_run()),
    Row("train-resume-no-stored-config", r"holds checkpoints \(step 2\) but no run_config\.json",
        argv=(*_TRAIN, _RUN, "train.steps=10"), setup=_made_run(stored=False)),
    Row("train-allow-unknown-key", r"'train\.lr' is not a config key",
        argv=(*_TRAIN, _RUN, "--allow-config-change", "train.lr"), setup=_made_run()),
    # Non-finite and out-of-range numbers: refused by validation, before any folder exists.
    Row("train-lr-inf", r"train\.learning_rate=inf: must be a finite number",
        argv=(*_TRAIN, "output_dir={out}", "train.learning_rate=inf"), setup=_digits_yaml),
    Row("train-lr-nan-yaml", r"train\.learning_rate=nan: must be a finite number",
        argv=("train", "--config", "{w}/c.yaml"), setup=_write("c.yaml", "output_dir: {w}/out\ntrain:\n"
                                                               "  learning_rate: .nan\n")),
    Row("train-lr-float32-overflow", r"train\.learning_rate=1e\+39: must be a finite number",
        argv=(*_TRAIN, "output_dir={out}", "train.learning_rate=1e39"), setup=_digits_yaml),
    Row("train-guidance-inf", r"reflow\.guidance_scale=inf: must be a finite number",
        argv=(*_TRAIN, "output_dir={out}", "reflow.guidance_scale=1e400"), setup=_digits_yaml),
    # YAML and type errors: one line naming the file and line, or the key.
    Row("train-yaml-syntax", r"c\.yaml:4:1: invalid YAML: .*flow sequence that starts at line 3, column 10",
        argv=("train", "--config", "{w}/c.yaml"), setup=_write("c.yaml", "output_dir: out\ntrain:\n  steps: [1\n")),
    Row("train-yaml-python-tag", r"c\.yaml:1:\d+: YAML tags like !!python/\.\.\. are not allowed",
        argv=("train", "--config", "{w}/c.yaml"),
        setup=_write("c.yaml", 'output_dir: !!python/object/apply:os.system ["touch {w}/pwned"]\n')),
    Row("train-yaml-not-mapping", r"c\.yaml: the config must be a YAML mapping, got list",
        argv=("train", "--config", "{w}/c.yaml"), setup=_write("c.yaml", "- train\n- steps\n")),
    Row("train-output-dir-int", r"output_dir=123: must be a non-empty string path",
        argv=("train", "--config", "{w}/c.yaml"), setup=_write("c.yaml", "output_dir: 123\n")),
    Row("train-output-dir-under-file", r"output_dir=.*f\.txt' is a file, not a folder",
        argv=(*_TRAIN, "output_dir={w}/f.txt/run"),
        setup=lambda w, t: (_digits_yaml(w, t), (w / "f.txt").write_text("keep"))),
    Row("train-seed-negative", r"train\.seed=-1: must be an integer in \[0, ",
        argv=(*_TRAIN, "output_dir={out}", "train.seed=-1"), setup=_digits_yaml),
    Row("train-steps-float", r"train\.steps=2\.5: must be an integer",
        argv=(*_TRAIN, "output_dir={out}", "train.steps=2.5"), setup=_digits_yaml),
    Row("train-progress-not-bool", r"train\.progress='maybe': must be true or false",
        argv=(*_TRAIN, "output_dir={out}", "train.progress=maybe"), setup=_digits_yaml),
    Row("train-unet-config-int", r"model\.unet_config=123: must be a non-empty string",
        argv=("train", "--config", "{w}/c.yaml"),
        setup=_write("c.yaml", "output_dir: {w}/out\nmodel:\n  kind: unet\n  unet_config: 123\n")),
    Row("train-override-bad-yaml", r"override 'train\.steps=\[':1:\d+: invalid YAML",
        argv=(*_TRAIN, "output_dir={out}", "train.steps=["), setup=_digits_yaml),
    # Errors found while loading (data, teacher) still come before the output folder is created.
    Row("train-missing-npz-no-output", r"data\.path='.*nope\.npz' does not exist",
        argv=(*_TRAIN, "output_dir={out}", "data.kind=npz", "data.path={w}/nope.npz"), setup=_digits_yaml),
    Row("train-npz-not-a-zip", r"data\.path='.*x\.npz' is not an \.npz file",
        argv=(*_TRAIN, "output_dir={out}", "data.kind=npz", "data.path={w}/x.npz"),
        setup=lambda w, t: (_digits_yaml(w, t), (w / "x.npz").write_text("x"))),
    Row("train-missing-teacher-no-output", r"teacher\.weights='.*nope\.safetensors' does not exist",
        argv=(*_TRAIN, "output_dir={out}", "teacher.weights={w}/nope.safetensors"), setup=_digits_yaml),
    Row("train-prepared-path-not-prepared", r"data\.path='.*' is not a prepared data set .*perflow-jax prepare",
        argv=(*_TRAIN, "output_dir={out}", "data.kind=prepared", "data.path={w}"), setup=_digits_yaml),
    # perflow-jax prepare: inputs and --out checked before the model is loaded.
    Row("prepare-missing-input", r"Input '.*nope' does not exist",
        argv=("prepare", "{w}/nope", "--model", "{tiny}", "--out", "{out}")),
    Row("prepare-out-holds-other-files", r"--out '.*keep' is a folder that holds other files",
        argv=("prepare", "{w}/imgs", "--model", "{tiny}", "--out", "{w}/keep"),
        setup=lambda w, t: (_image_folder(w), (w / "keep").mkdir(), (w / "keep" / "k.txt").write_text("k"))),
    Row("prepare-input-without-images", r"holds no images .*metadata\.jsonl",
        argv=("prepare", "{w}/empty", "--model", "{tiny}", "--out", "{out}"),
        setup=lambda w, t: (w / "empty").mkdir()),
]


def _image_folder(work: Path) -> None:
    from tests.support.tiny_data import write_image_folder

    write_image_folder(str(work / "imgs"), 1)


def test_training_digits_data_needs_no_sklearn(monkeypatch: pytest.MonkeyPatch) -> None:
    """The digits data ships as an .npz: loading it (what `perflow-jax train` on digits does) needs no sklearn."""
    import sys

    from perflow_jax.pipelines import digits

    for name in [m for m in sys.modules if m == "sklearn" or m.startswith("sklearn.")] or ["sklearn"]:
        monkeypatch.setitem(sys.modules, name, None)
    x, y = digits.load_digits_data("train")
    assert x.shape == (1397, 1, 8, 8) and y.shape == (1397,)
    with pytest.raises(ValueError, match="needs scikit-learn"):
        digits.load_digits_data("train", seed=1)


def test_files_bench_without_pytorch(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`bench --no-torch` on a preset needs diffusers to build the random-weight model: a clear error, exit 2, when
    it is missing (with --model DIR the --no-torch run imports neither torch nor diffusers)."""
    import sys

    for name in ("torch", "diffusers"):
        monkeypatch.setitem(sys.modules, name, None)
    assert main(["bench", "--no-torch", "--preset", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "needs torch and diffusers, not installed here" in err and "--model DIR with --no-torch" in err


# Release layouts and repo ids: refused before any work, naming what to pass.
_TWO_VARIANTS = _files({"d/config.json": "{}", "d/diffusion_pytorch_model.v0-0.safetensors": "x",
                        "d/diffusion_pytorch_model.v0-1.safetensors": "x"})

RELEASE_ROWS: list[Row] = [
    Row("delta-several-variants", r"holds the ΔW variants \['v0-0', 'v0-1'\] .*--delta-variant",
        argv=("convert", "{tiny}", "{out}", "--delta", "{w}/d"), setup=_TWO_VARIANTS),
    Row("delta-variant-missing", r"holds no PeRFlow ΔW: .*diffusion_pytorch_model\.v9\.safetensors",
        argv=("convert", "{tiny}", "{out}", "--delta", "{w}/d", "--delta-variant", "v9"), setup=_TWO_VARIANTS),
    Row("delta-options-without-delta", r"describe a ΔW: pass --delta too",
        argv=("convert", "{tiny}", "{out}", "--delta-variant", "v0-1")),
    Row("sd-delta-base-without-merged", r"only used with --delta-is-merged",
        argv=(*_SD, "--delta", "{w}/d", "--delta-base", "{tiny}", "--out", "{out}"), setup=_TWO_VARIANTS),
    Row("digits-delta-variant", r"--delta \(and its options\), --lora, --base, --init-image, .* apply to Stable",
        argv=(*_DIGITS, "--delta-variant", "v0-1", "--out", "{out}")),
    Row("variant-in-no-folder", r"No model folder of .* has weights of variant 'v0-fix' \(unet, vae, text_encoder\)",
        argv=("convert", "{tiny}", "{out}", "--variant", "v0-fix")),
    Row("offline-repo-not-cached", r"'nobody/not-cached' is not a local folder and is not in the Hugging Face cache "
        r".*downloads are off \(HF_HUB_OFFLINE is set\)",
        argv=("sample", "--model", "nobody/not-cached", "--prompt", "x", "--out", "{out}")),
]

ROWS = FILE_ROWS + NUMBER_ROWS + TRAINING_ROWS + RELEASE_ROWS


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
