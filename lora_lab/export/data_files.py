"""The data an exported script trains on: builtin task rows or in-memory rows written as JSONL.

:func:`export_data` returns the ``DATA`` settings block of ``train.py`` (a file, a folder, a hub
dataset, or ``data/train.jsonl`` and ``data/eval.jsonl`` written beside the script with the same
train/eval split that :func:`lora_lab.prepare_dataset` makes), a description and the files written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import DataError
from ..hf.data.prepare import prompts_responses
from ..hf.data.sources import DATA_SUFFIXES, FILE_TYPES, load_columns
from ..specs import DataSpec

__all__ = ["export_data"]

DEFAULT_TASK = "builtin:next"  # the data when none is given: the easiest builtin task
TASK_ROWS = 1000


def _rows_of(cols: dict) -> list[dict]:
    return [dict(zip(cols, values)) for values in zip(*cols.values())]


def _write_jsonl(path: Path, cols: dict) -> int:
    rows = _rows_of(cols)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return len(rows)


def export_data(data, spec: DataSpec, folder: Path) -> tuple[dict, str, list[str]]:
    """(the DATA settings, a description, files written) for any source lora_lab reads."""
    from ..hf.data.prepare import split_columns
    from ..hf.data.tasks import builtin_task

    if data is None:
        data = DEFAULT_TASK
    if isinstance(data, str) and data.startswith("builtin:"):
        data = builtin_task(data[len("builtin:"):], n=TASK_ROWS, seed=spec.seed)
    elif isinstance(data, (str, os.PathLike)):
        path = Path(data).expanduser()
        if path.is_file() and path.suffix.lower() not in FILE_TYPES:
            raise DataError(f"{path} has the extension {path.suffix!r}; the exported script reads "
                            f"{', '.join(FILE_TYPES)} files.", "convert the file, or pass its rows")
        if path.exists():
            prompts_responses(load_columns(str(path))[0], spec, "train")  # the columns exist
            return {"source": str(path.resolve()), "train": None, "eval": None}, \
                f"the {'file' if path.is_file() else 'folder'} {path.resolve()}", []
        if isinstance(data, os.PathLike) or path.suffix.lower() in DATA_SUFFIXES \
                or str(data).startswith((".", "/", "~")):
            raise DataError(f"The file {str(data)!r} does not exist.",
                            f"check the path (current folder: {os.getcwd()})")
        return {"source": str(data), "train": None, "eval": None}, f"the hub dataset {data}", []
    train, ev = load_columns(data)
    prompts_responses(train, spec, "train")
    if spec.eval_fraction == 0:
        ev = None
    elif ev is None:
        train, ev = split_columns(train, spec.eval_fraction, spec.seed)  # the split lora_lab makes
    n = _write_jsonl(folder / "data" / "train.jsonl", train)
    files = ["data/train.jsonl"]
    stale = folder / "data" / "eval.jsonl"
    if ev is not None:
        n_ev = _write_jsonl(stale, ev)
        files.append("data/eval.jsonl")
    else:
        n_ev = 0
        stale.unlink(missing_ok=True)
    return ({"source": None, "train": "data/train.jsonl", "eval": "data/eval.jsonl" if ev else None},
            f"{n} train and {n_ev} eval rows written to data/", files)
