"""A student from its teacher's layers (kdbench.student_init): the copied weights against the teacher's own, for each
family, the config, the parameter count, a save that loads back, and every refusal."""

import logging

import pytest
import torch
import transformers as tf
import yaml

from kdbench.errors import KdbenchError
from kdbench.student_init import build_student, from_teacher
from kdbench.suite import load_suite

V = 61  # an odd vocabulary


def _bert(n=5):
    return tf.BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=n, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=32, num_labels=3)


FAMILIES = {
    "bert": (lambda: _bert(5), tf.AutoModelForSequenceClassification, {"layers": [0, 2, 4]}, {"": [0, 2, 4]}),
    "distilbert": (lambda: tf.DistilBertConfig(vocab_size=V, dim=16, n_layers=4, n_heads=2, hidden_dim=32,
                                               max_position_embeddings=32),
                   tf.AutoModelForSequenceClassification, {"every": 2}, {"": [0, 2]}),
    "gpt2": (lambda: tf.GPT2Config(vocab_size=V, n_embd=16, n_layer=5, n_head=2, n_positions=32,
                                   bos_token_id=0, eos_token_id=0),
             tf.AutoModelForCausalLM, {"every": 2}, {"": [0, 2, 4]}),
    "llama": (lambda: tf.LlamaConfig(vocab_size=V, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                                     num_key_value_heads=1, intermediate_size=32, max_position_embeddings=32),
              tf.AutoModelForCausalLM, {"layers": [1, 3]}, {"": [1, 3]}),
    "t5": (lambda: tf.T5Config(vocab_size=V, d_model=16, d_ff=32, num_layers=3, num_decoder_layers=4, num_heads=2,
                               d_kv=8, relative_attention_num_buckets=8, decoder_start_token_id=0),
           tf.AutoModelForSeq2SeqLM, {"encoder_layers": [1, 2], "decoder_layers": [0, 3]},
           {"encoder": [1, 2], "decoder": [0, 3]}),
    "bart": (lambda: tf.BartConfig(vocab_size=V, d_model=16, encoder_layers=3, decoder_layers=4,
                                   encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                   decoder_ffn_dim=32, max_position_embeddings=32),
             tf.AutoModelForSeq2SeqLM, {"every": 2, "decoder_layers": [3]}, {"encoder": [0, 2], "decoder": [3]}),
}


def _teacher(family):
    config, auto, _, _ = FAMILIES[family]
    torch.manual_seed(0)
    return auto.from_config(config()).eval()


def _block_lists(model) -> dict[str, str]:
    """{stack: the dotted name of its block list}, read from the model's own module tree."""
    from kdbench.introspect import stack_blocks

    ids = {id(m): name for name, m in model.named_modules()}
    return {stack: ids[id(blocks)] for stack, blocks in stack_blocks(model).items()}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_student_holds_the_teachers_own_tensors(family, tmp_path):
    config, auto, selection, keep = FAMILIES[family]
    teacher = _teacher(family)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = from_teacher(teacher, **selection)
    assert type(student) is type(teacher)

    t_state, s_state = teacher.state_dict(), student.state_dict()
    lists = _block_lists(student)
    assert lists == _block_lists(teacher)
    mapped = set()
    for key, value in s_state.items():
        source = key
        for stack, name in lists.items():
            if key.startswith(name + "."):
                j, rest = key[len(name) + 1:].split(".", 1)
                source = f"{name}.{keep[stack][int(j)]}.{rest}"
                if family == "t5" and "relative_attention_bias" in rest:
                    assert j == "0"  # T5's position bias lives in the first block: the teacher's first block's
                    source = f"{name}.0.{rest}"
        assert torch.equal(value, t_state[source]), key
        mapped.add(source)
    outside = {k for k in t_state if not any(k.startswith(n + ".") for n in lists.values())}
    assert outside <= mapped  # embeddings, final norm, head: all of them copied

    # the config's layer counts, and a parameter count equal to that of a model built from the student's config
    config_dict = student.config.to_dict()
    for stack, kept in keep.items():
        names = {"": ("n_layer", "n_layers", "num_hidden_layers"), "encoder": ("encoder_layers", "num_layers"),
                 "decoder": ("decoder_layers", "num_decoder_layers")}[stack]
        field = next(f for f in names if f in config_dict)
        assert config_dict[field] == len(kept)
    fresh = auto.from_config(student.config)
    assert sum(p.numel() for p in student.parameters()) == sum(p.numel() for p in fresh.parameters())
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in teacher.parameters())

    # the teacher is left as it was
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert teacher.state_dict().keys() == before.keys()

    # saves and loads back through the Auto classes, weights and outputs alike
    student.save_pretrained(tmp_path)
    loaded = auto.from_pretrained(str(tmp_path)).eval()
    assert loaded.state_dict().keys() == s_state.keys()
    assert all(torch.equal(v, s_state[k]) for k, v in loaded.state_dict().items())
    ids = torch.randint(1, V, (2, 7))
    extra = {"decoder_input_ids": ids[:, :5]} if "encoder" in keep else {}
    with torch.no_grad():
        assert torch.equal(student.eval()(input_ids=ids, **extra).logits, loaded(input_ids=ids, **extra).logits)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_decoder_student_uses_its_cache_like_a_full_forward(family):
    """Kept blocks take the cache slots of their new places: one step on the cache gives the full forward's
    logits."""
    student = from_teacher(_teacher(family), **FAMILIES[family][2]).eval()
    ids = torch.randint(1, V, (2, 6))
    with torch.no_grad():
        full = student(input_ids=ids).logits[:, -1]
        past = student(input_ids=ids[:, :-1], use_cache=True).past_key_values
        step = student(input_ids=ids[:, -1:], past_key_values=past, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)


def test_every_keeps_the_first_layer_and_each_kth_after_it():
    student = from_teacher(_teacher("bert"), every=3)  # 5 layers: 0, 3
    assert student.config.num_hidden_layers == 2
    teacher = _teacher("bert")
    assert torch.equal(student.bert.encoder.layer[1].output.dense.weight,
                       teacher.bert.encoder.layer[3].output.dense.weight)


@pytest.mark.parametrize("selection, fragment", [
    ({"layers": [0, 5]}, "layers index 5 is out of range; the teacher has 5 layers (0 to 4)"),
    ({"layers": [-1]}, "layers index -1 is out of range"),
    ({"layers": []}, "layers is empty"),
    ({"layers": [2, 2]}, "must be increasing"),
    ({"layers": [3, 1]}, "must be increasing"),
    ({"layers": [0], "every": 2}, "exactly one of layers and every"),
    ({}, "exactly one of layers and every"),
    ({"every": 0}, "every must be a whole number of at least 1"),
    ({"encoder_layers": [0]}, "encoder_layers and decoder_layers are for encoder-decoder teachers"),
])
def test_a_bad_selection_is_refused_in_one_line(selection, fragment):
    with pytest.raises(KdbenchError) as e:
        from_teacher(_teacher("bert"), **selection)
    assert fragment in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).startswith("student.from_teacher: ")


@pytest.mark.parametrize("selection, fragment", [
    ({"layers": [0]}, "takes encoder_layers and decoder_layers, not layers"),
    ({"encoder_layers": [3]}, "encoder_layers index 3 is out of range; the teacher has 3 layers"),
    ({"decoder_layers": []}, "decoder_layers is empty"),
])
def test_a_bad_encoder_decoder_selection_is_refused(selection, fragment):
    with pytest.raises(KdbenchError, match=fragment):
        from_teacher(_teacher("t5"), **selection)


def test_a_family_without_a_block_list_is_refused():
    class Flat(torch.nn.Module):  # two layers, but no list of them
        def __init__(self):
            super().__init__()
            self.config = tf.PretrainedConfig(num_hidden_layers=2)
            self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

    with pytest.raises(KdbenchError, match="cannot find the transformer blocks of the 'Flat' teacher") as e:
        from_teacher(Flat(), layers=[0])
    assert "\n" not in str(e.value)


class _Pair:  # what build_student reads of a suite's pair
    def __init__(self, teacher_ref, student_ref=None, from_teacher=None):
        from kdbench.suite import FromTeacher, InlineConfig, ModelSpec

        def ref(r):
            return r if isinstance(r, str) or r is None else InlineConfig(**r)

        self.name = "p"
        self.teacher = ModelSpec(model=ref(teacher_ref))
        self.student = ModelSpec(model=ref(student_ref or teacher_ref),
                                 from_teacher=None if from_teacher is None else FromTeacher(**from_teacher))


def test_build_student_from_an_inline_teacher_warns_that_nothing_is_inherited(caplog):
    inline = {"model_type": "bert", "num_hidden_layers": 4, "hidden_size": 16, "num_attention_heads": 2,
              "intermediate_size": 32, "max_position_embeddings": 32}
    with caplog.at_level(logging.WARNING, logger="kdbench.student_init"):
        student = build_student(_Pair(inline, from_teacher={"every": 2}), head=None, num_labels=2, vocab_size=V,
                                seed=3)
    assert student.config.num_hidden_layers == 2 and student.config.vocab_size == V
    assert "inherits nothing" in caplog.text
    # the teacher it is cut from is the one of the same seed: the kept blocks are its layers 0 and 2
    teacher = build_student(_Pair(inline), head=None, num_labels=2, vocab_size=V, seed=3)
    assert torch.equal(student.bert.encoder.layer[1].attention.self.query.weight,
                       teacher.bert.encoder.layer[2].attention.self.query.weight)


def test_build_student_from_a_saved_teacher_inherits_its_weights(tmp_path, caplog):
    teacher = _teacher("bert")
    teacher.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="kdbench.student_init"):
        student = build_student(_Pair(str(tmp_path), from_teacher={"layers": [4]}), head=None, num_labels=3,
                                vocab_size=V, seed=0)
    assert "inherits nothing" not in caplog.text
    assert torch.equal(student.bert.encoder.layer[0].output.dense.weight,
                       teacher.bert.encoder.layer[4].output.dense.weight)
    assert torch.equal(student.classifier.weight, teacher.classifier.weight)


# --- the suite: `student: {from_teacher: ...}` -------------------------------------------------------------------

def _suite(tmp_path, student: dict, teacher_layers: int = 4, **extra) -> str:
    data = {
        "name": "s", "device": "cpu", "seeds": [0],
        "tasks": [{"name": "sentiment", "task": "generated_sentiment", "params": {"train_size": 16}}],
        "pairs": [{"name": "p",
                   "teacher": {"model": {"model_type": "bert", "num_hidden_layers": teacher_layers, "hidden_size": 16,
                                         "num_attention_heads": 2, "intermediate_size": 32},
                               "finetune": {"max_steps": 1}},
                   "student": student}],
        "methods": [{"name": "kd", "method": "logit"}],
        **extra,
    }
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_a_suite_student_from_teacher_takes_the_teachers_model(tmp_path):
    suite = load_suite(_suite(tmp_path, {"from_teacher": {"layers": [0, 2]}}))
    pair = suite.pairs[0]
    assert pair.student.model == pair.teacher.model
    assert pair.student.from_teacher.layers == [0, 2]
    other = load_suite(_suite(tmp_path, {"from_teacher": {"layers": [1, 3]}}))
    from kdbench.plan import expand

    hashes = lambda s: {r.spec_hash for r in expand(s) if r.kind != "teacher"}  # noqa: E731
    assert not hashes(suite) & hashes(other)  # the selection is part of the students' specs


@pytest.mark.parametrize("student, fragment", [
    ({"from_teacher": {"layers": [0, 4]}}, "layers index 4 is out of range; the teacher has 4 layers"),
    ({"from_teacher": {"layers": []}}, "pairs[0].student.from_teacher.layers"),
    ({"from_teacher": {"every": 0}}, "pairs[0].student.from_teacher.every"),
    ({"from_teacher": {"layer": [0]}}, "pairs[0].student.from_teacher.layer"),
    ({"from_teacher": {"encoder_layers": [0]}}, "are for encoder-decoder teachers"),
    ({}, "student needs `model` or `from_teacher`"),
    ({"model": {"model_type": "bert", "num_hidden_layers": 1}, "from_teacher": {"every": 2}}, "not both"),
])
def test_a_bad_suite_from_teacher_is_refused_with_its_line(tmp_path, student, fragment):
    path = _suite(tmp_path, student)
    with pytest.raises(KdbenchError) as e:
        load_suite(path)
    assert fragment in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).startswith(str(path) + ":")


def test_a_teacher_from_teacher_is_refused(tmp_path):
    path = _suite(tmp_path, {"from_teacher": {"every": 2}})
    data = yaml.safe_load(path.read_text())
    data["pairs"][0]["teacher"]["from_teacher"] = {"every": 2}
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(KdbenchError, match="teacher.from_teacher is not allowed"):
        load_suite(path)


def test_the_cli_refuses_a_bad_selection_with_exit_2(tmp_path):
    from typer.testing import CliRunner

    from kdbench.cli import app

    path = _suite(tmp_path, {"from_teacher": {"layers": [7]}})
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    assert "layers index 7 is out of range" in result.output


def test_a_suite_runs_a_student_cut_from_its_teacher(tmp_path):
    """End to end: the student alone and the distilled student are the teacher's 2 layers cut to 1, and profiled as
    the smaller model."""
    from tiny import tiny_suite_data

    from kdbench.results import read_results
    from kdbench.run.runner import run_suite

    data = tiny_suite_data(tmp_path, tmp_path / "cache", [{"name": "kd", "method": "logit"}])
    data["pairs"][0]["teacher"]["model"]["num_hidden_layers"] = 2
    data["pairs"][0]["student"] = {"from_teacher": {"layers": [1]}}
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    run_suite(load_suite(path), show_progress=False)
    results = {r["spec"]["kind"]: r for r in read_results(tmp_path / "results" / "tiny")}
    assert {k: r["status"] for k, r in results.items()} == {"teacher": "ok", "student": "ok", "distill": "ok"}
    params = {k: r["variants"][0]["params"] for k, r in results.items()}
    teacher = tf.AutoModelForSequenceClassification.from_config(
        tf.BertConfig(**{**{k: v for k, v in data["pairs"][0]["teacher"]["model"].items() if k != "model_type"},
                         "vocab_size": 1, "num_hidden_layers": 1}))
    one_layer = sum(p.numel() for p in teacher.bert.encoder.layer[0].parameters())
    assert params["student"] == params["distill"] == params["teacher"] - one_layer


def test_from_teacher_in_a_multitask_suite_is_refused(tmp_path):
    path = _suite(tmp_path, {"from_teacher": {"every": 2}},
                  tasks=[{"name": n, "task": "generated_sentiment", "params": {"train_size": 16}} for n in "ab"],
                  multitask=[{"name": "mt", "tasks": ["a", "b"], "method": "kd"}])
    with pytest.raises(KdbenchError, match="from_teacher is for single-task students") as e:
        load_suite(path)
    assert "\n" not in str(e.value)
