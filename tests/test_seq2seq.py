"""Seq2seq (T5): the head against transformers' own loss, the Distiller's alignment, the tasks, and a tiny suite."""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from transformers import T5Config, T5ForConditionalGeneration

from kdbench import heads, models, runner
from kdbench.errors import KdbenchError
from kdbench.heads import IGNORE
from kdbench.kernels import kd_loss
from kdbench.methods import DistillationConfig, LogitKD
from kdbench.results import read_result, run_path
from kdbench.runner import run_suite
from kdbench.suite import InlineConfig, TrainingSettings, expand, load_suite
from kdbench.tasks import load_task, tasks
from kdbench.tasks.seq2seq import resolve_review, seq2seq_target
from kdbench.trainer import Distiller, training_arguments

T5 = {"model_type": "t5", "num_layers": 1, "num_heads": 2, "d_kv": 8, "relative_attention_num_buckets": 8}




@pytest.fixture(scope="module")
def data():
    return load_task("generated_seq2seq", {"train_size": 40, "eval_size": 12})


@pytest.fixture(scope="module")
def tok(data, tmp_path_factory):
    return models.train_tokenizer(heads.get("seq2seq").texts(data.train), 300, tmp_path_factory.mktemp("tok"))


def t5(tok, seed=0, **fields):
    config = T5Config(vocab_size=len(tok), d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8,
                      relative_attention_num_buckets=8, decoder_start_token_id=tok.pad_token_id, **fields)
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(config).eval()


# ---------------------------------------------------------------------------------------------------------------
# The head


def test_seq2seq_encodes_source_target_and_the_shifted_decoder_inputs(data, tok):
    head = heads.get("seq2seq")
    rows = head.encode(data.train[:8], tok, 32)
    first = rows[0]
    assert first["input_ids"] == tok(data.train[0]["source"])["input_ids"]
    target = tok(data.train[0]["target"], add_special_tokens=False)["input_ids"]
    assert first["labels"] == target + [tok.sep_token_id]  # the target ended by EOS (here [SEP]), no [CLS]
    assert first["decoder_input_ids"] == [tok.pad_token_id] + first["labels"][:-1]
    batch = head.collator(tok)(rows)
    assert batch["labels"].shape == batch["decoder_input_ids"].shape != batch["input_ids"].shape
    labelled = batch["labels"] != IGNORE
    assert not labelled.all() and torch.equal(labelled.sum(1), torch.tensor([len(r["labels"]) for r in rows]))
    # exactly what T5 builds from labels itself, wherever a label counts
    model = t5(tok)
    torch.testing.assert_close(batch["decoder_input_ids"][labelled], model._shift_right(batch["labels"])[labelled])
    short = head.encode(data.train[:1], tok, 3)[0]  # truncation keeps source and target within max_len
    assert len(short["input_ids"]) == len(short["labels"]) == len(short["decoder_input_ids"]) == 3
    assert head.encode([], tok, 8) == []


def test_seq2seq_loss_and_perplexity_match_transformers(data, tok):
    head = heads.get("seq2seq")
    rows = head.encode(data.eval, tok, 32)
    batch = head.collator(tok)(rows)
    model = t5(tok)
    with torch.no_grad():
        own = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        ours = model(**models.model_inputs(batch, model)).logits  # labels are dropped; decoder inputs from the rows
    torch.testing.assert_close(head.hard_loss(ours, batch["labels"]), own.loss, rtol=1e-5, atol=1e-6)
    # the metric: exp of T5's own mean token loss over the split (one batch here, so the means agree)
    assert head.evaluate(model, rows, head.collator(tok), "cpu", batch_size=5) == pytest.approx(
        math.exp(own.loss.item()), rel=1e-5)
    assert head.metric_name == "perplexity" and not head.higher_is_better


def test_distiller_distills_seq2seq_logits_without_a_shift(data, tok, tmp_path):
    """Decoder position i predicts label i: the KD loss is kd_loss over (B, Lt, V) against the labels as they are."""
    head = heads.get("seq2seq")
    rows = head.encode(data.train[:4], tok, 32)
    teacher, student = t5(tok, seed=1), t5(tok, seed=2)
    args = training_arguments(TrainingSettings(max_steps=1, batch_size=4), seed=0, device="cpu",
                              output_dir=str(tmp_path))
    trainer = Distiller(model=student, args=args, teacher=teacher, head=head,
                        objective=LogitKD(DistillationConfig(temperature=2.0, alpha=0.6)))
    batch = head.collator(tok)(rows)
    loss = trainer.compute_loss(student, dict(batch))
    with torch.no_grad():
        inputs = models.model_inputs(batch, student)
        s, t = student(**inputs).logits, teacher(**inputs).logits
    y = batch["labels"]
    torch.testing.assert_close(loss.detach(), kd_loss(s, t, y, temperature=2.0, alpha=0.6), rtol=1e-5, atol=1e-6)
    shifted = kd_loss(s[:, :-1], t[:, :-1], y[:, 1:], temperature=2.0, alpha=0.6)
    assert not torch.allclose(loss.detach(), shifted)


def test_seq2seq_texts_are_sources_and_targets():
    rows = [{"source": "a b", "target": "c"}, {"source": "d", "target": "e f"}]
    assert heads.get("seq2seq").texts(rows) == ["a b", "c", "d", "e f"]
    assert heads.get("classification").texts([{"text": "x", "label": 0}]) == ["x"]


# ---------------------------------------------------------------------------------------------------------------
# Models


def test_inline_t5_gets_a_decoder_start_token_and_is_described():
    ref = InlineConfig(**T5, d_model=16, d_ff=32)
    model = models.build_model(ref, head=heads.get("seq2seq"), num_labels=0, vocab_size=50, seed=0)
    assert isinstance(model, T5ForConditionalGeneration)
    assert model.config.decoder_start_token_id == model.config.pad_token_id == 0
    custom = models.build_model(InlineConfig(**T5, d_model=16, d_ff=32, decoder_start_token_id=3),
                                head=heads.get("seq2seq"), num_labels=0, vocab_size=50, seed=0)
    assert custom.config.decoder_start_token_id == 3
    assert models.describe(ref) == "t5 1L/16H"
    models.check_model_ref(InlineConfig(**T5, decoder_start_token_id=0), "pairs.p.student")
    with pytest.raises(KdbenchError, match="unknown bert config field 'decoder_start_token_id'"):
        models.check_model_ref(InlineConfig(model_type="bert", decoder_start_token_id=0), "pairs.p.student")


def test_a_local_t5_folder_loads_as_a_seq2seq_model(tok, tmp_path):
    """The from_pretrained path a hub name takes, on a folder (as t5-small's would be after a download)."""
    saved = t5(tok)
    saved.save_pretrained(str(tmp_path / "t5"))
    loaded = models.build_model(str(tmp_path / "t5"), head=heads.get("seq2seq"), num_labels=0, vocab_size=0, seed=0)
    assert isinstance(loaded, T5ForConditionalGeneration) and loaded.config.decoder_start_token_id == 0
    assert torch.equal(loaded.shared.weight, saved.shared.weight)


# ---------------------------------------------------------------------------------------------------------------
# Tasks


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


# ---------------------------------------------------------------------------------------------------------------
# End to end


def test_a_seq2seq_suite_runs_end_to_end_and_reports_perplexity(tmp_path):
    data = {
        "name": "tiny-t5", "device": "cpu", "seeds": [0],
        "tasks": [{"name": "s2s", "task": "generated_seq2seq", "params": {"train_size": 48, "eval_size": 16}}],
        "pairs": [{"name": "t5",
                   "teacher": {"model": {**T5, "d_model": 16, "d_ff": 32},
                               "finetune": {"max_steps": 2, "batch_size": 8}},
                   "student": {"model": {**T5, "d_model": 8, "d_ff": 16}}}],
        "methods": [{"name": "kd", "method": "logit", "params": {"temperature": 2.0}}],
        "compression": [{"name": "int8", "steps": [{"compressor": "int8"}]}],
        "training": {"max_steps": 2, "batch_size": 8, "max_seq_length": 32},
        "profiling": {"batch_sizes": [2], "warmup": 0, "min_repeats": 1, "max_repeats": 1, "time_budget_s": 0.01,
                      "memory": False, "seq_length": 24},
        "output_dir": str(tmp_path / "results"), "cache_dir": str(tmp_path / "cache"),
    }
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    suite = load_suite(tmp_path / "suite.yaml")
    outcome = run_suite(suite, show_progress=False)
    assert {r.run_id.split("__", 2)[2]: r.status for r in outcome.runs} == {
        "teacher": "ok", "student__s0": "ok", "kd__s0": "ok"}, [r.error for r in outcome.runs]
    out = outcome.results_dir
    teacher = read_result(run_path(out, "s2s__t5__teacher"))["variants"][0]
    student = read_result(run_path(out, "s2s__t5__student__s0"))["variants"][0]
    kd = read_result(run_path(out, "s2s__t5__kd__s0"))["variants"]
    assert [v["name"] for v in kd] == ["distilled", "int8"]
    for v in [teacher, student, *kd]:
        assert v["metric_name"] == "perplexity" and v["higher_is_better"] is False
        assert 1.0 < v["metric"] < float("inf")
    assert kd[0]["retention"] == pytest.approx(teacher["metric"] / kd[0]["metric"])
    assert student["params"] < teacher["params"]
    assert "(lower is better)" in (out / "README.md").read_text()

    # the pair's tokenizer learned the targets' words too ('positive' is in no source)
    ctx = runner.Context(suite, out, "cpu")
    spec = next(s for s in expand(suite) if s.kind == "teacher")
    assert {"positive", "negative"} <= set(ctx.tokenizer(spec).get_vocab())
    # the profiling batch carries the decoder inputs, at the profiling length for the source
    batch = runner.example_batch(spec, ctx, 3)
    assert batch["input_ids"].shape == (3, 24) and batch["decoder_input_ids"].shape[0] == 3
    assert "labels" not in batch


def test_seq2seq_suites_validate():
    from kdbench.suite import check_registry_names

    repo = Path(__file__).resolve().parents[1]
    for name in ("seq2seq-quickstart.yaml", "t5-large-to-t5-small.yaml"):
        suite = load_suite(repo / "suites" / name)
        check_registry_names(suite)
        assert {t.task for t in suite.tasks} <= {"generated_seq2seq", "xsum", "cnn_dailymail"}



@pytest.mark.parametrize("method", ["hidden", "attention", "progressive"])
def test_layer_methods_refuse_encoder_decoders_in_one_line(tok, method):
    from kdbench.methods import make_objective

    culprit = rf"^method '{method}': encoder-decoder models \(T5\) .* use the logit method$"
    with pytest.raises(KdbenchError, match=culprit):
        make_objective(method, {}).setup(t5(tok), t5(tok))
