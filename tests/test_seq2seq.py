"""Seq2seq (T5): the head against transformers' own loss, the Distiller's alignment, the tasks, and a tiny suite."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from transformers import T5ForConditionalGeneration

from kdbench import heads, models, runner
from kdbench.errors import KdbenchError
from kdbench.heads import IGNORE
from kdbench.kernels import kd_loss
from kdbench.methods import DistillationConfig, LogitKD, LogitParams
from kdbench.results import read_result, run_path
from kdbench.runner import run_suite
from kdbench.suite import InlineConfig, TrainingSettings, expand, load_suite
from kdbench.tasks import load_task, tasks
from kdbench.tasks.seq2seq import resolve_review, seq2seq_target
from kdbench.trainer import Distiller, training_arguments
from tiny import T5
from tiny import tiny_t5 as t5





@pytest.fixture(scope="module")
def data():
    return load_task("generated_seq2seq", {"train_size": 40, "eval_size": 12})


@pytest.fixture(scope="module")
def tok(data, tmp_path_factory):
    return models.train_tokenizer(heads.get("seq2seq").texts(data.train), 300, tmp_path_factory.mktemp("tok"))




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


@pytest.mark.parametrize("k", [3, 100_000])
def test_a_cached_top_k_teacher_lines_up_with_ragged_targets(data, tok, k, tmp_path):
    """cache_teacher_top_k once, then batches of rows with targets of different lengths (padded by TopKCollator):
    the loss is top_k_kd_loss of the teacher's top-k made from its logits on the same batch, and with k covering
    the vocabulary, kd_loss itself. The Distiller is given no teacher: the batches carry it."""
    from kdbench import trainer
    from kdbench.kernels import teacher_top_k, top_k_kd_loss

    head = heads.get("seq2seq")
    rows = head.encode(data.train[:6], tok, 32)
    assert len({len(r["labels"]) for r in rows}) > 1  # ragged targets: the collator pads
    teacher, student = t5(tok, seed=1), t5(tok, seed=2)
    collator = head.collator(tok)
    cached = trainer.cache_teacher_top_k(teacher, rows, collator, "cpu", k=k, temperature=2.0)
    assert [len(r["teacher_top_ids"]) for r in cached] == [len(r["labels"]) for r in rows]
    trainer.save_teacher_top_k(tmp_path / "top.pt", cached)  # saved and loaded back, as a resumed suite does
    loaded = trainer.load_teacher_top_k(tmp_path / "top.pt", rows)
    for a, b in zip(loaded, cached):
        assert all(torch.equal(a[key], b[key]) for key in trainer.TopKCollator.KEYS)
    assert trainer.load_teacher_top_k(tmp_path / "top.pt", rows[1:]) is None  # saved for other rows
    cached = loaded
    drawn = [trainer.cache_teacher_top_k(teacher, rows, collator, "cpu", k=k, temperature=2.0, sampled=True)
             for _ in range(2)]
    for a, b in zip(*drawn):  # the draws are seeded by the rows: the same cache every time
        assert all(torch.equal(a[key], b[key]) for key in trainer.TopKCollator.KEYS)
    objective = LogitKD(LogitParams(temperature=2.0, alpha=0.6, teacher_top_k=k))
    distiller = Distiller(model=student, args=training_arguments(TrainingSettings(max_steps=1), seed=0,
                                                                device="cpu", output_dir=str(tmp_path)),
                          teacher=None, head=head, objective=objective)
    batch = trainer.TopKCollator(collator)(cached[1:5])
    loss = distiller.compute_loss(student, dict(batch))
    plain = collator(rows[1:5])
    with torch.no_grad():
        inputs = models.model_inputs(plain, student)
        s, t = student(**inputs).logits, teacher(**inputs).logits
    y = plain["labels"]
    want = top_k_kd_loss(s, *teacher_top_k(t, k, temperature=2.0), y, temperature=2.0, alpha=0.6)
    torch.testing.assert_close(loss.detach(), want, rtol=1e-5, atol=1e-6)
    if k > s.shape[-1]:
        torch.testing.assert_close(loss.detach(), kd_loss(s, t, y, temperature=2.0, alpha=0.6), rtol=1e-5, atol=1e-6)


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


def tiny_suite(tmp_path, methods: list[dict], teacher: dict | None = None):
    """A tiny T5 suite (2 training steps) with `methods`, written to tmp_path and loaded; `teacher`: its model."""
    data = {
        "name": "tiny-t5", "device": "cpu", "seeds": [0],
        "tasks": [{"name": "s2s", "task": "generated_seq2seq", "params": {"train_size": 48, "eval_size": 16}}],
        "pairs": [{"name": "t5",
                   "teacher": {"model": teacher or {**T5, "d_model": 16, "d_ff": 32},
                               "finetune": {"max_steps": 2, "batch_size": 8}},
                   "student": {"model": {**T5, "d_model": 8, "d_ff": 16}}}],
        "methods": methods,
        "compression": [{"name": "int8", "steps": [{"compressor": "int8"}]}],
        "training": {"max_steps": 2, "batch_size": 8, "max_seq_length": 32},
        "profiling": {"batch_sizes": [2], "warmup": 0, "min_repeats": 1, "max_repeats": 1, "time_budget_s": 0.01,
                      "memory": False, "seq_length": 24},
        "output_dir": str(tmp_path / "results"), "cache_dir": str(tmp_path / "cache"),
    }
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return load_suite(tmp_path / "suite.yaml")


def test_a_seq2seq_suite_runs_end_to_end_and_reports_perplexity(tmp_path):
    suite = tiny_suite(tmp_path, [{"name": "kd", "method": "logit", "params": {"temperature": 2.0}}])
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
    for name in ("seq2seq-quickstart.yaml", "t5-large-to-t5-small.yaml", "bart-large-cnn-to-distilbart.yaml"):
        suite = load_suite(repo / "suites" / name)
        check_registry_names(suite)
        assert {t.task for t in suite.tasks} <= {"generated_seq2seq", "xsum", "cnn_dailymail"}


# ---------------------------------------------------------------------------------------------------------------
# Layer methods (hidden, attention) on T5 pairs: each stack mapped to the teacher's stack of the same kind


def t5_pair(tok):
    """(student, teacher): encoder 2 -> 4 layers, decoder 1 -> 2, d_model 16 -> 32, heads 2 -> 4; no dropout."""
    teacher = t5(tok, seed=1, d_model=32, d_ff=64, num_layers=4, num_decoder_layers=2, num_heads=4, dropout_rate=0.0)
    student = t5(tok, seed=2, num_layers=2, num_decoder_layers=1, dropout_rate=0.0)
    return student, teacher


def test_layer_methods_map_each_t5_stack_to_the_teachers_stack_of_the_same_kind(tok):
    from kdbench.methods import make_objective

    student, teacher = t5_pair(tok)
    hidden, attention = make_objective("hidden", {}), make_objective("attention", {})
    hidden.setup(student, teacher)
    attention.setup(student, teacher)
    assert hidden.layer_maps == {"encoder": {0: 0, 1: 2, 2: 4}, "decoder": {0: 0, 1: 2}}
    assert attention.layer_maps == {"encoder": {1: 2, 2: 4}, "decoder": {1: 2}}
    assert hidden.layer_map == {0: 0, 1: 2, 2: 4} and hidden.decoder_layer_map == {0: 0, 1: 2}
    assert {k: (m.in_features, m.out_features) for k, m in hidden.modules.items()} == {
        "encoder_0": (16, 32), "encoder_1": (16, 32), "encoder_2": (16, 32), "decoder_0": (16, 32),
        "decoder_1": (16, 32)}  # one projection per mapped index per stack, d_model -> teacher d_model
    # num_decoder_layers left out: the decoder has num_layers layers, as in T5Config
    default = make_objective("attention", {})
    default.setup(t5(tok, num_layers=2), t5(tok, num_layers=3))
    assert default.layer_maps == {"encoder": {1: 2, 2: 3}, "decoder": {1: 2, 2: 3}}

    # a user's layer_map applies to both stacks; decoder_layer_map gives the decoder its own
    both = make_objective("attention", {"layer_map": {1: 2}})
    both.setup(student, teacher)
    assert both.layer_maps == {"encoder": {1: 2}, "decoder": {1: 2}}
    own = make_objective("hidden", {"layer_map": {2: 4}, "decoder_layer_map": {1: 1, 0: 0}})
    own.setup(student, teacher)
    assert own.layer_maps == {"encoder": {2: 4}, "decoder": {0: 0, 1: 1}}
    assert list(own.modules) == ["encoder_2", "decoder_0", "decoder_1"]


@pytest.mark.parametrize("method, params, message", [
    ("hidden", {"layer_map": {2: 4}}, ("params.layer_map: student index 2 is out of range (the student's decoder "
                                       "has 1 layer: hidden-state indices 0..1, 0 = embeddings)")),
    ("attention", {"layer_map": {3: 1}}, ("params.layer_map: student index 3 is out of range (the student's "
                                          "encoder has 2 layers: layers 1..2)")),
    ("attention", {"decoder_layer_map": {1: 3}}, ("params.decoder_layer_map: teacher index 3 is out of range "
                                                  "(the teacher's decoder has 2 layers: layers 1..2)")),
    ("hidden", {"decoder_layer_map": {}}, "params.decoder_layer_map is empty; leave it out for the uniform map"),
    ("progressive", {"decoder_layer_map": {2: 1}}, ("params.decoder_layer_map: student index 2 is out of range "
                                                    "(the student's decoder has 1 layer: layers 1..1)")),
])
def test_a_bad_t5_layer_map_fails_at_setup_in_one_line_naming_the_stack(tok, method, params, message):
    from kdbench.methods import make_objective

    with pytest.raises(KdbenchError) as info:
        make_objective(method, params).setup(*t5_pair(tok))
    assert str(info.value) == f"method {method!r}: {message}"


def test_layer_methods_refuse_a_mixed_pair_and_a_decoder_map_without_a_decoder(tok):
    from transformers import BertConfig, BertForSequenceClassification

    from kdbench.methods import make_objective

    bert = BertForSequenceClassification(BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=32))
    with pytest.raises(KdbenchError, match=r"^method 'hidden': the student is an encoder-decoder and the teacher is "
                                           r"not; layer maps pair stacks of the same kind, use the logit method$"):
        make_objective("hidden", {}).setup(t5(tok), bert)
    with pytest.raises(KdbenchError, match=r"^method 'attention': the teacher is an encoder-decoder and the student"):
        make_objective("attention", {}).setup(bert, t5(tok))
    with pytest.raises(KdbenchError, match=r"^method 'attention': params.decoder_layer_map is for encoder-decoder "
                                           r"pairs \(T5\); this pair has one layer stack, use params.layer_map$"):
        make_objective("attention", {"decoder_layer_map": {1: 1}}).setup(bert, bert)


def seq2seq_batch(data, tok, n: int = 4) -> dict:
    head = heads.get("seq2seq")
    batch = head.collator(tok)(head.encode(data.train[:n], tok, 32))
    assert not batch["attention_mask"].all() and not (batch["labels"] != IGNORE).all()  # padding on both sides
    return batch


def t5_distiller(student, teacher, objective, tmp_path):
    args = training_arguments(TrainingSettings(), seed=0, device="cpu", output_dir=str(tmp_path))
    return Distiller(model=student, args=args, teacher=teacher, objective=objective, head=heads.get("seq2seq"))


def t5_outputs(model, batch, objective):
    return model(**models.model_inputs(batch, model), output_hidden_states=objective.needs_hidden_states,
                 output_attentions=objective.needs_attentions)


def test_hidden_on_t5_is_kd_loss_with_both_stacks_real_tokens_and_trains_student_and_projections(data, tok, tmp_path):
    from kdbench.methods import HiddenParams, HiddenStateKD

    student, teacher = t5_pair(tok)
    objective = HiddenStateKD(HiddenParams(temperature=2.0, alpha=0.6, feature_weight=0.5))
    d = t5_distiller(student, teacher, objective, tmp_path)
    batch = seq2seq_batch(data, tok)
    loss = d.compute_loss(student, dict(batch))
    assert math.isfinite(loss.item()) and loss.item() > 0

    # by hand: the encoder's real source tokens, then the decoder's labelled target positions, through the projections
    with torch.no_grad():
        so, to = t5_outputs(student, batch, objective), t5_outputs(teacher, batch, objective)
        fs, ft = [], []
        for stack, keep in (("encoder", batch["attention_mask"].bool()), ("decoder", batch["labels"] != IGNORE)):
            s_hidden, t_hidden = getattr(so, f"{stack}_hidden_states"), getattr(to, f"{stack}_hidden_states")
            for s, t in objective.layer_maps[stack].items():
                fs.append(objective.modules[f"{stack}_{s}"](s_hidden[s][keep]))
                ft.append(t_hidden[t][keep])
        fs, ft = torch.cat(fs), torch.cat(ft)
        rows = 3 * int(batch["attention_mask"].sum()) + 2 * int((batch["labels"] != IGNORE).sum())
        assert fs.shape == ft.shape == (rows, 32)
        expected = kd_loss(so.logits, to.logits, batch["labels"], temperature=2.0, alpha=0.6, student_features=fs,
                           teacher_features=ft, feature_weight=0.5)
        logit_only = kd_loss(so.logits, to.logits, batch["labels"], temperature=2.0, alpha=0.6)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    assert loss.item() > logit_only.item()

    loss.backward()
    for name, p in objective.modules.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for stack in (student.encoder, student.decoder):
        assert stack.block[0].layer[0].SelfAttention.q.weight.grad.abs().sum() > 0
    assert student.encoder.block[1].layer[-1].DenseReluDense.wo.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def with_other_padding(batch: dict, tok, seed: int) -> dict:
    """The batch with other token ids at its padded source positions and its unlabelled decoder positions."""
    g = torch.Generator().manual_seed(seed)
    out = {k: v.clone() for k, v in batch.items()}
    for key, pad in (("input_ids", batch["attention_mask"] == 0), ("decoder_input_ids", batch["labels"] == IGNORE)):
        out[key][pad] = torch.randint(5, len(tok), (int(pad.sum()),), generator=g)
    return out


@pytest.mark.parametrize("method", ["hidden", "attention"])
def test_layer_methods_on_t5_leave_out_source_and_target_padding(data, tok, tmp_path, monkeypatch, method):
    from kdbench import kernels
    from kdbench.methods import make_objective
    from kdbench.trainer import objective_attached

    calls = []

    def spy(*args, **kwargs):  # the one kd_loss call of a loss: record its features
        calls.append((kwargs["student_features"], kwargs["teacher_features"]))
        return real(*args, **kwargs)

    real = kernels.kd_loss
    monkeypatch.setattr(kernels, "kd_loss", spy)
    student, teacher = t5_pair(tok)
    objective = make_objective(method, {})
    d = t5_distiller(student, teacher, objective, tmp_path)
    batch = seq2seq_batch(data, tok)
    other = with_other_padding(batch, tok, seed=0)
    source, target = batch["attention_mask"], batch["labels"] != IGNORE

    def features(inputs, **masks):
        calls.clear()
        so, to = t5_outputs(student, inputs, objective), t5_outputs(teacher, inputs, objective)
        loss = objective.loss(so, to, inputs["labels"], **masks)
        [(fs, ft)] = calls
        return loss, fs, ft

    with objective_attached(student, teacher, objective), torch.no_grad():
        loss = d.compute_loss(student, dict(batch))
        [masked] = calls
        assert d.compute_loss(student, dict(other)).item() == loss.item()  # other padding: the same loss
        assert all(torch.equal(a, b) for a, b in zip(calls[-1], masked))  # ... from the same features
        both = features(batch, attention_mask=source, decoder_attention_mask=target)
        assert both[0].item() == loss.item() and all(torch.equal(a, b) for a, b in zip(both[1:], masked))
        # Each stack's mask is what keeps the padding out: without it, the padded positions' features change.
        for masks in ({"attention_mask": source}, {"decoder_attention_mask": target}):
            _, fs, ft = features(batch, **masks)
            _, fs_other, ft_other = features(other, **masks)
            assert fs.shape[0] > masked[0].shape[0] and not torch.equal(fs, fs_other), masks
            assert not torch.equal(ft, ft_other), masks


def test_attention_on_t5_matches_encoder_decoder_and_cross_maps_at_real_entries(data, tok):
    from kdbench.methods import AttentionKD, AttentionParams
    from kdbench.trainer import objective_attached

    student, teacher = t5_pair(tok)
    batch = seq2seq_batch(data, tok)
    source, target = batch["attention_mask"], batch["labels"] != IGNORE
    ns, nt = source.sum(1), target.sum(1)
    for cross in (True, False):
        objective = AttentionKD(AttentionParams(cross_attention=cross))
        objective.setup(student, teacher)  # encoder {1: 2, 2: 4}, decoder {1: 2}; heads 2 vs 4, averaged
        with objective_attached(student, teacher, objective), torch.no_grad():
            so, to = t5_outputs(student, batch, objective), t5_outputs(teacher, batch, objective)
        fs, ft = objective.stack_features(so, to, source, target)
        encoder = 2 * int((ns * ns).sum())  # 2 pairs, real query x real key
        decoder = int((nt * (nt + 1) // 2).sum())  # 1 pair, real query x real key at or before it
        assert fs.shape == ft.shape == (encoder + decoder + cross * int((nt * ns).sum()), 1)
    # the encoder's first pair (student layer 1, teacher layer 2), sequence 0; the decoder's, its last sequence
    n, m = int(ns[0]), int(nt[-1])
    torch.testing.assert_close(fs[: n * n, 0], so.encoder_attentions[0][0].mean(0)[:n, :n].flatten())
    torch.testing.assert_close(ft[: n * n, 0], to.encoder_attentions[1][0].mean(0)[:n, :n].flatten())
    causal = torch.ones(m, m, dtype=torch.bool).tril()
    torch.testing.assert_close(ft[-(m * (m + 1) // 2):, 0], to.decoder_attentions[1][-1].mean(0)[:m, :m][causal])

    # identical models: the attention term, cross-attention included, is exactly 0
    objective = AttentionKD()
    objective.setup(teacher, teacher)
    with objective_attached(teacher, teacher, objective), torch.no_grad():
        out = t5_outputs(teacher, batch, objective)
    fs, ft = objective.stack_features(out, out, source, target)
    assert torch.equal(fs, ft) and len(objective.outputs()) == 3


def test_progressive_on_t5_walks_the_encoder_then_the_decoder(tok):
    """Stages: each mapped encoder layer, then each mapped decoder layer, then logit KD. A decoder stage trains
    decoder blocks alone and matches decoder hidden states on the target positions."""
    import torch.nn.functional as F

    from kdbench.methods import make_objective

    student, teacher = t5_pair(tok)  # encoder 2 -> 4, decoder 1 -> 2
    objective = make_objective("progressive", {"feature_weight": 0.5})
    objective.setup(student, teacher)
    assert objective.stage_pairs == [("encoder", 1, 2), ("encoder", 2, 4), ("decoder", 1, 2)]
    assert objective.schedule(8) == [2, 1, 1, 4]
    def part(name):  # "encoder.block.1.layer.0..." -> "encoder.1"; "encoder.final_layer_norm.weight" -> "encoder"
        bits = name.split(".")
        return f"{bits[0]}.{bits[2]}" if bits[1:2] == ["block"] else bits[0]

    stages = objective.stage_parameters(student)
    names = [{part(n) for n, p in student.named_parameters() if any(p is q for q in group)} for group in stages]
    assert names[:3] == [{"shared", "encoder.0"}, {"encoder.1"}, {"decoder.0"}]
    # the final stage trains everything, the final norms (and an untied LM head) only there
    assert {id(p) for p in stages[3]} == {id(p) for p in student.parameters()}
    assert {"encoder", "decoder"} <= names[3] and not {"encoder", "decoder"} & set().union(*names[:3])
    sparse = make_objective("progressive", {"layer_map": {2: 4}, "decoder_layer_map": {1: 1}})
    sparse.setup(student, teacher)
    assert sparse.stage_pairs == [("encoder", 2, 4), ("decoder", 1, 1)]

    g = torch.Generator().manual_seed(0)

    def outputs(width, enc, dec):
        return SimpleNamespace(logits=torch.randn(2, 3, 50, generator=g),
                               encoder_hidden_states=[torch.randn(2, 4, width, generator=g) for _ in range(enc + 1)],
                               decoder_hidden_states=[torch.randn(2, 3, width, generator=g) for _ in range(dec + 1)])

    s, t = outputs(16, 2, 1), outputs(32, 4, 2)
    source_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    target_mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    labels = torch.tensor([[3, 4, 1], [5, -100, -100]])
    with torch.no_grad():
        for stage, (stack, si, ti, mask) in enumerate([("encoder", 1, 2, source_mask), ("decoder", 1, 2, target_mask)],
                                                      start=1):
            objective.stage = 1 if stack == "encoder" else 3
            lin = objective.modules[f"{stack}_{si}"]
            hs, ht = getattr(s, f"{stack}_hidden_states")[si], getattr(t, f"{stack}_hidden_states")[ti]
            expected = 0.5 * F.mse_loss(lin(hs[mask.bool()]), ht[mask.bool()]).item()
            got = objective.loss(s, t, labels, attention_mask=source_mask, decoder_attention_mask=target_mask)
            assert got.item() == pytest.approx(expected, rel=1e-6), (stage, stack)
        objective.stage = None
        assert objective.loss(s, t, labels, attention_mask=source_mask, decoder_attention_mask=target_mask).item() > 0


def test_a_seq2seq_suite_distills_with_hidden_attention_and_progressive(tmp_path):
    methods = [{"name": "fitnets", "method": "hidden", "params": {"temperature": 2.0}},
               {"name": "at", "method": "attention", "params": {"temperature": 2.0}},
               {"name": "prog", "method": "progressive", "params": {"temperature": 2.0}}]
    teacher = {**T5, "num_layers": 2, "num_heads": 4, "d_model": 16, "d_ff": 32}  # 2 + 2 layers, 4 heads
    outcome = run_suite(tiny_suite(tmp_path, methods, teacher=teacher), show_progress=False)
    assert {r.run_id.split("__", 2)[2]: r.status for r in outcome.runs} == {
        "teacher": "ok", "student__s0": "ok", "fitnets__s0": "ok", "at__s0": "ok", "prog__s0": "ok"}, [
        r.error for r in outcome.runs]
    out = outcome.results_dir
    student = read_result(run_path(out, "s2s__t5__student__s0"))["variants"][0]
    for name in ("fitnets", "at", "prog"):
        variants = read_result(run_path(out, f"s2s__t5__{name}__s0"))["variants"]
        assert [v["name"] for v in variants] == ["distilled", "int8"]
        assert 1.0 < variants[0]["metric"] < float("inf")
        assert variants[0]["params"] == student["params"]  # the projections were dropped after training
