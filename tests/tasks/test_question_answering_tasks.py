"""Question-answering tasks: generated QA and multiple choice, SQuAD-format and multiple-choice files, and
hub folders, with one-line errors naming the culprit."""

import json
import random

import pytest

from kdbench.errors import KdbenchError
from kdbench.heads import TEACHER_LABEL
from kdbench.tasks import load_task, tasks
from kdbench.tasks.question_answering import generate_qa_example

SPANS = load_task("generated_qa", {"train_size": 24, "transfer_size": 4, "eval_size": 8, "seed": 3})


CHOICES = load_task("generated_multiple_choice", {"train_size": 24, "transfer_size": 4, "eval_size": 8, "seed": 3})


def test_generated_qa_answers_are_in_their_contexts_and_fixed_by_seed():
    rng = random.Random(0)
    for _ in range(200):
        ex = generate_qa_example(rng)
        assert ex["context"][ex["answer_start"] :].startswith(ex["answer"]) and ex["answer"] not in ex["distractors"]
        assert len(ex["distractors"]) == 3 and len(set(ex["distractors"])) == 3
    again = load_task("generated_qa", {"train_size": 24, "transfer_size": 4, "eval_size": 8, "seed": 3})
    assert again.train == SPANS.train and SPANS.head == "extractive_qa" and len(SPANS.transfer) == 4
    assert all(r["answers"]["text"] == [] for r in SPANS.transfer) and all(r["text"] for r in SPANS.train)
    assert CHOICES.head == "multiple_choice" and all(len(r["choices"]) == 4 for r in CHOICES.train)
    assert {r["label"] for r in CHOICES.transfer} == {TEACHER_LABEL}
    with pytest.raises(KdbenchError, match="min_clauses"):
        tasks.validate_params("generated_qa", {"min_clauses": 4, "max_clauses": 2})


def squad_rows(n, offset=0):
    rows = []
    for i in range(n):
        context = f"item {i + offset} lies in room {i + offset + 7} of the north wing"
        answer = f"room {i + offset + 7}"
        rows.append({"id": str(i), "question": f"where is item {i + offset} ?", "context": context,
                     "answers": {"text": [answer, answer.split()[1]], "answer_start": [context.index(answer),
                                                                                       context.index(answer) + 5]}})
    return rows


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def test_extractive_qa_reads_squad_jsonl(tmp_path):
    train, eval_ = write_jsonl(tmp_path / "train.jsonl", squad_rows(10)), write_jsonl(tmp_path / "dev.jsonl",
                                                                                      squad_rows(4, 50))
    data = load_task("extractive_qa", {"train_file": train, "eval_file": eval_, "transfer_from_train": 3,
                                       "max_eval": 3})
    assert (len(data.train), len(data.transfer), len(data.eval), data.head) == (7, 3, 3, "extractive_qa")
    assert data.eval[0]["answers"] == {"text": ["room 57", "57"], "answer_start": [16, 21]}
    assert all(r["answers"]["text"] == [] for r in data.transfer)
    assert data.train[0]["text"].startswith("where is item")


def test_extractive_qa_bad_files_name_the_culprit(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", squad_rows(3))
    with pytest.raises(KdbenchError, match=r"task data file not found: .*nope.jsonl"):
        load_task("extractive_qa", {"train_file": str(tmp_path / "nope.jsonl"), "eval_file": good})
    no_context = write_jsonl(tmp_path / "a.jsonl", [{k: v for k, v in r.items() if k != "context"}
                                                    for r in squad_rows(2)])
    with pytest.raises(KdbenchError, match=r"a.jsonl: no column 'context'; columns are: id, question, answers"):
        load_task("extractive_qa", {"train_file": no_context, "eval_file": good})
    moved = squad_rows(2)
    moved[1]["answers"]["answer_start"][0] += 1
    with pytest.raises(KdbenchError, match=r"b.jsonl: train row 1: answer 'room 8' is not at answer_start 16"):
        load_task("extractive_qa", {"train_file": write_jsonl(tmp_path / "b.jsonl", moved), "eval_file": good})
    with pytest.raises(KdbenchError) as info:
        load_task("extractive_qa", {"train_file": no_context, "eval_file": good})
    assert "\n" not in str(info.value)


def test_hub_extractive_qa_loads_a_local_dataset_folder(tmp_path):
    folder = tmp_path / "squadlike"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", squad_rows(5))
    write_jsonl(folder / "validation.jsonl", squad_rows(2, 9))
    data = load_task("hub_extractive_qa", {"dataset": str(folder)})
    assert (len(data.train), len(data.eval)) == (5, 2) and data.eval[0]["question"] == "where is item 9 ?"
    assert tasks.validate_params("squad", {}).dataset == "rajpurkar/squad"


def csqa_rows(n, offset=0):
    return [{"id": str(i), "question": f"where would you put thing {i + offset} ?",
             "choices": {"label": list("ABCDE"), "text": [f"place {i + offset} {c}" for c in "abcde"]},
             "answerKey": "ABCDE"[(i + offset) % 5]} for i in range(n)]


def test_multiple_choice_reads_lists_labels_and_choice_columns(tmp_path):
    rows = [{"question": "2 + 2 ?", "choices": ["3", "4", "5"], "label": 1},
            {"question": "capital of france ?", "choices": ["paris", "rome", "oslo"], "label": "A"},
            {"question": "sky ?", "choices": ["green", "red", "blue"], "label": "2"}]
    path = write_jsonl(tmp_path / "mc.jsonl", rows)
    data = load_task("multiple_choice", {"train_file": path, "eval_file": path})
    assert sorted(r["label"] for r in data.train) == [0, 1, 2] and data.head == "multiple_choice"
    assert data.num_labels == 3
    swag = tmp_path / "swag.csv"
    swag.write_text("sent,ending0,ending1,label\nhe opens the door,and walks in,and flies away,0\n"
                    "she sits down,on the chair,on the cloud,0\n")
    data = load_task("multiple_choice", {"train_file": str(swag), "eval_file": str(swag), "question_column": "sent",
                                         "choice_columns": ["ending0", "ending1"]})
    assert {tuple(r["choices"]) for r in data.eval} == {("and walks in", "and flies away"),
                                                          ("on the chair", "on the cloud")}


def test_multiple_choice_bad_files_name_the_culprit(tmp_path):
    path = write_jsonl(tmp_path / "mc.jsonl", [{"question": "q", "choices": ["a", "b"], "label": 0},
                                               {"question": "q", "choices": ["a", "b", "c"], "label": 0}])
    with pytest.raises(KdbenchError, match=r"mc.jsonl: train row 1 has 3 choices, row 0 has 2"):
        load_task("multiple_choice", {"train_file": path, "eval_file": path})
    path = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "choices": ["a", "b"], "label": "C"}])
    with pytest.raises(KdbenchError, match=r"bad.jsonl: train row 0: answer 'C' is not a choice index \(0..1\) or "
                                           r"label \(A, B\)"):
        load_task("multiple_choice", {"train_file": path, "eval_file": path})
    with pytest.raises(KdbenchError, match=r"bad.jsonl: no column 'answer'; columns are: question, choices, label"):
        load_task("multiple_choice", {"train_file": path, "eval_file": path, "label_column": "answer"})


def test_hub_multiple_choice_loads_a_commonsense_qa_like_folder(tmp_path):
    folder = tmp_path / "csqa"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", csqa_rows(6))
    write_jsonl(folder / "validation.jsonl", csqa_rows(3, 6))
    write_jsonl(folder / "test.jsonl", [{**r, "answerKey": ""} for r in csqa_rows(2)])
    p = tasks.validate_params("commonsense_qa", {"dataset": str(folder)})
    assert p.label_column == "answerKey"
    data = tasks.get("commonsense_qa")(p).load()
    assert [r["label"] for r in data.eval] == [1, 2, 3] and len(data.train) == 6
    assert data.eval[0]["choices"][1] == "place 6 b"
    with pytest.raises(KdbenchError, match="empty eval split"):  # hidden test answers: rows dropped
        load_task("commonsense_qa", {"dataset": str(folder), "eval_split": "test"})
    assert tasks.validate_params("commonsense_qa", {}).dataset == "tau/commonsense_qa"
