"""Language-modelling tasks: generated, local text and hub folders, and how a task picks its head
(causal or masked) and its settings."""

import json

import pytest

from kdbench.errors import KdbenchError
from kdbench.tasks import load_task, tasks


def test_continuation_metric_is_a_causal_task_setting():
    from kdbench.tasks import load_task

    data = load_task("generated_lm", {"train_size": 8, "eval_size": 4, "continuation_metric": "exact_match"})
    assert (data.head, data.head_params) == ("causal_lm", {"continuation_metric": "exact_match"})
    with pytest.raises(KdbenchError, match="continuation_metric needs objective: causal"):
        load_task("generated_lm", {"objective": "masked", "continuation_metric": "rouge_l"})


@pytest.mark.parametrize("objective, head", [({}, "causal_lm"), ({"objective": "causal"}, "causal_lm"),
                                             ({"objective": "masked"}, "masked_lm")])
def test_lm_tasks_choose_their_head_by_objective(objective, head, tmp_path):
    from kdbench.tasks import load_task, tasks

    assert load_task("generated_lm", {"train_size": 4, "eval_size": 2, **objective}).head == head
    text = tmp_path / "t.txt"
    text.write_text("one two\nthree\n")
    assert load_task("text_lm", {"train_file": str(text), "eval_file": str(text), **objective}).head == head
    assert tasks.validate_params("wikitext2", objective).objective == objective.get("objective", "causal")


def test_lm_objective_must_be_known():
    from kdbench.tasks import tasks

    with pytest.raises(KdbenchError, match="objective"):
        tasks.validate_params("generated_lm", {"objective": "seq2seq"})


def test_text_lm_reads_txt_lines_and_jsonl_columns(tmp_path):
    txt = tmp_path / "train.txt"
    txt.write_text("first line\n\n  second line  \nthird\n", encoding="utf-8")
    jsonl = tmp_path / "eval.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": t, "id": i}) for i, t in enumerate(["a b", "", "c"])))
    with pytest.raises(KdbenchError, match="eval.jsonl: no column 'text'; columns are: body, id"):
        load_task("text_lm", {"train_file": str(txt), "eval_file": str(jsonl)})
    data = load_task("text_lm", {"train_file": str(txt), "eval_file": str(jsonl), "text_column": "body",
                                 "max_train": 2})
    assert [r["text"] for r in data.train] == ["first line", "second line"]  # blank lines dropped, max_train
    assert [r["text"] for r in data.eval] == ["a b", "c"] and data.head == "causal_lm"


def test_text_lm_bad_files_are_named(tmp_path):
    empty, binary = tmp_path / "empty.txt", tmp_path / "latin1.txt"
    empty.write_text("\n \n")
    binary.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(KdbenchError, match=r"task data file not found: .*missing.txt"):
        load_task("text_lm", {"train_file": str(tmp_path / "missing.txt"), "eval_file": str(empty)})
    with pytest.raises(KdbenchError, match=r"empty.txt: no non-empty text in column 'text'"):
        load_task("text_lm", {"train_file": str(empty), "eval_file": str(empty)})
    with pytest.raises(KdbenchError, match=r"latin1.txt: not UTF-8 text"):
        load_task("text_lm", {"train_file": str(binary), "eval_file": str(binary)})


def test_hub_text_lm_loads_a_local_dataset_folder(tmp_path):
    """The hub code path (datasets.load_dataset(name, config)) on a local folder, as a user's cache would serve it."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    for split, texts in (("train", ["one two", "", "three"]), ("validation", ["four five"])):
        (folder / f"{split}.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts))
    data = load_task("hub_text_lm", {"dataset": str(folder)})
    assert [r["text"] for r in data.train] == ["one two", "three"] and [r["text"] for r in data.eval] == ["four five"]
    assert tasks.validate_params("wikitext2", {}).config == "wikitext-2-raw-v1"


def test_hub_lm_dataset_offline_says_it_needs_a_network(no_network):
    with pytest.raises(KdbenchError, match=r"'kdbench-tests/none'.*need a network, or use the text_lm task"):
        load_task("hub_text_lm", {"dataset": "kdbench-tests/none"})
