"""A local-file task's data, checked without loading it: the files exist, their header (or first record) has every
column the task's params name, and a classification task's labels are the same in both splits.

Each check reads the header or a single column; the task itself (kdbench.tasks) reads the files with `datasets`
when the run starts, and keeps its own checks for the data this cannot see.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from kdbench.errors import KdbenchError

SUFFIXES = {".tsv": "tsv", ".csv": "csv", ".json": "json", ".jsonl": "json", ".txt": "txt"}


def file_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    found = SUFFIXES.get(path.suffix.lower())
    if found is None:
        raise KdbenchError(f"{path}: cannot tell the format from the suffix; set params.format")
    return found


def _rows(path: Path, fmt: str):
    """The records of a TSV/CSV/JSON Lines file, one dict at a time (None for a JSON array, which is not streamed).
    Tab files are unquoted, as kdbench.tasks reads them."""
    f = path.open(encoding="utf-8", newline="")
    try:
        if fmt == "json":
            for line in f:
                if line.strip():
                    record = json.loads(line)
                    if not isinstance(record, dict):
                        return
                    yield record
            return
        kwargs = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if fmt == "tsv" else {}
        yield from csv.DictReader(f, **kwargs)
    finally:
        f.close()


def columns_of(path: Path, fmt: str) -> list[str] | None:
    """The column names of a data file from its first line or record; None where they cannot be read cheaply (a
    JSON array, a text file whose lines are the texts)."""
    if fmt == "txt":
        return None
    try:
        with path.open(encoding="utf-8", newline="") as f:
            first = next((line for line in f if line.strip()), "")
        if fmt == "json":
            if first.lstrip().startswith("["):
                return None
            record = json.loads(first) if first.strip() else {}
            return list(record) if isinstance(record, dict) else None
        kwargs = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if fmt == "tsv" else {}
        return next(csv.reader([first], **kwargs), [])
    except UnicodeDecodeError as e:
        raise KdbenchError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except (json.JSONDecodeError, csv.Error) as e:
        raise KdbenchError(f"{path}: cannot read as {fmt}: {e}") from None
    except OSError as e:
        raise KdbenchError(f"{path}: cannot read: {e.strerror or e}") from None


def column_values(path: Path, fmt: str, column: str) -> list[str] | None:
    """Every value of one column, as text (None where the file is not streamed)."""
    try:
        values = [r.get(column) for r in _rows(path, fmt)]
    except UnicodeDecodeError as e:
        raise KdbenchError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except (json.JSONDecodeError, csv.Error) as e:
        raise KdbenchError(f"{path}: cannot read as {fmt}: {e}") from None
    if fmt == "json" and not values and columns_of(path, fmt) is None:
        return None
    return ["" if v is None else str(v) for v in values]


def named_columns(params) -> list[str]:
    """The columns a task's params name: every `*_column` field that is set, and each of a `*_columns` list."""
    found = []
    for name in type(params).model_fields:
        value = getattr(params, name)
        if name.endswith("_column") and isinstance(value, str):
            found.append(value)
        elif name.endswith("_columns") and isinstance(value, list):
            found += [v for v in value if isinstance(v, str)]
    return found


def check_files(params, path_params: tuple[str, ...], fmt: str) -> None:
    """Each data file exists and has the columns that `params` name."""
    wanted = named_columns(params)
    for key in path_params:
        value = getattr(params, key, None)
        if not isinstance(value, str):
            continue
        path = Path(value).expanduser()
        if not path.is_file():
            raise KdbenchError(f"task data file not found: {path}")
        columns = columns_of(path, file_format(path, fmt))
        if columns is None:
            continue
        missing = [c for c in wanted if c not in columns]
        if missing:
            raise KdbenchError(f"{path}: no column {missing[0]!r}; columns are: {', '.join(columns)}")


def _as_read(values: list[str]) -> list[str]:
    """Label values as `datasets` types them: a column of whole numbers becomes ints (so "01" reads as "1")."""
    try:
        return [str(int(v)) for v in values]
    except ValueError:
        return values


def check_labels(train_file: str, eval_file: str, fmt: str, column: str, labels: list[str] | None) -> None:
    """Both splits' labels are the task's labels: those listed in `labels`, else those of the train split, each of
    which must then also occur in the eval split (a stray value in the train file would otherwise become a class
    of its own)."""
    train_path, eval_path = Path(train_file).expanduser(), Path(eval_file).expanduser()
    train = column_values(train_path, file_format(train_path, fmt), column)
    eval_ = column_values(eval_path, file_format(eval_path, fmt), column)
    if train is None or eval_ is None:
        return
    train, eval_ = _as_read(train), _as_read(eval_)
    if labels is not None:
        whole = all(v.lstrip("-").isdigit() for v in train + eval_)  # integer ids index the label names
        for split, path, values in (("train", train_path, train), ("eval", eval_path, eval_)):
            bad = next((v for v in values if v not in labels and not (whole and 0 <= int(v) < len(labels))), None)
            if bad is not None:
                raise KdbenchError(f"{path}: {split} label {bad!r} is not one of the task's labels: "
                                   f"{', '.join(labels)}")
        return
    names = sorted(set(train))
    bad = next((v for v in eval_ if v not in names), None)
    if bad is not None:
        raise KdbenchError(f"{eval_path}: eval label {bad!r} is not one of the task's labels (those of the train "
                           f"split): {', '.join(names)}")
    unseen = sorted(set(train) - set(eval_))
    if unseen:
        raise KdbenchError(f"{train_path}: train label {unseen[0]!r} never occurs in the eval split {eval_path}; "
                           "if it is one of the task's labels, list them all in params.labels")
