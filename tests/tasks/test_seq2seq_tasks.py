"""Seq2seq tasks: the generated task's targets, local files, hub folders and presets, and the head's scoring
settings a task carries."""

import json
from pathlib import Path

import pytest

from kdbench.errors import KdbenchError
from kdbench.tasks import load_task, tasks
from kdbench.tasks.seq2seq import resolve_review, seq2seq_target


@pytest.mark.parametrize("source, target", [
    ("the movie was awful", "movie negative => negative"),
    ("the plot was not bad but the music was dull", "plot positive ; music negative => negative"),
    ("although the cast seemed never very good , the ending is fine", "cast negative ; ending positive => positive"),
    ("the film felt hardly boring , although the script was great", "film positive ; script positive => positive"),
    ("the story is truly lovely , although the pacing was not fun", "story positive ; pacing negative => positive"),
])
def test_generated_seq2seq_target_resolves_negation_and_contrast(source, target):
    assert seq2seq_target(source) == target


def test_generated_seq2seq_is_fixed_by_its_seed_and_noisy_in_train_only():
    params = {"train_size": 400, "eval_size": 200, "label_noise": 0.2, "forms": ["single", "but", "although_first"]}
    data = load_task("generated_seq2seq", params)
    assert data.head == "seq2seq" and data.transfer == []
    assert data == load_task("generated_seq2seq", params)
    assert data != load_task("generated_seq2seq", {**params, "seed": 7})
    assert all(r["target"] == seq2seq_target(r["source"]) for r in data.eval)
    wrong = [r for r in data.train if r["target"] != seq2seq_target(r["source"])]
    assert 0.1 < len(wrong) / len(data.train) < 0.3
    assert all(w["target"].rsplit(" ", 1)[0] == seq2seq_target(w["source"]).rsplit(" ", 1)[0] for w in wrong)
    assert {resolve_review(r["source"])[1] for r in data.eval} == {"positive", "negative"}


def write_rows(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows))
    else:
        keys = list(rows[0])
        path.write_text("\n".join(["\t".join(keys)] + ["\t".join(str(r[k]) for k in keys) for r in rows]))
    return path


def test_text_seq2seq_reads_tsv_and_jsonl_with_a_prefix(tmp_path):
    rows = [{"document": "a long text", "summary": "short"}, {"document": "another one", "summary": "brief"}]
    tsv = write_rows(tmp_path / "d.tsv", rows)
    data = load_task("text_seq2seq", {"train_file": str(tsv), "eval_file": str(tsv), "source_column": "document",
                                      "target_column": "summary", "prefix": "summarize: ", "max_eval": 1})
    assert data.head == "seq2seq"
    assert data.train == [{"source": "summarize: a long text", "target": "short"},
                          {"source": "summarize: another one", "target": "brief"}]
    assert data.eval == data.train[:1]
    jsonl = write_rows(tmp_path / "d.jsonl", [{"source": "x", "target": "y"}, {"source": "", "target": "z"}])
    assert load_task("text_seq2seq", {"train_file": str(jsonl), "eval_file": str(jsonl)}).train == [
        {"source": "x", "target": "y"}]  # a row without a source is dropped


def test_text_seq2seq_names_the_missing_column_or_file(tmp_path):
    tsv = write_rows(tmp_path / "d.tsv", [{"source": "a", "summary": "b"}])
    with pytest.raises(KdbenchError) as info:
        load_task("text_seq2seq", {"train_file": str(tsv), "eval_file": str(tsv)})
    assert str(info.value) == f"{tsv}: no column 'target'; columns are: source, summary"
    with pytest.raises(KdbenchError) as info:
        load_task("text_seq2seq", {"train_file": str(tmp_path / "nope.tsv"), "eval_file": str(tsv)})
    assert str(info.value) == f"task data file not found: {tmp_path / 'nope.tsv'}"
    empty = write_rows(tmp_path / "e.jsonl", [{"source": "", "target": "b"}])
    with pytest.raises(KdbenchError, match=r"e.jsonl: no row with a non-empty 'source' and 'target'$"):
        load_task("text_seq2seq", {"train_file": str(empty), "eval_file": str(empty)})


def test_hub_seq2seq_loads_a_local_dataset_folder(tmp_path):
    """The hub code path (datasets.load_dataset(name, config)) on a local folder, as a user's cache would serve it."""
    folder = tmp_path / "news"
    folder.mkdir()
    for split, n in (("train", 3), ("validation", 2)):
        write_rows(folder / f"{split}.jsonl", [{"document": f"{split} article {i}", "summary": f"h{i}"}
                                               for i in range(n)])
    data = load_task("xsum", {"dataset": str(folder), "max_train": 2})  # the preset, pointed at the folder
    assert data.train == [{"source": "summarize: train article 0", "target": "h0"},
                          {"source": "summarize: train article 1", "target": "h1"}]
    assert [r["target"] for r in data.eval] == ["h0", "h1"] and data.head == "seq2seq"
    plain = load_task("hub_seq2seq", {"dataset": str(folder), "source_column": "summary", "target_column": "document"})
    assert plain.eval[0] == {"source": "h0", "target": "validation article 0"}
    with pytest.raises(KdbenchError, match=r"^dataset '.*news': no split 'test'; splits are: train, validation$"):
        load_task("hub_seq2seq", {"dataset": str(folder), "eval_split": "test"})
    with pytest.raises(KdbenchError, match=r"^dataset '.*news': no column 'source'; columns are: document, summary$"):
        load_task("hub_seq2seq", {"dataset": str(folder)})


def test_hub_seq2seq_offline_says_it_needs_a_network(no_network):
    with pytest.raises(KdbenchError, match=r"^dataset 'kdbench-tests/none'.*need a network, or use the text_seq2seq"):
        load_task("hub_seq2seq", {"dataset": "kdbench-tests/none"})


def test_seq2seq_presets():
    xsum, cnn = tasks.validate_params("xsum", {}), tasks.validate_params("cnn_dailymail", {})
    assert (xsum.dataset, xsum.source_column, xsum.target_column) == ("EdinburghNLP/xsum", "document", "summary")
    assert (cnn.dataset, cnn.config, cnn.source_column, cnn.target_column) == (
        "abisee/cnn_dailymail", "3.0.0", "article", "highlights")
    assert xsum.prefix == cnn.prefix == "summarize: "


def test_seq2seq_tasks_take_the_scoring_settings():
    data = load_task("generated_seq2seq", {"train_size": 4, "eval_size": 2, "metric": "exact_match",
                                           "num_beams": 3})
    assert data.head_params == {"metric": "exact_match", "num_beams": 3, "max_new_tokens": None}
    assert tasks.validate_params("xsum", {}).metric == "rouge_l"  # a summarisation preset scores ROUGE-L
    with pytest.raises(KdbenchError, match=r"params.metric: Input should be 'perplexity', 'exact_match' or"):
        tasks.validate_params("cnn_dailymail", {"metric": "bleu"})
