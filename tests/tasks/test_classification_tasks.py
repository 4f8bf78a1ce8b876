"""Text-classification tasks: local TSV/CSV/JSON(L) files, hub presets offline, and the real SST-2 / AG News
copies in ../shared/data (skipped when absent)."""

import csv
import json
from pathlib import Path

import pytest

from kdbench.errors import KdbenchError
from kdbench.heads import TEACHER_LABEL
from kdbench.tasks import load_task, tasks

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


def write_tsv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    # Written by hand, not with csv: real tab files are unquoted, and quote characters must survive as text.
    path.write_text("\n".join("\t".join(r) for r in [header, *rows]) + "\n")
    return path


TSV_ROWS = [
    ['he said "wow', "pos"],
    ["a \"so-called\" comedy", "neg"],
    ["it 's \" fine", "pos"],
    ['"', "neg"],
    ["plain text , with a comma", "pos"],
    ["dull", "neg"],
]


@pytest.fixture
def tsv_files(tmp_path):
    train = write_tsv(tmp_path / "train.tsv", ["sentence", "label"], TSV_ROWS)
    eval_ = write_tsv(tmp_path / "eval.tsv", ["sentence", "label"], TSV_ROWS[:2])
    return {"train_file": str(train), "eval_file": str(eval_), "text_column": "sentence"}


def local(**params):
    return load_task("text_classification", params)


def test_tsv_keeps_quote_characters_and_maps_string_labels(tsv_files):
    data = local(**tsv_files)
    assert data.label_names == ["neg", "pos"]  # sorted values seen in train
    expected = {text: ["neg", "pos"].index(label) for text, label in TSV_ROWS}
    assert {r["text"]: r["label"] for r in data.train} == expected  # every quote survives (QUOTE_NONE)
    assert [(r["text"], r["label"]) for r in data.eval] == [('he said "wow', 1), ('a "so-called" comedy', 0)]
    assert data.transfer == []


def test_labels_param_fixes_the_id_order(tsv_files):
    data = local(**tsv_files, labels=["pos", "neg", "neutral"])
    assert data.label_names == ["pos", "neg", "neutral"] and data.num_labels == 3
    assert {r["text"]: r["label"] for r in data.eval} == {'he said "wow': 0, 'a "so-called" comedy': 1}


def test_label_the_task_does_not_expect(tsv_files, tmp_path):
    with pytest.raises(KdbenchError) as info:
        local(**tsv_files, labels=["pos", "negative"])
    message = str(info.value)
    assert "\n" not in message
    assert tsv_files["train_file"] in message and "train label 'neg'" in message and "pos, negative" in message
    # Without `labels`, the train split defines the labels; an eval label outside them is named.
    bad_eval = write_tsv(tmp_path / "bad_eval.tsv", ["sentence", "label"], [["ok", "pos"], ["meh", "neutral"]])
    with pytest.raises(KdbenchError, match=r"eval label 'neutral' is not one of the task's labels: neg, pos"):
        local(**{**tsv_files, "eval_file": str(bad_eval)})


def test_a_stray_train_label_is_refused_by_the_loader_too(tsv_files, tmp_path):
    """Without `labels`, the train split's values are the classes: one the eval split never has is refused, not
    made a class of its own (the loader's check, for callers that skip `kdbench validate`)."""
    train = write_tsv(tmp_path / "stray.tsv", ["sentence", "label"], [["fine", "pos"], ["bad", "neg"], ["x", "p0s"]])
    with pytest.raises(KdbenchError, match=r"train label 'p0s' never occurs in the eval split"):
        local(**{**tsv_files, "train_file": str(train)})
    assert local(**{**tsv_files, "train_file": str(train)}, labels=["neg", "pos", "p0s"]).num_labels == 3


def test_csv_with_quoted_fields(tmp_path):
    rows = [["text", "label"], ['a "quoted", comma-rich review', "1"], ["plain", "0"], ["x, y", "1"]]
    with (tmp_path / "d.csv").open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    data = local(train_file=str(tmp_path / "d.csv"), eval_file=str(tmp_path / "d.csv"))
    assert sorted((r["text"], r["label"]) for r in data.eval) == [
        ('a "quoted", comma-rich review', 1), ("plain", 0), ("x, y", 1)
    ]
    assert data.label_names == ["0", "1"]


def test_jsonl_with_sentence_pairs(tmp_path):
    rows = [
        {"premise": "a man sleeps", "hypothesis": "a man is awake", "gold": "contradiction"},
        {"premise": "a dog runs", "hypothesis": "an animal moves", "gold": "entailment"},
        {"premise": "a cat sits", "hypothesis": "the cat is black", "gold": "neutral"},
    ]
    path = tmp_path / "nli.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = local(train_file=str(path), eval_file=str(path), text_column="premise", text_pair_column="hypothesis",
                 label_column="gold", labels=["entailment", "neutral", "contradiction"])
    assert data.eval == [
        {"text": "a man sleeps", "text_pair": "a man is awake", "label": 2},
        {"text": "a dog runs", "text_pair": "an animal moves", "label": 0},
        {"text": "a cat sits", "text_pair": "the cat is black", "label": 1},
    ]


def test_transfer_from_train_and_row_limits(tmp_path):
    rows = [[f"sentence {i}", "ab"[i % 2]] for i in range(50)]
    train = write_tsv(tmp_path / "train.tsv", ["text", "label"], rows)
    params = dict(train_file=str(train), eval_file=str(train), transfer_from_train=20, max_train=25, max_eval=7)
    data = local(**params)
    assert (len(data.transfer), len(data.train), len(data.eval)) == (20, 25, 7)
    assert {r["label"] for r in data.transfer} == {TEACHER_LABEL}
    assert {r["label"] for r in data.train} == {0, 1}
    # Held-out transfer rows never appear among the labelled ones; the shuffle is seeded.
    assert not {r["text"] for r in data.transfer} & {r["text"] for r in data.train}
    assert local(**params).train == data.train
    assert local(**params, shuffle_seed=1).train != data.train


def test_transfer_can_empty_the_train_split(tmp_path):
    train = write_tsv(tmp_path / "train.tsv", ["text", "label"], [["a", "x"], ["b", "y"]])
    with pytest.raises(KdbenchError, match="empty train split"):
        local(train_file=str(train), eval_file=str(train), transfer_from_train=2)


def test_missing_data_file_is_named(tmp_path, tsv_files):
    missing = tmp_path / "nope" / "train.tsv"
    with pytest.raises(KdbenchError) as info:
        local(**{**tsv_files, "train_file": str(missing)})
    assert str(info.value) == f"task data file not found: {missing}"


def test_missing_columns_are_named(tsv_files):
    with pytest.raises(KdbenchError) as info:
        local(**{**tsv_files, "text_column": "text"})
    assert str(info.value) == f"{tsv_files['train_file']}: no column 'text'; columns are: sentence, label"
    with pytest.raises(KdbenchError, match="no column 'gold'; columns are: sentence, label"):
        local(**tsv_files, label_column="gold")


def test_unknown_suffix_needs_a_format(tmp_path, tsv_files):
    odd = tmp_path / "train.dat"
    odd.write_text(Path(tsv_files["train_file"]).read_text())
    with pytest.raises(KdbenchError, match=r"train.dat: cannot tell the format from the suffix; set params.format"):
        local(**{**tsv_files, "train_file": str(odd)})
    assert len(local(**{**tsv_files, "train_file": str(odd)}, format="tsv").train) == len(TSV_ROWS)


def test_hub_presets_are_registered():
    assert {"sst2", "imdb", "ag_news", "mnli", "snli", "hub_text_classification"} <= set(tasks.names())
    assert tasks.validate_params("mnli", {}).text_pair_column == "hypothesis"


def test_hub_dataset_offline_says_it_needs_a_network(no_network):
    with pytest.raises(KdbenchError) as info:
        load_task("hub_text_classification", {"dataset": "kdbench-tests/no-such-dataset"})
    message = str(info.value)
    assert "\n" not in message
    assert "'kdbench-tests/no-such-dataset'" in message and "need a network" in message
    assert "text_classification task with local files" in message


def shared(name: str) -> Path:
    folder = SHARED_DATA / name
    if not (folder / "train.tsv").is_file():
        pytest.skip(f"{folder} is absent")
    return folder


def test_sst2_local_copy_loads():
    folder = shared("sst2")
    data = local(train_file=str(folder / "train.tsv"), eval_file=str(folder / "test.tsv"), text_column="sentence")
    assert (len(data.train), len(data.eval)) == (60_614, 872)
    assert data.label_names == ["0", "1"]
    assert {r["label"] for r in data.eval} == {0, 1}
    first_eval = next(iter(csv.reader((folder / "test.tsv").open(), delimiter="\t", quoting=csv.QUOTE_NONE)))
    assert first_eval == ["sentence", "label"]
    assert data.eval[0] == {"text": "it 's a charming and often affecting journey . ", "label": 1}


def test_agnews_local_copy_loads_with_string_labels():
    folder = shared("agnews")
    names = ["World", "Sports", "Business", "Sci/Tech"]
    data = local(train_file=str(folder / "train.tsv"), eval_file=str(folder / "test.tsv"), labels=names)
    assert (len(data.train), len(data.eval)) == (10_001, 7_600)
    assert data.label_names == names
    assert {r["label"] for r in data.train} == {0, 1, 2, 3}
    assert data.eval[0]["label"] == names.index("Business")
    assert data.eval[0]["text"].startswith("Unions representing workers at Turner")
