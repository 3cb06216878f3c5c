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
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

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
NUMBER_ROWS: list[Row] = [
]

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
    Row("train-output-dir-under-file", r"lies under '.*f\.txt', which is a file",
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
]


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
