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
