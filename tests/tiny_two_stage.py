"""A tiny two-stage suite (`student: {from_run: ...}`) for tests/test_two_stage.py and tests/run/test_first_stage.py:
general distillation on a masked-LM corpus, then the sentiment task."""

import copy
from pathlib import Path

from tiny import tiny_suite_data

GENERAL_KD = {"name": "general", "method": "logit", "params": {"temperature": 2.0, "alpha": 0.5}, "tasks": ["corpus"]}
TASK_KD = {"name": "kd", "method": "logit", "params": {"temperature": 2.0, "alpha": 0.5}, "tasks": ["sentiment"]}
CORPUS = {"name": "corpus", "task": "generated_lm",
          "params": {"train_size": 64, "eval_size": 16, "objective": "masked", "verdict": False}}
FROM_RUN = {"pair": "pair", "task": "corpus", "method": "general"}


def two_stage_data(folder: Path, cache_dir: Path | None = None) -> dict:
    """The tiny suite with a masked-LM corpus after its sentiment task, and a pair `two` (listed before its first
    stage's pair) whose student starts from `pair`'s student distilled by `general` on the corpus."""
    data = tiny_suite_data(folder, cache_dir or folder / "cache", copy.deepcopy([GENERAL_KD, TASK_KD]))
    data["tasks"].append(copy.deepcopy(CORPUS))
    two = {"name": "two", "tasks": ["sentiment"], "teacher": copy.deepcopy(data["pairs"][0]["teacher"]),
           "student": {"from_run": dict(FROM_RUN)}}
    data["pairs"].insert(0, two)
    return data
