"""Text classification from local files or the hub: SST-2, IMDB, AG News, MNLI, SNLI."""

from __future__ import annotations

import random

from pydantic import Field

from kdbench.errors import KdbenchError
from kdbench.heads.base import TEACHER_LABEL
from kdbench.tasks.base import HubParams, HubTask, LocalParams, LocalTask, TaskData, TaskParams, preset, tasks


class _TextClassificationParams(TaskParams):
    text_column: str = "text"
    text_pair_column: str | None = None  # for sentence pairs (MNLI, SNLI)
    label_column: str = "label"
    labels: list[str] | None = None  # label names in id order; default: sorted values seen in train
    max_train: int | None = Field(None, gt=0)  # take the first N rows (after a seeded shuffle)
    max_eval: int | None = Field(None, gt=0)
    transfer_from_train: int = Field(0, ge=0)  # hold out N train rows, unlabelled, as the transfer set
    shuffle_seed: int = 0


def _rows_from_dataset(ds, p: _TextClassificationParams, where: str) -> list[dict]:
    cols = [p.text_column] + ([p.text_pair_column] if p.text_pair_column else []) + [p.label_column]
    missing = [c for c in cols if c not in ds.column_names]
    if missing:
        raise KdbenchError(f"{where}: no column {missing[0]!r}; columns are: {', '.join(ds.column_names)}")
    rows = []
    for r in ds:
        row = {"text": str(r[p.text_column]), "label": r[p.label_column]}
        if p.text_pair_column:
            row["text_pair"] = str(r[p.text_pair_column])
        rows.append(row)
    return rows


def _build_task_data(train: list[dict], eval_: list[dict], p: _TextClassificationParams, where: str,
                     label_names: list[str] | None = None) -> TaskData:
    rng = random.Random(p.shuffle_seed)
    rng.shuffle(train)
    names = p.labels or label_names or sorted({str(r["label"]) for r in train})
    eval_labels = {str(r["label"]) for r in eval_}
    index = {n: i for i, n in enumerate(names)}
    for split, rows in (("train", train), ("eval", eval_)):
        for r in rows:
            key = str(r["label"])
            if key not in index:
                if isinstance(r["label"], int) and not isinstance(r["label"], bool) and 0 <= r["label"] < len(names):
                    key = names[r["label"]]  # integer ids from hub datasets with ClassLabel features
                else:
                    raise KdbenchError(
                        f"{where}: {split} label {r['label']!r} is not one of the task's labels: {', '.join(names)}"
                    )
            r["label"] = index[key]
    if not (p.labels or label_names):  # classes read off the train split: a stray value there is no class
        unseen = sorted(set(names) - eval_labels)
        if unseen:
            raise KdbenchError(f"{where}: train label {unseen[0]!r} never occurs in the eval split; if it is one of "
                               "the task's labels, list them all in params.labels")
    transfer = []
    if p.transfer_from_train:
        transfer = [{**r, "label": TEACHER_LABEL} for r in train[: p.transfer_from_train]]
        train = train[p.transfer_from_train :]
    if p.max_train:
        train = train[: p.max_train]
    if p.max_eval:
        eval_ = eval_[: p.max_eval]
    if not train or not eval_:
        raise KdbenchError(f"{where}: empty {'train' if not train else 'eval'} split")
    return TaskData(train=train, eval=eval_, transfer=transfer, label_names=names)


@tasks.register("text_classification")
class LocalTextClassification(LocalTask):
    """Text classification from local TSV/CSV/JSON(L) files, read with `datasets`."""

    class Params(_TextClassificationParams, LocalParams):
        pass

    def build(self, train_ds, eval_ds, train_where: str, eval_where: str) -> TaskData:
        p = self.params
        train = _rows_from_dataset(train_ds, p, train_where)
        eval_ = _rows_from_dataset(eval_ds, p, eval_where)
        return _build_task_data(train, eval_, p, train_where)


class _HubTextClassification(HubTask):
    """Text classification from a hub dataset (needs a network, or a local copy in the datasets cache)."""

    local_task = "text_classification"

    class Params(_TextClassificationParams, HubParams):
        pass

    def build(self, train_ds, eval_ds, where: str, _eval_where: str) -> TaskData:
        p = self.params
        feature = train_ds.features.get(p.label_column)
        label_names = list(feature.names) if getattr(feature, "names", None) else None
        # GLUE test splits carry label -1 (hidden); drop such rows rather than fail
        train = [r for r in _rows_from_dataset(train_ds, p, where) if r["label"] != -1]
        eval_ = [r for r in _rows_from_dataset(eval_ds, p, where) if r["label"] != -1]
        return _build_task_data(train, eval_, p, where, label_names)


tasks.register("hub_text_classification")(_HubTextClassification)
_HUB = _HubTextClassification
preset("sst2", "SST-2 sentiment (GLUE) from the hub.", _HUB, dataset="glue", config="sst2", text_column="sentence")
preset("imdb", "IMDB movie reviews from the hub.", _HUB, dataset="imdb", eval_split="test")
preset("ag_news", "AG News topics from the hub.", _HUB, dataset="ag_news", eval_split="test")
preset("mnli", "MultiNLI (GLUE) from the hub.", _HUB, dataset="glue", config="mnli", text_column="premise",
       text_pair_column="hypothesis", eval_split="validation_matched")
preset("snli", "SNLI from the hub.", _HUB, dataset="snli", text_column="premise", text_pair_column="hypothesis")
