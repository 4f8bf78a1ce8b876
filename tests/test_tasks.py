"""Tasks: the generated sentiment task's rules, local text-classification files, the real SST-2 / AG News copies."""

import csv
import json
import random
from pathlib import Path

import pytest

from kdbench.errors import KdbenchError
from kdbench.heads.classification import accuracy
from kdbench.tasks import TEACHER_LABEL, load_task, tasks
from kdbench.tasks.generated import _NEGATIVE, _NEGATORS, _POSITIVE, FORMS, generate_sentiment_example

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


# ---------------------------------------------------------------------------------------------------------------
# generated_sentiment


def clause_polarity(clause: str) -> int:
    """+1/-1 for 'the plot was [not] [very] good': the adjective's sign, flipped by a negator."""
    words = clause.split()
    adjective = words[-1]
    assert (adjective in _POSITIVE) != (adjective in _NEGATIVE), clause
    sign = 1 if adjective in _POSITIVE else -1
    return -sign if any(w in _NEGATORS for w in words) else sign


def rule_label(text: str) -> int:
    """The task's rules, written independently: in 'A but B' and 'although A , B' B decides; in 'A , although B'
    A does; a single clause decides alone."""
    if text.startswith("although "):
        a, b = text[len("although "):].split(" , ")
        deciding = b
    elif " , although " in text:
        deciding = text.split(" , although ")[0]
    elif " but " in text:
        deciding = text.split(" but ")[1]
    else:
        deciding = text
    return int(clause_polarity(deciding) > 0)


@pytest.mark.parametrize(
    "text, label",
    [
        ("the plot was good", 1),
        ("the plot was not good", 0),
        ("the acting felt never very bad", 1),
        ("the music is hardly charming", 0),
        ("the plot was good but the ending was awful", 0),
        ("the plot was awful but the ending was not bad", 1),
        ("although the cast was great , the script was dull", 0),
        ("although the cast was not great , the script was really fun", 1),
        ("the cast was great , although the script was dull", 1),
        ("the cast was not great , although the script was fun", 0),
    ],
)
def test_rules_on_constructed_examples(text, label):
    assert rule_label(text) == label


def test_generated_labels_follow_the_rules():
    rng = random.Random(0)
    examples = [generate_sentiment_example(rng, FORMS) for _ in range(2000)]
    for text, label in examples:
        assert label == rule_label(text), text
    # The rules are exercised, not trivially satisfied: every form occurs, negators occur, and clauses disagree
    # often enough that a bag of words cannot tell the label.
    assert any(" but " in t for t, _ in examples)
    assert any(t.startswith("although ") for t, _ in examples)
    assert any(" , although " in t for t, _ in examples)
    assert any(any(f" {n} " in t for n in _NEGATORS) for t, _ in examples)
    disagree = [t for t, _ in examples if " but " in t and len({clause_polarity(c) for c in t.split(" but ")}) == 2]
    assert len(disagree) > 100
    assert {label for _, label in examples} == {0, 1}


def test_forms_restrict_the_structure():
    rng = random.Random(1)
    texts = [generate_sentiment_example(rng, ("single",))[0] for _ in range(200)]
    assert not any(" but " in t or "although" in t for t in texts)


def sentiment(**params):
    return load_task("generated_sentiment", {"train_size": 300, "transfer_size": 50, "eval_size": 200, **params})


def test_generated_sentiment_is_deterministic_for_a_seed():
    a, b = sentiment(seed=7), sentiment(seed=7)
    assert (a.train, a.transfer, a.eval) == (b.train, b.transfer, b.eval)
    c = sentiment(seed=8)
    assert [r["text"] for r in c.train] != [r["text"] for r in a.train]


def test_generated_sentiment_splits():
    data = sentiment(label_noise=0.2, forms=["single", "but", "although_first", "although_second"])
    assert (len(data.train), len(data.transfer), len(data.eval)) == (300, 50, 200)
    assert data.label_names == ["negative", "positive"] and data.num_labels == 2
    assert data.head == "classification"
    # The transfer set is unlabelled: the teacher labels it during distillation.
    assert {r["label"] for r in data.transfer} == {TEACHER_LABEL}
    # Eval stays clean; train carries the requested share of flipped labels.
    assert all(r["label"] == rule_label(r["text"]) for r in data.eval)
    flipped = sum(r["label"] != rule_label(r["text"]) for r in data.train) / len(data.train)
    assert 0.1 < flipped < 0.3
    clean = sentiment(label_noise=0.0)
    assert all(r["label"] == rule_label(r["text"]) for r in clean.train)


def test_generated_sentiment_params_are_validated():
    with pytest.raises(KdbenchError, match=r"task 'generated_sentiment': params.forms"):
        sentiment(forms=["sarcasm"])
    with pytest.raises(KdbenchError, match=r"params.label_noise"):
        sentiment(label_noise=0.5)


# ---------------------------------------------------------------------------------------------------------------
# text_classification: local TSV / CSV / JSONL


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


# ---------------------------------------------------------------------------------------------------------------
# Hub presets: they need a network, and say so in one line



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


# ---------------------------------------------------------------------------------------------------------------
# Causal language modelling tasks


def test_generated_lm_is_reviews_with_their_verdicts():
    data = load_task("generated_lm", {"train_size": 40, "eval_size": 10, "seed": 7})
    assert (len(data.train), len(data.eval), data.head, data.transfer) == (40, 10, "causal_lm", [])
    for row in data.train + data.eval:
        review, verdict = row["text"].split(" => ")
        assert verdict == ("negative", "positive")[rule_label(review)]
    assert load_task("generated_lm", {"train_size": 40, "eval_size": 10, "seed": 7}).train == data.train


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


def test_accuracy():
    assert accuracy([1, 0, 2, 2], [1, 1, 2, 0]) == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------------------------
# The real copies in ../shared/data (skipped when absent)


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
