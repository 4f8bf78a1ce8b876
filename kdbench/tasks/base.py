"""What every task family shares: the registry, TaskData, the local-file and hub loaders, and hub presets.

Heavy imports (datasets) happen inside functions so that `kdbench --help` stays instant.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, create_model

from kdbench.errors import KdbenchError
from kdbench.registry import Registry

tasks: Registry = Registry("task")


@dataclass
class TaskData:
    """Splits as lists of dicts with keys `text`, optional `text_pair`, and `label` (int; classification only).

    `head` names the kdbench.heads entry that builds, trains and scores models for the task; `head_params` are
    its settings (a seq2seq task's metric).
    """

    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    label_names: list[str] = field(default_factory=list)
    transfer: list[dict[str, Any]] = field(default_factory=list)
    head: str = "classification"
    head_params: dict[str, Any] = field(default_factory=dict)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


class TaskParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Task:
    """Base of every task: holds its validated `Params`; `load()` gives the TaskData."""

    def __init__(self, params):
        self.params = params

    def load(self) -> TaskData:  # pragma: no cover - interface
        raise NotImplementedError


def load_local_file(path_str: str, fmt: str, text_column: str = "text"):
    """A local TSV/CSV/JSON(L) file as a `datasets.Dataset`; a `txt` file is one text per non-empty line, in
    column `text_column`."""
    import datasets

    path = Path(path_str).expanduser()
    if not path.is_file():
        raise KdbenchError(f"task data file not found: {path}")
    if fmt == "auto":
        fmt = {".tsv": "tsv", ".csv": "csv", ".json": "json", ".jsonl": "json", ".txt": "txt"}.get(path.suffix.lower())
        if fmt is None:
            raise KdbenchError(f"{path}: cannot tell the format from the suffix; set params.format")
    datasets.disable_progress_bars()
    try:
        if fmt == "txt":
            lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
            return datasets.Dataset.from_dict({text_column: [line for line in lines if line]})
        if fmt == "json":
            return datasets.load_dataset("json", data_files=str(path), split="train")
        # Tab files in the wild are unquoted (SST-2's phrases contain quote characters).
        kwargs = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if fmt == "tsv" else {}
        return datasets.load_dataset("csv", data_files=str(path), split="train", **kwargs)
    except UnicodeDecodeError as e:
        raise KdbenchError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except Exception as e:  # datasets wraps parser errors in several types
        raise KdbenchError(f"{path}: cannot read as {fmt}: {str(e).splitlines()[0]}") from None


class LocalParams(TaskParams):
    """Two local files, read with `datasets`."""

    train_file: str
    eval_file: str
    format: Literal["auto", "tsv", "csv", "json"] = "auto"


class SplitsTask(Task):
    """Base of the file and hub families: each finds a train and an eval split and hands them, with where they came
    from for error messages, to the family's one `build`."""

    from_hub = False

    def build(self, train, eval_, train_where: str, eval_where: str) -> TaskData:  # pragma: no cover - interface
        raise NotImplementedError


class LocalTask(SplitsTask):
    """Reads two local files."""

    path_params = ("train_file", "eval_file")  # relative to the suite file (see suite.resolve_paths)

    def read(self, path: str):
        return load_local_file(path, self.params.format)

    def load(self) -> TaskData:
        p = self.params
        return self.build(self.read(p.train_file), self.read(p.eval_file), p.train_file, p.eval_file)


class HubParams(TaskParams):
    """Where a hub task's data is: a dataset name (or a local dataset folder), its config and two splits."""

    dataset: str
    config: str | None = None
    train_split: str = "train"
    eval_split: str = "validation"


class HubTask(SplitsTask):
    """Loads a hub dataset (needs a network, or the datasets cache)."""

    from_hub = True
    local_task: str  # the family's local-files task, named when the hub cannot be reached

    def load(self) -> TaskData:
        import datasets

        p = self.params
        where = f"dataset {p.dataset!r}"
        try:
            ds = datasets.load_dataset(p.dataset, p.config)
        except Exception as e:
            raise KdbenchError(
                f"{where}: cannot load ({type(e).__name__}); hub datasets need a network, "
                f"or use the {self.local_task} task with local files"
            ) from None
        for split in (p.train_split, p.eval_split):
            if split not in ds:
                raise KdbenchError(f"{where}: no split {split!r}; splits are: {', '.join(ds)}")
        return self.build(ds[p.train_split], ds[p.eval_split], where, where)


def preset(key: str, doc: str, family: type, **defaults) -> None:
    """A hub task preset: a family's task with defaults filled in; twenty lines of data, like lm-eval-harness
    task YAMLs."""
    base = family.Params.model_fields
    # a field of the family keeps its annotation (a Literal stays checked); a new one is typed by its default
    fields = {k: (base[k].annotation if k in base else type(v) if v is not None else str | None, v)
              for k, v in defaults.items()}
    params = create_model(f"{key}_params", __base__=family.Params, **fields)
    cls = type(key, (family,), {"Params": params, "__doc__": doc})
    tasks.register(key)(cls)


def load_task(name: str, params: dict) -> TaskData:
    cls = tasks.get(name)
    return cls(tasks.validate_params(name, params)).load()
