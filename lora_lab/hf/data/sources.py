"""Read a data source into columns: a Dataset or DatasetDict, a list of dicts, a dict of columns, a
pandas DataFrame, a .json/.jsonl/.csv/.tsv file, a ``save_to_disk`` folder, or a hub dataset name.

``load_columns(source)`` returns ``(train_columns, eval_columns_or_None)``, each a dict of
column -> list.
Local files are read with the standard library so that values keep their types as written
(``datasets``' CSV loader would turn "42" into an int).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Mapping

from ...errors import DataError

__all__ = ["load_columns", "FILE_TYPES", "DATA_SUFFIXES", "EVAL_SPLITS"]

EVAL_SPLITS = ("validation", "test")  # a source's own eval split, in order of preference
FILE_TYPES = (".json", ".jsonl", ".csv", ".tsv")
DATA_SUFFIXES = FILE_TYPES + (".parquet", ".txt", ".arrow", ".xlsx")  # a file name, not a hub id


def _columns_from_rows(rows, what: str) -> dict[str, list]:
    """A list of dicts → columns (a key missing from a row becomes None in that row)."""
    keys: dict[str, None] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise DataError(f"Row {i} of {what} is a {type(row).__name__}, not a dict.",
                            "pass rows such as {'prompt': '...', 'response': '...'}")
        keys.update(dict.fromkeys(row))
    return {k: [row.get(k) for row in rows] for k in keys}


def _read_json(path: Path):
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return _read_jsonl(path)  # JSON Lines saved with a .json name
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [{...}, ...]}
    return _columns_from_rows(data, str(path)) if isinstance(data, list) else data  # or columns


def _read_jsonl(path: Path) -> dict[str, list]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"Line {n} of {path} is not valid JSON: {e}.",
                                    "write one JSON object per line") from None
    return _columns_from_rows(rows, str(path))


def _read_csv(path: Path) -> dict[str, list]:
    # The csv module keeps every value a string: "4" stays "4" (datasets' csv loader would make it
    # an int, and a numeric response would then fail the string check).
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        return _columns_from_rows(list(reader), str(path))


_READERS = {".json": _read_json, ".jsonl": _read_jsonl, ".csv": _read_csv, ".tsv": _read_csv}


def _is_offline() -> bool:
    flags = (os.environ.get(k, "").lower() for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))
    return any(v in ("1", "true", "yes", "on") for v in flags)


def _load_hub_or_folder(name: str, folder: bool):
    import datasets

    try:
        if folder and any((Path(name) / f).exists() for f in ("state.json", "dataset_dict.json")):
            return datasets.load_from_disk(name)
        return datasets.load_dataset(name)
    except Exception as e:  # noqa: BLE001 - any failure here means "could not get this dataset"
        where = "the folder" if folder else "the hub dataset"
        offline = " (offline mode is on)" if _is_offline() or isinstance(e, ConnectionError) else ""
        raise DataError(f"Could not load {where} {name!r}{offline}: {type(e).__name__}: {e}",
                        "pass a local .json/.jsonl/.csv file, a datasets.Dataset, or a list of "
                        "dicts such as [{'prompt': ..., 'response': ...}]") from e


def _from_path(source: str | os.PathLike, explicit_path: bool):
    path = Path(source).expanduser()
    if path.is_dir():
        return _load_hub_or_folder(str(path), folder=True)
    if path.is_file():
        reader = _READERS.get(path.suffix.lower())
        if reader is None:
            raise DataError(f"{path} has the extension {path.suffix!r}, which prepare_dataset "
                            f"cannot read; it reads {', '.join(FILE_TYPES)}.",
                            "convert the file, or load it with datasets.load_dataset(...) and "
                            "pass the Dataset")
        return reader(path)
    text = str(source)
    if explicit_path or path.suffix.lower() in DATA_SUFFIXES or text.startswith((".", "/", "~")):
        raise DataError(f"The file {text!r} does not exist.",
                        f"check the path (current folder: {os.getcwd()})")
    return _load_hub_or_folder(text, folder=False)


def _columns(ds) -> dict[str, list]:
    """Columns (name → list of values) of a ``datasets.Dataset`` or a pandas DataFrame."""
    return ds.to_dict("list") if type(ds).__name__ == "DataFrame" else ds.to_dict()


def load_columns(source) -> tuple[dict[str, list], dict[str, list] | None]:
    """The train rows' columns and, when the source has one, its own eval split's columns."""
    if isinstance(source, (str, os.PathLike)):
        source = _from_path(source, explicit_path=isinstance(source, os.PathLike))
    if isinstance(source, (list, tuple)):
        return _columns_from_rows(source, "the list"), None
    kind = type(source).__name__
    if kind == "dict":  # columns {"prompt": [...], "response": [...]}
        if not all(isinstance(v, (list, tuple)) for v in source.values()) \
                or len({len(v) for v in source.values()}) > 1:
            raise DataError(f"A dict source must map column names to lists of equal length; got "
                            f"{ {k: type(v).__name__ for k, v in source.items()} }.",
                            "pass a list of row dicts such as [{'prompt': ..., 'response': ...}]")
        return {k: list(v) for k, v in source.items()}, None
    if kind.startswith("Iterable"):
        raise DataError("prepare_dataset got a streaming dataset, which it cannot count or split.",
                        "load it with streaming=False, or pass Dataset.from_list(list(ds.take(n)))")
    if kind == "DatasetDict":
        train = "train" if "train" in source else (next(iter(source)) if len(source) == 1 else None)
        if train is None:
            raise DataError(f"The dataset has the splits {list(source)} and none is 'train'.",
                            "pass the split to train on, e.g. dd['<split>']")
        ev = next((s for s in EVAL_SPLITS if s in source and s != train), None)
        return _columns(source[train]), (_columns(source[ev]) if ev else None)
    if hasattr(source, "column_names") or kind == "DataFrame":
        return _columns(source), None
    raise DataError(f"prepare_dataset cannot read a source of type {kind}.",
                    "pass a datasets.Dataset, a list of dicts, a .json/.jsonl/.csv path or a hub "
                    "dataset name")
