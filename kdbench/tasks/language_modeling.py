"""Texts for language models, from local files or the hub (WikiText-2); the head packs them into blocks.

Each task's `objective` picks the head: `causal` (next-token prediction, the default) or `masked` (BERT's masked
tokens, at `mask_probability`, with eval masks fixed by `eval_mask_seed`); both are scored by perplexity.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from kdbench.errors import KdbenchError
from kdbench.tasks.base import (
    HubParams, HubTask, LocalParams, LocalTask, SplitsTask, TaskData, TaskParams, load_local_file, preset, tasks,
)

OBJECTIVES = {"causal": "causal_lm", "masked": "masked_lm"}  # a task's `objective` -> its head (kdbench.heads)


class ObjectiveParams(TaskParams):
    """Which language-modelling head scores the task, and how a masked LM is masked."""

    objective: Literal["causal", "masked"] = "causal"  # next-token (causal_lm) or masked-token (masked_lm) heads
    mask_probability: float = Field(0.15, gt=0, lt=1)  # masked only: the share of tokens chosen (BERT's 15%)
    eval_mask_seed: int = 0  # masked only: eval row i is masked by a generator seeded with this + i
    # causal only: also score greedy continuations of each eval block's first half against its gold second half
    # (up to the end of the document), recorded next to perplexity
    continuation_metric: Literal["rouge_l", "exact_match"] | None = None

    @model_validator(mode="after")
    def _settings_need_their_objective(self):
        given = sorted({"mask_probability", "eval_mask_seed"} & self.model_fields_set)
        if self.objective == "causal" and given:
            raise ValueError(f"{given[0]} needs objective: masked")
        if self.objective == "masked" and self.continuation_metric is not None:
            raise ValueError("continuation_metric needs objective: causal")
        return self

    def task_data(self, train: list[dict], eval_: list[dict]) -> TaskData:
        head_params = ({"probability": self.mask_probability, "eval_seed": self.eval_mask_seed}
                       if self.objective == "masked" else
                       {"continuation_metric": self.continuation_metric} if self.continuation_metric else {})
        return TaskData(train=train, eval=eval_, head=OBJECTIVES[self.objective], head_params=head_params)


class _LMParams(ObjectiveParams):
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


class _TextLM(SplitsTask):
    """What the file and hub families share: a text column per split."""

    def build(self, train_ds, eval_ds, train_where: str, eval_where: str) -> TaskData:
        p = self.params
        train = _lm_rows(train_ds, p, train_where, p.max_train)
        return p.task_data(train, _lm_rows(eval_ds, p, eval_where, p.max_eval))


@tasks.register("text_lm")
class LocalTextLM(_TextLM, LocalTask):
    """Language modelling (causal or masked) on local text: .txt (one text per non-empty line), or TSV/CSV/JSON(L)
    with a text column."""

    class Params(_LMParams, LocalParams):
        format: Literal["auto", "txt", "tsv", "csv", "json"] = "auto"

    def read(self, path: str):
        return load_local_file(path, self.params.format, self.params.text_column)  # a .txt's lines are the texts


class _HubTextLM(_TextLM, HubTask):
    """Language modelling (causal or masked) on a hub dataset's text column (needs a network, or the datasets
    cache)."""

    local_task = "text_lm"

    class Params(_LMParams, HubParams):
        pass


tasks.register("hub_text_lm")(_HubTextLM)
preset("wikitext2", "WikiText-2 (raw) language modelling from the hub.", _HubTextLM, dataset="wikitext",
       config="wikitext-2-raw-v1")
