"""Prompt files for generation jobs: ``.txt``, ``.jsonl`` and ``.csv``, read as a stream (a file of 10⁶ prompts
never sits in memory), every record checked where it is read, with errors naming ``FILE:LINE``.

- ``.txt``: one prompt per line (blank lines are skipped; a prompt may not be empty).
- ``.jsonl``: one JSON object per line with the prompt under ``prompt`` (or `column`) and optional
  ``negative_prompt``, ``seed``, ``guidance_scale``, ``num_images`` and ``id`` (blank lines are skipped).
- ``.csv``: a header row, the prompt in column `column` (default ``prompt``); optional columns as for JSONL.

Prompts are numbered 0, 1, ... in file order (:attr:`Prompt.index`). :func:`prompt_key` gives each prompt the
integer its images' noise is derived from: the index, or a hash of its ``id`` when it has one, so that a prompt
keeps its images when others are added or removed around it.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Iterator
from typing import Any

from perflow_jax import values

FORMATS = (".txt", ".jsonl", ".csv")
OPTIONAL_FIELDS = ("negative_prompt", "seed", "guidance_scale", "num_images", "id")


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One prompt record; fields not given in the file are None (the job's defaults apply).

    Attributes:
      index: 0-based position among the file's prompts.
      line: 1-based line of the record in the file (for error messages).
      prompt, negative_prompt: the texts.
      seed: the prompt's own seed in [0, 2**32), or None.
      guidance_scale: the prompt's own CFG scale (finite, ≥ 0), or None.
      num_images: the prompt's own image count (≥ 1), or None.
      id: the prompt's own id (a string or an integer, as written), or None.
    """

    index: int
    line: int
    prompt: str
    negative_prompt: str | None = None
    seed: int | None = None
    guidance_scale: float | None = None
    num_images: int | None = None
    id: str | int | None = None


@dataclasses.dataclass(frozen=True)
class PromptFileSummary:
    """What a full pass over a prompt file found (see :func:`summarize`).

    Attributes:
      num_prompts: records in the file.
      num_images: images of the job (each prompt's ``num_images`` or `images_per_prompt`).
      sha256: digest of the file's bytes (a resumed job must read the same file).
      any_negative: some record has a ``negative_prompt``.
      max_guidance: the largest per-prompt ``guidance_scale`` (None when no record has one).
    """

    num_prompts: int
    num_images: int
    sha256: str
    any_negative: bool
    max_guidance: float | None


def prompt_key(p: Prompt) -> int:
    """The uint32 a prompt's noise is derived from: the first 4 bytes (big-endian) of SHA-256 of ``str(id)``
    in UTF-8 when the prompt has an ``id``, else its 0-based index in the file."""
    if p.id is None:
        return p.index % 2**32
    return int.from_bytes(hashlib.sha256(str(p.id).encode("utf-8")).digest()[:4], "big")


def file_format(path: str) -> str:
    """The prompt file's format from its extension; anything else is a ValueError naming the file."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise ValueError(f"--prompts {path!r}: unknown prompt file type {ext or '(none)'!r}; use .txt (one prompt "
                         "per line), .jsonl or .csv.")
    return ext


def read_prompts(path: str, column: str = "prompt") -> Iterator[Prompt]:
    """Stream the prompt records of `path`, each checked; a bad record raises ValueError naming ``FILE:LINE``
    and what to fix. An empty file (no prompts) is an error too."""
    ext = file_format(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--prompts {path!r} does not exist.")
    rows = {".txt": _txt_rows, ".jsonl": _jsonl_rows, ".csv": _csv_rows}[ext](path, column)
    index = 0
    for line, fields in rows:
        yield _record(path, line, index, fields, column, from_csv=ext == ".csv")
        index += 1
    if index == 0:
        raise ValueError(f"--prompts {path!r} holds no prompts; write one prompt per line (.txt), one JSON object "
                         "per line (.jsonl) or a header and rows (.csv).")


def summarize(path: str, column: str = "prompt", images_per_prompt: int = 1) -> PromptFileSummary:
    """Check every record of `path` in one streaming pass and count the job (before any device work)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    n = images = 0
    any_negative, max_guidance = False, None
    for p in read_prompts(path, column):
        n += 1
        images += p.num_images if p.num_images is not None else images_per_prompt
        any_negative |= p.negative_prompt is not None
        if p.guidance_scale is not None:
            max_guidance = p.guidance_scale if max_guidance is None else max(max_guidance, p.guidance_scale)
    return PromptFileSummary(n, images, digest.hexdigest(), any_negative, max_guidance)


# ----------------------------------------------------------------------------------------------------------
# Readers: (line, fields) per record
# ----------------------------------------------------------------------------------------------------------


def _lines(path: str) -> Iterator[tuple[int, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        line = 0
        try:
            for line, text in enumerate(f, start=1):  # noqa: B007 - `line` names the failing line below
                yield line, text.rstrip("\r\n")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}:{line + 1}: not UTF-8 text ({e.reason}); save the prompt file as UTF-8.") from e


def _txt_rows(path: str, column: str) -> Iterator[tuple[int, dict[str, Any]]]:
    for line, text in _lines(path):
        if text.strip():
            yield line, {column: text}


def _jsonl_rows(path: str, column: str) -> Iterator[tuple[int, dict[str, Any]]]:
    for line, text in _lines(path):
        if not text.strip():
            continue
        try:
            obj = json.loads(text, parse_constant=_no_constant)
        except ValueError as e:
            raise ValueError(f"{path}:{line}: not valid JSON ({e}); write one JSON object per line, e.g. "
                             f'{{"{column}": "a photo of a cat"}}.') from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{line}: a JSON {type(obj).__name__}, not an object; write one JSON object per "
                             f'line, e.g. {{"{column}": "a photo of a cat"}}.')
        yield line, obj


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _csv_rows(path: str, column: str) -> Iterator[tuple[int, dict[str, Any]]]:
    lines = _lines(path)
    physical = {"line": 0}

    def feed() -> Iterator[str]:
        for line, text in lines:
            physical["line"] = line
            yield text + "\n"

    reader = csv.DictReader(feed())
    try:
        header = reader.fieldnames
        if header is None:
            return
        if column not in header:
            raise ValueError(f"{path}:1: no column {column!r} in the header {header}; name the prompt column with "
                             "--prompt-column.")
        for row in reader:
            if None in row:
                raise ValueError(f"{path}:{physical['line']}: more fields than the header's {len(header)}; quote "
                                 "fields that contain commas.")
            yield physical["line"], {k: v for k, v in row.items() if v not in (None, "") or k == column}
    except csv.Error as e:
        raise ValueError(f"{path}:{physical['line']}: not valid CSV ({e}).") from None


# ----------------------------------------------------------------------------------------------------------
# One record
# ----------------------------------------------------------------------------------------------------------


def _record(path: str, line: int, index: int, fields: dict[str, Any], column: str, *, from_csv: bool) -> Prompt:
    where = f"{path}:{line}"
    text = fields.get(column)
    if text is None:
        raise ValueError(f"{where}: no {column!r} field; every record needs its prompt text (or name its field with "
                         "--prompt-column).")
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where}: the prompt {column!r} must be a non-empty string, got {text!r}.")
    # CSV fields are strings: numbers are parsed here (ids stay text).
    get = {k: _parse(where, k, fields[k]) if from_csv and k != "id" else fields[k]
           for k in OPTIONAL_FIELDS if k in fields and fields[k] is not None}
    negative = get.get("negative_prompt")
    if negative is not None and not isinstance(negative, str):
        raise ValueError(f"{where}: negative_prompt must be a string, got {negative!r}.")
    try:
        seed = values.check_seed("seed", get["seed"]) if "seed" in get else None
        guidance = (values.check_float("guidance_scale", get["guidance_scale"], min_value=0.0)
                    if "guidance_scale" in get else None)
        num = values.check_int("num_images", get["num_images"], min_value=1) if "num_images" in get else None
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    pid = get.get("id")
    if pid is not None and (isinstance(pid, bool) or not isinstance(pid, str | int)):
        raise ValueError(f"{where}: id must be a string or an integer, got {pid!r}.")
    return Prompt(index=index, line=line, prompt=text, negative_prompt=negative, seed=seed, guidance_scale=guidance,
                  num_images=num, id=pid)


def _parse(where: str, key: str, text: Any) -> Any:
    """A CSV field as the JSON value it spells (numbers), else the text itself."""
    if key == "negative_prompt" or not isinstance(text, str):
        return text
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except ValueError:
        raise ValueError(f"{where}: {key} must be a number, got {text!r}.") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where}: {key} must be a finite number, got {text!r}.")
    return value


__all__ = ["FORMATS", "Prompt", "PromptFileSummary", "file_format", "prompt_key", "read_prompts", "summarize"]
