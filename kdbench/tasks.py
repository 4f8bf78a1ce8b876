"""Tasks: where the examples come from, how they are labelled, and how a model is scored on them.

A task is a small class with a pydantic `Params` and a `load()` returning `TaskData`: a labelled `train` split,
an optional unlabelled `transfer` split (inputs the teacher labels for the student), an `eval` split, and the
label names. Heavy imports (datasets, torch) happen inside functions so that `kdbench --help` stays instant.
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kdbench.errors import KdbenchError
from kdbench.registry import Registry

tasks: Registry = Registry("task")

# A training row whose label is TEACHER_LABEL has no gold label: the Distiller substitutes the teacher's
# prediction (the classic "transfer set"); a student trained alone never sees such rows.
TEACHER_LABEL = -1


@dataclass
class TaskData:
    """Splits as lists of dicts with keys `text`, optional `text_pair`, and `label` (int; classification only).

    `head` names the kdbench.heads entry that builds, trains and scores models for the task.
    """

    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    label_names: list[str] = field(default_factory=list)
    transfer: list[dict[str, Any]] = field(default_factory=list)
    head: str = "classification"

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------------------------------------------------------
# The embedded quickstart task: generated, offline, fixed by seed.

_POSITIVE = "good great excellent fine lovely superb brilliant charming solid fun".split()
_NEGATIVE = "bad awful poor dull terrible boring weak messy bland clumsy".split()
_NOUNS = "movie film plot acting cast script ending music story pacing".split()
_INTENSIFIERS = "very really quite truly".split()
_NEGATORS = "not never hardly".split()


def _clause(rng: random.Random) -> tuple[str, int]:
    """'the plot was not very good' -> (text, polarity +1/-1). A negator flips the adjective."""
    polarity = rng.choice((1, -1))
    adjective = rng.choice(_POSITIVE if polarity > 0 else _NEGATIVE)
    words = ["the", rng.choice(_NOUNS), rng.choice(("was", "is", "felt", "seemed"))]
    if rng.random() < 0.5:
        words.append(rng.choice(_NEGATORS))
        polarity = -polarity
    if rng.random() < 0.4:
        words.append(rng.choice(_INTENSIFIERS))
    words.append(adjective)
    return " ".join(words), polarity


FORMS = ("single", "but", "although_first", "although_second")


def generate_sentiment_example(rng: random.Random, forms: tuple[str, ...] = FORMS) -> tuple[str, int]:
    """One review whose label hinges on structure, not on word counts.

    - negation scope: a negator flips the adjective after it ('not bad' is positive);
    - contrast: in 'A but B' and 'although A , B' the second clause decides; in 'A , although B' the first does.
    A bag of words cannot separate these; a model must read order, which a larger model learns faster.
    """
    a, pa = _clause(rng)
    form = rng.choice(forms)
    if form == "single":
        return a, int(pa > 0)
    b, pb = _clause(rng)
    if form == "but":
        text, pol = f"{a} but {b}", pb
    elif form == "although_first":
        text, pol = f"although {a} , {b}", pb
    else:
        text, pol = f"{a} , although {b}", pa
    return text, int(pol > 0)


@tasks.register("generated_sentiment")
class GeneratedSentiment:
    """Embedded offline sentiment task with negation and contrast clauses (the quickstart)."""

    class Params(_Params):
        train_size: int = Field(2000, gt=0)  # labelled examples (the teacher's and the student's gold labels)
        transfer_size: int = Field(8000, ge=0)  # unlabelled inputs the teacher labels for distillation
        eval_size: int = Field(1000, gt=0)
        label_noise: float = Field(0.1, ge=0, lt=0.5)  # flipped gold labels in train (eval stays clean)
        forms: list[Literal[FORMS]] = Field(default_factory=lambda: ["single", "but"], min_length=1)
        seed: int = 1234  # fixes the data; independent of the run seeds

    def __init__(self, params: Params):
        self.params = params

    def load(self) -> TaskData:
        p = self.params
        rng = random.Random(p.seed)

        def split(n: int, noise: float = 0.0, labelled: bool = True) -> list[dict]:
            rows = []
            for _ in range(n):
                text, label = generate_sentiment_example(rng, tuple(p.forms))
                if rng.random() < noise:
                    label = 1 - label
                rows.append({"text": text, "label": label if labelled else TEACHER_LABEL})
            return rows

        return TaskData(
            train=split(p.train_size, p.label_noise),
            transfer=split(p.transfer_size, labelled=False),
            eval=split(p.eval_size),
            label_names=["negative", "positive"],
        )


# ---------------------------------------------------------------------------------------------------------------
# Text classification from local files or the hub.


class _TextClassificationParams(_Params):
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


def _load_local_file(path_str: str, fmt: str, text_column: str = "text"):
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


@tasks.register("text_classification")
class LocalTextClassification:
    """Text classification from local TSV/CSV/JSON(L) files, read with `datasets`."""

    path_params = ("train_file", "eval_file")  # relative to the suite file (see suite.resolve_paths)

    class Params(_TextClassificationParams):
        train_file: str
        eval_file: str
        format: Literal["auto", "tsv", "csv", "json"] = "auto"

    def __init__(self, params: Params):
        self.params = params

    def load(self) -> TaskData:
        p = self.params
        train = _rows_from_dataset(_load_local_file(p.train_file, p.format), p, p.train_file)
        eval_ = _rows_from_dataset(_load_local_file(p.eval_file, p.format), p, p.eval_file)
        return _build_task_data(train, eval_, p, p.train_file)


class _HubTextClassification:
    """Text classification from a hub dataset (needs a network, or a local copy in the datasets cache)."""

    class Params(_TextClassificationParams):
        dataset: str
        config: str | None = None
        train_split: str = "train"
        eval_split: str = "validation"

    def __init__(self, params):
        self.params = params

    def load(self) -> TaskData:
        p = self.params
        where = f"dataset {p.dataset!r}"
        ds = _load_hub_dataset(p.dataset, p.config, "text_classification")
        label_names = None
        feature = ds[p.train_split].features.get(p.label_column)
        if getattr(feature, "names", None):
            label_names = list(feature.names)
        train = _rows_from_dataset(ds[p.train_split], p, where)
        eval_ = _rows_from_dataset(ds[p.eval_split], p, where)
        # GLUE test splits carry label -1 (hidden); drop such rows rather than fail
        train = [r for r in train if r["label"] != -1]
        eval_ = [r for r in eval_ if r["label"] != -1]
        return _build_task_data(train, eval_, p, where, label_names)


tasks.register("hub_text_classification")(_HubTextClassification)


def _load_hub_dataset(name: str, config: str | None, local_task: str):
    import datasets

    try:
        return datasets.load_dataset(name, config)
    except Exception as e:
        raise KdbenchError(
            f"dataset {name!r}: cannot load ({type(e).__name__}); hub datasets need a network, "
            f"or use the {local_task} task with local files"
        ) from None


def _preset(key: str, doc: str, family=None, **defaults) -> None:
    """A hub task preset: twenty lines of data, like lm-eval-harness task YAMLs."""
    family = family or _HubTextClassification
    base = family.Params
    fields = {k: (type(v) if v is not None else str | None, v) for k, v in defaults.items()}
    from pydantic import create_model

    params = create_model(f"{key}_params", __base__=base, **fields)
    cls = type(key, (family,), {"Params": params, "__doc__": doc})
    tasks.register(key)(cls)


_preset("sst2", "SST-2 sentiment (GLUE) from the hub.", dataset="glue", config="sst2", text_column="sentence")
_preset("imdb", "IMDB movie reviews from the hub.", dataset="imdb", eval_split="test")
_preset("ag_news", "AG News topics from the hub.", dataset="ag_news", eval_split="test")
_preset("mnli", "MultiNLI (GLUE) from the hub.", dataset="glue", config="mnli", text_column="premise",
        text_pair_column="hypothesis", eval_split="validation_matched")
_preset("snli", "SNLI from the hub.", dataset="snli", text_column="premise", text_pair_column="hypothesis")


# ---------------------------------------------------------------------------------------------------------------
# Causal language modelling: texts only; the head (kdbench.heads.CausalLM) packs them into blocks.


@tasks.register("generated_lm")
class GeneratedLM:
    """Embedded offline language-modelling task: the quickstart's reviews, each followed by its verdict.

    'the plot was not bad but the music was dull => negative'. Most tokens follow a small grammar that any
    model learns; the verdict depends on negation and contrast, which a larger model gets right more often, so
    the teacher's predictive distribution there is worth distilling. Scored by perplexity on held-out reviews.
    """

    class Params(_Params):
        train_size: int = Field(4000, gt=0)
        eval_size: int = Field(500, gt=0)
        forms: list[Literal[FORMS]] = Field(default_factory=lambda: ["single", "but"], min_length=1)
        seed: int = 1234

    def __init__(self, params: Params):
        self.params = params

    def load(self) -> TaskData:
        p = self.params
        rng = random.Random(p.seed)

        def split(n: int) -> list[dict]:
            rows = []
            for _ in range(n):
                text, label = generate_sentiment_example(rng, tuple(p.forms))
                rows.append({"text": f"{text} => {('negative', 'positive')[label]}"})
            return rows

        return TaskData(train=split(p.train_size), eval=split(p.eval_size), head="causal_lm")


class _LMParams(_Params):
    text_column: str = "text"
    max_train: int | None = Field(None, gt=0)  # first N texts (documents or lines), before packing into blocks
    max_eval: int | None = Field(None, gt=0)


def _lm_rows(ds, p: _LMParams, where: str, limit: int | None) -> list[dict]:
    if p.text_column not in ds.column_names:
        raise KdbenchError(f"{where}: no column {p.text_column!r}; columns are: {', '.join(ds.column_names)}")
    texts = [str(t) for t in ds[p.text_column] if t is not None and str(t).strip()]  # wikitext has empty lines
    if not texts:
        raise KdbenchError(f"{where}: no non-empty text in column {p.text_column!r}")
    return [{"text": t} for t in texts[:limit]]


@tasks.register("text_lm")
class LocalTextLM:
    """Causal language modelling on local text: .txt (one text per non-empty line), or TSV/CSV/JSON(L) with a
    text column."""

    path_params = ("train_file", "eval_file")

    class Params(_LMParams):
        train_file: str
        eval_file: str
        format: Literal["auto", "txt", "tsv", "csv", "json"] = "auto"

    def __init__(self, params: Params):
        self.params = params

    def load(self) -> TaskData:
        p = self.params
        train = _lm_rows(_load_local_file(p.train_file, p.format, p.text_column), p, p.train_file, p.max_train)
        eval_ = _lm_rows(_load_local_file(p.eval_file, p.format, p.text_column), p, p.eval_file, p.max_eval)
        return TaskData(train=train, eval=eval_, head="causal_lm")


class _HubTextLM:
    """Causal language modelling on a hub dataset's text column (needs a network, or the datasets cache)."""

    class Params(_LMParams):
        dataset: str
        config: str | None = None
        train_split: str = "train"
        eval_split: str = "validation"

    def __init__(self, params):
        self.params = params

    def load(self) -> TaskData:
        p = self.params
        where = f"dataset {p.dataset!r}"
        ds = _load_hub_dataset(p.dataset, p.config, "text_lm")
        train = _lm_rows(ds[p.train_split], p, where, p.max_train)
        eval_ = _lm_rows(ds[p.eval_split], p, where, p.max_eval)
        return TaskData(train=train, eval=eval_, head="causal_lm")


tasks.register("hub_text_lm")(_HubTextLM)
_preset("wikitext2", "WikiText-2 (raw) language modelling from the hub.", _HubTextLM, dataset="wikitext",
        config="wikitext-2-raw-v1")

def load_task(name: str, params: dict) -> TaskData:
    cls = tasks.get(name)
    return cls(tasks.validate_params(name, params)).load()


# ---------------------------------------------------------------------------------------------------------------
# Scoring


def accuracy(predictions, labels) -> float:
    """Micro accuracy with torchmetrics over (N,) int predictions and labels."""
    import torch
    from torchmetrics.functional.classification import multiclass_accuracy

    preds = torch.as_tensor(predictions)
    target = torch.as_tensor(labels)
    num_classes = int(max(preds.max(), target.max())) + 1
    return float(multiclass_accuracy(preds, target, num_classes=num_classes, average="micro"))
