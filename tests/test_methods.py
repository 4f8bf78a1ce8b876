"""Feature methods: `hidden` (FitNets / TinyBERT hidden states through projections), `attention` (attention maps) and
`progressive` (MobileBERT's layer-by-layer stages, then logit KD).

Tiny BERTs built here (teacher 2 layers x 32, 4 heads; student 1 layer x 16, 2 heads; no dropout), a few steps of
training at most. The losses are checked against kd_loss with features computed by hand.
"""

import copy
import io
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from kdbench.kernels import kd_loss
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
    T5Config,
    T5Model,
    TrainerCallback,
)
from typer.testing import CliRunner

from kdbench.cli import app
from kdbench.errors import KdbenchError
from kdbench.methods import (
    AttentionKD,
    AttentionParams,
    DistillationConfig,
    HiddenParams,
    HiddenStateKD,
    LogitKD,
    ProgressiveKD,
    ProgressiveParams,
    make_objective,
    methods,
    progressive_schedule,
    progressive_stage,
    stack_blocks,
    stack_parameters,
    transformer_blocks,
    uniform_layer_map,
)
from kdbench.suite import TrainingSettings
from kdbench.trainer import (
    PROJECTIONS,
    Distiller,
    objective_attached,
    train,
    training_arguments,
)




def bert(layers: int, hidden: int, heads: int, seed: int) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=40, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=2 * hidden, max_position_embeddings=16, num_labels=3,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config)


def teacher_model(seed: int = 1):
    return bert(2, 32, 4, seed)


def student_model(seed: int = 0):
    return bert(1, 16, 2, seed)


def inputs_for(n: int = 4, seq: int = 7) -> dict:
    g = torch.Generator().manual_seed(n)
    ids = torch.randint(5, 40, (n, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # padding, as DataCollatorWithPadding leaves it
    mask[1, -1:] = 0
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.arange(n) % 3}


@pytest.fixture
def make_distiller(tmp_path):
    def make(student, teacher, objective):
        args = training_arguments(TrainingSettings(), seed=0, device="cpu", output_dir=str(tmp_path))
        return Distiller(model=student, args=args, teacher=teacher, objective=objective)

    return make


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def assert_plain(model, count: int) -> None:
    """No projections left, the same parameter count, and picklable (the profiler pickles models): transformers'
    output-capturing hooks, local closures that it installs on the first call for hidden states, are gone."""
    assert not hasattr(model, PROJECTIONS) and PROJECTIONS not in dict(model.named_children())
    assert n_params(model) == count
    torch.save(model, io.BytesIO())


# ---------------------------------------------------------------------------------------------------------------
# Layer maps


@pytest.mark.parametrize("ls, lt, expected", [
    (1, 2, {0: 0, 1: 2}),
    (2, 4, {0: 0, 1: 2, 2: 4}),
    (3, 12, {0: 0, 1: 4, 2: 8, 3: 12}),
    (4, 6, {0: 0, 1: 2, 2: 3, 3: 5, 4: 6}),  # 1.5 -> 2 and 4.5 -> 5: halves round up (Python's round gives 4)
    (2, 2, {0: 0, 1: 1, 2: 2}),
])
def test_default_layer_maps_are_pinned(ls, lt, expected):
    assert uniform_layer_map(ls, lt, embeddings=True) == expected
    assert uniform_layer_map(ls, lt, embeddings=False) == {k: v for k, v in expected.items() if k}


def test_setup_resolves_the_default_map_on_real_models():
    student, teacher = student_model(), teacher_model()
    hidden, attention = HiddenStateKD(), AttentionKD()
    hidden.setup(student, teacher)
    attention.setup(student, teacher)
    assert hidden.layer_map == {0: 0, 1: 2} and attention.layer_map == {1: 2}
    assert {k: (m.in_features, m.out_features) for k, m in hidden.modules.items()} == {"0": (16, 32), "1": (16, 32)}


@pytest.mark.parametrize("method, layer_map, message", [
    ("hidden", {0: 0, 2: 1}, ("params.layer_map: student index 2 is out of range (the student has 1 layer: "
                             "hidden-state indices 0..1, 0 = embeddings)")),
    ("hidden", {1: 3}, ("params.layer_map: teacher index 3 is out of range (the teacher has 2 layers: "
                       "hidden-state indices 0..2, 0 = embeddings)")),
    ("hidden", {-1: 0}, "student index -1 is out of range"),
    ("attention", {0: 0}, "params.layer_map: student index 0 is out of range (the student has 1 layer: layers 1..1)"),
    ("attention", {1: 5}, "teacher index 5 is out of range (the teacher has 2 layers: layers 1..2)"),
    ("hidden", {}, "params.layer_map is empty; leave it out for the uniform map"),
    ("progressive", {0: 0}, ("params.layer_map: student index 0 is out of range (the student has 1 layer: "
                            "layers 1..1)")),
    ("progressive", {1: 3}, "teacher index 3 is out of range (the teacher has 2 layers: layers 1..2)"),
    ("progressive", {}, "params.layer_map is empty; leave it out for the uniform map"),
])
def test_a_bad_layer_map_fails_at_setup_in_one_line_naming_the_index(make_distiller, method, layer_map, message):
    objective = make_objective(method, {"layer_map": layer_map})
    with pytest.raises(KdbenchError) as e:
        make_distiller(student_model(), teacher_model(), objective)  # the Distiller sets the objective up
    assert message in str(e.value) and str(e.value).startswith(f"method {method!r}: ")
    assert "\n" not in str(e.value)


def test_params_are_validated_against_the_methods_own_schema():
    assert make_objective("hidden", {"layer_map": {"1": "2"}}).params.layer_map == {1: 2}  # as JSON gives it back
    with pytest.raises(KdbenchError, match=r"^method 'hidden': params.feature_weigth: unknown key$"):
        make_objective("hidden", {"feature_weigth": 1.0})
    with pytest.raises(KdbenchError, match=r"^method 'attention': params.feature_weight: "):
        make_objective("attention", {"feature_weight": -1.0})
    for bad in ({"final_fraction": 0.0}, {"final_fraction": 1.5}, {"feature_weight": 0.0}):
        with pytest.raises(KdbenchError, match=rf"^method 'progressive': params.{next(iter(bad))}: "):
            make_objective("progressive", bad)


# ---------------------------------------------------------------------------------------------------------------
# hidden: the loss is kd_loss with the projected hidden states of real tokens


def fixed_outputs(seed: int, widths: tuple[int, ...], batch: int = 2, seq: int = 5, classes: int = 3):
    g = torch.Generator().manual_seed(seed)
    return SimpleNamespace(logits=torch.randn(batch, classes, generator=g),
                           hidden_states=tuple(torch.randn(batch, seq, w, generator=g) for w in widths))


def test_hidden_loss_equals_kd_loss_with_features_by_hand():
    params = HiddenParams(temperature=2.0, alpha=0.6, feature_weight=0.5)
    objective = HiddenStateKD(params)
    objective.setup(student_model(), teacher_model())  # map {0: 0, 1: 2}, projections 16 -> 32
    s, t = fixed_outputs(0, (16, 16)), fixed_outputs(1, (32, 32, 32))
    labels = torch.tensor([2, 0])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    real = [(0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (1, 0), (1, 1), (1, 2)]

    fs, ft = [], []
    for si, ti in [(0, 0), (1, 2)]:
        lin = objective.modules[str(si)]
        for b, pos in real:
            fs.append(s.hidden_states[si][b, pos] @ lin.weight.T + lin.bias)
            ft.append(t.hidden_states[ti][b, pos])
    fs, ft = torch.stack(fs), torch.stack(ft)  # (8 real tokens * 2 pairs, 32)
    with torch.no_grad():
        expected = kd_loss(s.logits, t.logits, labels, temperature=2.0, alpha=0.6, student_features=fs,
                           teacher_features=ft, feature_weight=0.5)
        loss = objective.loss(s, t, labels, attention_mask=mask)
        assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
        logit_only = kd_loss(s.logits, t.logits, labels, temperature=2.0, alpha=0.6)
        assert (loss - logit_only).item() == pytest.approx(0.5 * F.mse_loss(fs, ft).item(), rel=1e-5)

        # A pad position's hidden states, student's or teacher's, do not count.
        s.hidden_states[0][1, 3] += 100.0
        s.hidden_states[1][1, 4] = -50.0
        t.hidden_states[2][1, 3] = 1e3
        t.hidden_states[1][1, 4] = float("nan")  # an unmapped layer, and a pad: never read
        assert objective.loss(s, t, labels, attention_mask=mask).item() == loss.item()
        # ... but a real one does.
        s.hidden_states[1][1, 2] += 1.0
        assert objective.loss(s, t, labels, attention_mask=mask).item() != loss.item()


def test_hidden_without_a_mask_uses_every_token_and_feature_weight_0_is_logit_kd():
    objective = HiddenStateKD(HiddenParams(layer_map={1: 1}))
    objective.setup(student_model(), teacher_model())
    s, t = fixed_outputs(0, (16, 16)), fixed_outputs(1, (32, 32, 32))
    fs, ft = objective.features(s.hidden_states, t.hidden_states)
    assert fs.shape == ft.shape == (2 * 5, 32)
    weightless = HiddenStateKD(HiddenParams(feature_weight=0.0))
    labels = torch.tensor([0, 1])
    expected = kd_loss(s.logits, t.logits, labels, temperature=4.0, alpha=0.7)
    assert weightless.loss(s, t, labels).item() == expected.item()  # no setup needed: no features computed


def test_hidden_gradients_reach_the_projections_and_the_student_not_the_teacher(make_distiller):
    student, teacher = student_model(), teacher_model()
    objective = HiddenStateKD()
    d = make_distiller(student, teacher, objective)
    loss = d.compute_loss(student, inputs_for())
    loss.backward()
    for name, p in objective.modules.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert student.bert.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    assert student.bert.encoder.layer[0].output.dense.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


def train_rows(n: int = 16, seq: int = 7) -> list[dict]:
    batch = inputs_for(n, seq)
    return [{k: v[i].tolist() for k, v in batch.items()} for i in range(n)]


def collate(rows: list[dict]) -> dict:
    return {k: torch.tensor([r[k] for r in rows]) for k in rows[0]}


SETTINGS = TrainingSettings(max_steps=3, batch_size=4, learning_rate=1e-2, warmup_ratio=0.0)


def test_training_trains_the_projections_and_leaves_a_plain_student():
    student, teacher = student_model(), teacher_model()
    count, keys = n_params(student), list(student.state_dict())
    objective = HiddenStateKD()
    objective.setup(student, teacher)
    projections = objective.modules
    before = {k: v.clone() for k, v in projections.state_dict().items()}
    embeddings = student.bert.embeddings.word_embeddings.weight.clone()

    stats = train(student, train_rows(), collate, SETTINGS, seed=0, device="cpu", teacher=teacher,
                  objective=objective)
    assert stats.steps == 3
    assert objective.modules is projections  # setup kept what it had built
    assert all(not torch.equal(before[k], v) for k, v in projections.state_dict().items())
    assert not torch.equal(embeddings, student.bert.embeddings.word_embeddings.weight)
    assert_plain(student, count)
    assert list(student.state_dict()) == keys

    # Recovery after pruning trains a copy of the student with the same objective: the projections go on.
    copy_ = copy.deepcopy(student)
    mid = {k: v.clone() for k, v in projections.state_dict().items()}
    train(copy_, train_rows(), collate, SETTINGS, seed=0, device="cpu", teacher=teacher, objective=objective,
          max_steps=2)
    assert objective.modules is projections
    assert all(not torch.equal(mid[k], v) for k, v in projections.state_dict().items())
    assert_plain(copy_, count)
    out = copy_(**{k: v for k, v in inputs_for().items() if k != "labels"}, output_hidden_states=True)
    assert len(out.hidden_states) == 2  # transformers hooks it again when asked


@pytest.mark.parametrize("method", ["hidden", "attention"])
def test_recovery_after_structured_pruning(method):
    """prune_structured removes heads and FFN neurons but keeps the hidden width: the same objective still fits."""
    from kdbench.compress import apply_variant

    student, teacher = student_model(), teacher_model()
    objective = make_objective(method, {})
    train(student, train_rows(), collate, SETTINGS, seed=0, device="cpu", teacher=teacher, objective=objective,
          max_steps=1)
    pruned, _ = apply_variant(student, [("prune_structured", {"amount": 0.5})], "cpu")
    assert pruned.config.num_attention_heads < student.config.num_attention_heads
    count = n_params(pruned)
    stats = train(pruned, train_rows(), collate, SETTINGS, seed=0, device="cpu", teacher=teacher,
                  objective=objective, max_steps=2)
    assert stats.steps == 2
    assert_plain(pruned, count)
    torch.save(teacher, io.BytesIO())
    assert pruned.config._attn_implementation == teacher.config._attn_implementation == "sdpa"


# ---------------------------------------------------------------------------------------------------------------
# attention


def test_attention_maps_come_back_while_training_and_the_models_are_restored_after():
    student, teacher = student_model(), teacher_model()
    assert teacher.config._attn_implementation == "sdpa"  # the default: no attention maps in transformers 5
    objective = AttentionKD()
    objective.setup(student, teacher)
    ids = inputs_for()
    model_in = {k: ids[k] for k in ("input_ids", "attention_mask")}
    with objective_attached(student, teacher, objective):
        assert student.config._attn_implementation == teacher.config._attn_implementation == "eager"
        with torch.no_grad():
            attn = teacher(**model_in, output_attentions=True).attentions
        assert attn is not None and len(attn) == 2 and all(a is not None for a in attn)
        assert attn[0].shape == (4, 4, 7, 7)
    assert student.config._attn_implementation == teacher.config._attn_implementation == "sdpa"


def test_attention_loss_outside_eager_attention_is_one_line_naming_the_fix(make_distiller):
    student, teacher = student_model(), teacher_model()
    d = make_distiller(student, teacher, AttentionKD())
    with pytest.raises(KdbenchError, match=r"^method 'attention': the student returned no attention maps; it needs "
                                           r"attn_implementation='eager' \(SDPA returns none\)$"):
        d.compute_loss(student, inputs_for())


def test_attention_loss_is_finite_and_positive_and_trains_the_student_only(make_distiller):
    student, teacher = student_model(), teacher_model()
    objective = AttentionKD(AttentionParams(feature_weight=10.0))
    d = make_distiller(student, teacher, objective)
    with objective_attached(student, teacher, objective):
        loss = d.compute_loss(student, inputs_for())
        logit_only = make_objective("logit", {}).loss(
            student(**{k: v for k, v in inputs_for().items() if k != "labels"}),
            teacher(**{k: v for k, v in inputs_for().items() if k != "labels"}), inputs_for()["labels"])
    assert math.isfinite(loss.item()) and loss.item() > logit_only.item() > 0
    loss.backward()
    assert student.bert.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_attention_features_leave_out_padding_rows_and_columns():
    objective = AttentionKD()
    objective.setup(student_model(), teacher_model())  # map {1: 2}
    g = torch.Generator().manual_seed(0)
    s_attn = (torch.rand(2, 2, 4, 4, generator=g),)
    t_attn = (torch.rand(2, 4, 4, 4, generator=g), torch.rand(2, 4, 4, 4, generator=g))
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    fs, ft = objective.features(s_attn, t_attn, mask)
    assert fs.shape == ft.shape == (16 + 4, 1)  # 4x4 real entries of sequence 0, 2x2 of sequence 1
    assert torch.equal(fs[16:, 0], s_attn[0][1].mean(0)[:2, :2].flatten())
    assert torch.equal(ft[:16, 0], t_attn[1][0].mean(0).flatten())


def test_attention_of_identical_models_is_exactly_zero(make_distiller):
    teacher = teacher_model()
    student = copy.deepcopy(teacher)
    objective = AttentionKD(AttentionParams(alpha=0.0, feature_weight=10.0))
    d = make_distiller(student, teacher, objective)
    student.eval()
    inputs = inputs_for()
    model_in = {k: v for k, v in inputs.items() if k != "labels"}
    with objective_attached(student, teacher, objective), torch.no_grad():
        so = student(**model_in, output_attentions=True)
        to = teacher(**model_in, output_attentions=True)
        fs, ft = objective.features(so.attentions, to.attentions, inputs["attention_mask"])
        loss = d.compute_loss(student, dict(inputs))  # it pops the labels
        pure_kd = AttentionKD(AttentionParams(alpha=1.0, feature_weight=10.0))
        pure_kd.setup(student, teacher)
        soft = pure_kd.loss(so, to, inputs["labels"], attention_mask=inputs["attention_mask"])
    assert objective.layer_map == {1: 1, 2: 2} and torch.equal(fs, ft)  # the attention term is exactly 0
    assert loss.item() == F.cross_entropy(so.logits, inputs["labels"]).item()  # alpha = 0: CE alone
    assert soft.item() == 0.0  # alpha = 1: KL of identical logits, plus attention: 0


# ---------------------------------------------------------------------------------------------------------------
# Registry


def test_ls_methods_lists_both_with_descriptions_and_params():
    result = CliRunner().invoke(app, ["ls", "methods"])
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    for name, starts, own in [
        ("hidden", "Hidden-state matching through learned projections", ["decoder_layer_map"]),
        ("attention", "Attention-map transfer (Zagoruyko & Komodakis 2017", ["decoder_layer_map,", "cross_attention"]),
    ]:
        [i] = [i for i, line in enumerate(lines) if line.split()[:1] == [name]]
        assert lines[i].split(None, 1)[1] == methods.describe(name) and methods.describe(name).startswith(starts)
        assert lines[i + 1].split() == ["params:", "temperature,", "alpha,", "divergence,", "beta,",
                                        "fused_linear,", "feature_weight,", "layer_map,", *own]
    [i] = [i for i, line in enumerate(lines) if line.split()[:1] == ["progressive"]]
    assert lines[i].split(None, 1)[1] == "Progressive layer-by-layer transfer (MobileBERT), then logit KD of the " \
                                         "whole student."
    assert lines[i + 1].split()[-4:] == ["feature_weight,", "layer_map,", "decoder_layer_map,", "final_fraction"]
    assert "fused_linear," not in lines[i + 1].split()  # its layer stages read the student's logits


# ---------------------------------------------------------------------------------------------------------------
# progressive: layer stages (feature MSE of one pair, lower layers frozen), then logit KD


def student_2l(seed: int = 0):
    return bert(2, 16, 2, seed)  # against the 2-layer teacher: uniform map {1: 1, 2: 2}, two layer stages


@pytest.mark.parametrize("max_steps, stages, fraction, plan", [
    (10, 2, 0.5, [3, 2, 5]),
    (4, 2, 0.5, [1, 1, 2]),
    (5, 2, 0.5, [1, 1, 3]),  # 2.5 final steps: halves round up
    (3, 2, 0.5, [0, 0, 3]),  # no step for every layer stage: logit KD alone
    (1, 2, 0.5, [0, 0, 1]),
    (1, 1, 0.01, [0, 1]),  # the final stage always gets a step
    (100, 3, 0.3, [24, 23, 23, 30]),  # 0.3 * 100 is 30.000000000000004 in floats, still 30
    (12, 4, 0.25, [3, 2, 2, 2, 3]),
    (7, 1, 1.0, [0, 7]),
    (0, 2, 0.5, [0, 0, 0]),
])
def test_progressive_schedule_is_pinned(max_steps, stages, fraction, plan):
    assert progressive_schedule(max_steps, stages, fraction) == plan
    assert sum(plan) == max_steps
    walked = [progressive_stage(step, plan) for step in range(max_steps + 2)]  # past the end: the final stage
    assert walked == [k for k, n in enumerate(plan[:-1], start=1) for _ in range(n)] + [None] * (plan[-1] + 2)


def test_progressive_setup_maps_layers_1_to_l_with_one_projection_each():
    objective = ProgressiveKD()
    objective.setup(student_2l(), teacher_model())
    assert objective.layer_map == {1: 1, 2: 2} and objective.stage is None
    assert {k: (m.in_features, m.out_features) for k, m in objective.modules.items()} == {"1": (16, 32),
                                                                                          "2": (16, 32)}
    assert objective.schedule(6) == [2, 1, 3]
    one = ProgressiveKD()
    one.setup(student_model(), teacher_model())
    assert one.layer_map == {1: 2} and list(one.modules) == ["1"]


def names_of(model, params) -> set[str]:
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


GROUPS = {"embeddings": ("bert.embeddings.",), "layer 1": ("bert.encoder.layer.0.",),
          "layer 2": ("bert.encoder.layer.1.",), "head": ("bert.pooler.", "classifier."),
          "W1": (f"{PROJECTIONS}.1.",), "W2": (f"{PROJECTIONS}.2.",)}


def group_of(name: str) -> str:
    """The part of a 2-layer BERT student (or of its attached projections) that a parameter belongs to."""
    [group] = [g for g, starts in GROUPS.items() if name.startswith(starts)]
    return group


def test_progressive_stages_split_a_bert_into_embeddings_and_layers():
    student, teacher = student_2l(), teacher_model()
    objective = ProgressiveKD()
    objective.setup(student, teacher)
    stages = [names_of(student, group) for group in objective.stage_parameters(student)]
    assert [{group_of(n) for n in names} for names in stages] == [
        {"embeddings", "layer 1"}, {"layer 2"}, {"embeddings", "layer 1", "layer 2", "head"}]
    assert stages[0] | stages[1] == {n for n in stages[2] if group_of(n) != "head"}
    assert stages[2] == {n for n, _ in student.named_parameters()}  # the final stage: everything

    # A sparse map: student layer 2 -> teacher layer 2 only. Its one stage trains both layers, and the embeddings.
    sparse = ProgressiveKD(ProgressiveParams(layer_map={2: 2}))
    sparse.setup(student, teacher)
    assert [{group_of(n) for n in names_of(student, g)} for g in sparse.stage_parameters(student)] == [
        {"embeddings", "layer 1", "layer 2"}, {"embeddings", "layer 1", "layer 2", "head"}]


def test_progressive_leaves_the_projections_out_of_the_student_groups():
    student, teacher = student_2l(), teacher_model()
    objective = ProgressiveKD()
    objective.setup(student, teacher)
    with objective_attached(student, teacher, objective):
        everything = objective.stage_parameters(student)[-1]
        assert len(everything) == len(list(student.parameters())) - len(list(objective.modules.parameters()))


def tiny_distilbert():
    return DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=40, dim=16, n_layers=2, n_heads=2, hidden_dim=32, max_position_embeddings=16))


def tiny_roberta():
    return RobertaForSequenceClassification(RobertaConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=20))


def tiny_gpt2():
    return GPT2ForSequenceClassification(GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=16))


def under(names: set[str], modules: set[str]) -> bool:
    """Every name lies under one of `modules`, and every module holds one of the names."""
    owner = {n: [m for m in modules if n.startswith(m + ".")] for n in names}
    return all(owner.values()) and {m for ms in owner.values() for m in ms} == modules


@pytest.mark.parametrize("make, blocks, before, after", [
    (student_2l, "bert.encoder.layer", {"bert.embeddings"}, {"bert.pooler", "classifier"}),
    (tiny_roberta, "roberta.encoder.layer", {"roberta.embeddings"}, {"classifier"}),
    (tiny_distilbert, "distilbert.transformer.layer", {"distilbert.embeddings"}, {"pre_classifier", "classifier"}),
    (tiny_gpt2, "transformer.h", {"transformer.wte", "transformer.wpe"}, {"transformer.ln_f", "score"}),
])
def test_transformer_blocks_are_found_in_encoders_and_decoders(make, blocks, before, after):
    model = make()
    name, found = transformer_blocks(model)
    assert name == blocks and len(found) == 2
    first, per_stack, last = stack_parameters(model)
    per_block = per_stack[""]
    assert under(names_of(model, first), before) and under(names_of(model, last), after)
    assert [under(names_of(model, p), {f"{blocks}.{i}"}) for i, p in enumerate(per_block)] == [True, True]
    assert len(first) + sum(map(len, per_block)) + len(last) == len(list(model.parameters()))


def test_progressive_fails_at_setup_naming_a_model_whose_blocks_it_cannot_find():
    t5 = T5Model(T5Config(vocab_size=40, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                          decoder_start_token_id=0))
    # one stack's finder sees T5's two; the stacks' finder takes each under its own stack
    with pytest.raises(KdbenchError, match=r"cannot find the transformer blocks of the 't5' student \(one ModuleList "
                                           r"of its 2 layers; found 2: encoder.block, decoder.block\)$"):
        transformer_blocks(t5)
    assert {k: v is getattr(t5, k).block for k, v in stack_blocks(t5).items()} == {"encoder": True, "decoder": True}

    class Mystery(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = SimpleNamespace(num_hidden_layers=2, hidden_size=8, model_type="mystery")
            self.mix = torch.nn.Linear(8, 8)

    with pytest.raises(KdbenchError, match=r"the 'mystery' student \(one ModuleList of its 2 layers; found none\)$"):
        transformer_blocks(Mystery())
    seq2seq = Mystery()
    seq2seq.config.is_encoder_decoder = True
    with pytest.raises(KdbenchError, match=r"^method 'progressive': cannot find the encoder blocks of the 'mystery' "
                                           r"student \(one ModuleList of its 2 encoder layers; found none\)$"):
        stack_blocks(seq2seq)


def test_progressive_loss_is_one_pairs_mse_in_a_layer_stage_and_logit_kd_in_the_final_stage():
    objective = ProgressiveKD(ProgressiveParams(temperature=2.0, alpha=0.6, feature_weight=0.5))
    objective.setup(student_2l(), teacher_model())  # map {1: 1, 2: 2}
    s, t = fixed_outputs(0, (16, 16, 16)), fixed_outputs(1, (32, 32, 32))
    labels = torch.tensor([2, 0])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    logit = LogitKD(DistillationConfig(temperature=2.0, alpha=0.6))
    with torch.no_grad():
        final = objective.loss(s, t, labels, attention_mask=mask)  # stage None: outside training, the final stage
        assert final.item() == logit.loss(s, t, labels).item() > 0
        losses = []
        for stage, pair in [(1, (1, 1)), (2, (2, 2))]:
            objective.stage = stage
            lin = objective.modules[str(pair[0])]
            fs = s.hidden_states[pair[0]][mask.bool()] @ lin.weight.T + lin.bias  # (8 real tokens, 32)
            ft = t.hidden_states[pair[1]][mask.bool()]
            loss = objective.loss(s, t, labels, attention_mask=mask)
            assert loss.item() == pytest.approx(0.5 * F.mse_loss(fs, ft).item(), rel=1e-6)
            # The logits and labels take no part; neither do the other pair's hidden states nor padding.
            other = SimpleNamespace(logits=s.logits * 3 + 1, hidden_states=list(s.hidden_states))
            other.hidden_states[3 - pair[0]] = other.hidden_states[3 - pair[0]] + 7.0
            other.hidden_states[pair[0]] = other.hidden_states[pair[0]].clone()
            other.hidden_states[pair[0]][1, 4] = float("nan")
            assert objective.loss(other, t, torch.tensor([0, 1]), attention_mask=mask).item() == loss.item()
            losses.append(loss.item())
        assert losses[0] != losses[1]
    objective.stage = 1
    with pytest.raises(KdbenchError, match=r"^method 'progressive': the teacher returned no hidden states"):
        objective.loss(s, SimpleNamespace(logits=t.logits), labels)


class Recorder(TrainerCallback):
    """After every optimizer step: the student's parameters, which ones were trainable, and the objective's stage."""

    def __init__(self, objective):
        self.objective, self.params, self.trainable, self.stages = objective, [], [], []

    def snapshot(self, model):
        self.params.append({n: p.detach().clone() for n, p in model.named_parameters()})

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        assert all(p.requires_grad for p in model.parameters())  # the optimizer is built from the trainable ones
        self.snapshot(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.snapshot(model)
        self.trainable.append({n for n, p in model.named_parameters() if p.requires_grad})
        self.stages.append(self.objective.stage)


def test_progressive_training_freezes_the_layers_below_and_trains_the_current_one(tmp_path):
    student, teacher = student_2l(), teacher_model()
    count = n_params(student)
    objective = ProgressiveKD(ProgressiveParams(final_fraction=0.5))
    recorder = Recorder(objective)
    args = training_arguments(SETTINGS, seed=0, device="cpu", output_dir=str(tmp_path), max_steps=4)
    Distiller(model=student, args=args, train_dataset=train_rows(), data_collator=collate, teacher=teacher,
              objective=objective, callbacks=[recorder]).train()

    assert recorder.stages == [1, 2, None, None]  # plan [1, 1, 2]
    expected = [{"embeddings", "layer 1", "W1"}, {"layer 2", "W2"},
                {"embeddings", "layer 1", "layer 2", "head"}, {"embeddings", "layer 1", "layer 2", "head"}]
    for step, (before, after, active) in enumerate(zip(recorder.params, recorder.params[1:], expected), start=1):
        moved = {n for n in after if not torch.equal(before[n], after[n])}
        assert {group_of(n) for n in moved} == active, step
        # Every weight matrix of a trained group moves (a bias may not: a key bias gets no gradient through softmax).
        assert {n for n in after if group_of(n) in active and after[n].dim() == 2} <= moved, step
        student_trainable = {group_of(n) for n in recorder.trainable[step - 1] if not n.startswith(PROJECTIONS)}
        assert student_trainable == active - {"W1", "W2"}, step

    assert all(p.requires_grad for p in student.parameters())  # trainable again for compression and recovery
    assert objective.stage is None
    assert_plain(student, count)


def test_progressive_recovery_shorter_than_the_stages_is_logit_kd_and_leaves_everything_trainable():
    student, teacher = student_2l(), teacher_model()
    objective = ProgressiveKD()
    train(student, train_rows(), collate, SETTINGS, seed=0, device="cpu", teacher=teacher, objective=objective,
          max_steps=3)  # plan [0, 0, 3]
    projections = objective.modules
    before = {k: v.clone() for k, v in projections.state_dict().items()}
    head = student.classifier.weight.clone()
    recovered = copy.deepcopy(student)
    stats = train(recovered, train_rows(), collate, SETTINGS, seed=0, device="cpu", teacher=teacher,
                  objective=objective, max_steps=2)
    assert stats.steps == 2
    assert objective.modules is projections  # setup kept them
    assert all(torch.equal(before[k], v) for k, v in projections.state_dict().items())  # no layer stage ran
    assert not torch.equal(head, recovered.classifier.weight)
    assert all(p.requires_grad for p in recovered.parameters()) and objective.stage is None
    assert_plain(recovered, n_params(student))


class StopAfterOneStep(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = True


def test_progressive_training_stopped_inside_a_layer_stage_leaves_everything_trainable(tmp_path):
    student, teacher = student_2l(), teacher_model()
    objective = ProgressiveKD()
    recorder = Recorder(objective)
    args = training_arguments(SETTINGS, seed=0, device="cpu", output_dir=str(tmp_path), max_steps=4)
    trainer = Distiller(model=student, args=args, train_dataset=train_rows(), data_collator=collate, teacher=teacher,
                        objective=objective, callbacks=[StopAfterOneStep(), recorder])
    trainer.train()
    assert trainer.state.global_step == 1 and recorder.stages == [1]
    assert not all(n in recorder.trainable[0] for n, _ in student.named_parameters())  # stage 1 froze layer 2
    assert all(p.requires_grad for p in student.parameters()) and objective.stage is None
