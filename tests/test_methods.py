"""Feature methods: `hidden` (FitNets / TinyBERT hidden states through projections) and `attention` (attention maps).

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
from transformers import BertConfig, BertForSequenceClassification
from typer.testing import CliRunner

from kdbench.cli import app
from kdbench.errors import KdbenchError
from kdbench.kernels import kd_loss
from kdbench.methods import (AttentionKD, AttentionParams, HiddenParams, HiddenStateKD, make_objective, methods,
                             uniform_layer_map)
from kdbench.suite import TrainingSettings
from kdbench.trainer import PROJECTIONS, Distiller, objective_attached, train, training_arguments


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on a shared 2-core box, two spinning OpenMP threads run tiny models ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    ("hidden", {0: 0, 2: 1}, "params.layer_map: student index 2 is out of range (the student has 1 layer: "
                             "hidden-state indices 0..1, 0 = embeddings)"),
    ("hidden", {1: 3}, "params.layer_map: teacher index 3 is out of range (the teacher has 2 layers: "
                       "hidden-state indices 0..2, 0 = embeddings)"),
    ("hidden", {-1: 0}, "student index -1 is out of range"),
    ("attention", {0: 0}, "params.layer_map: student index 0 is out of range (the student has 1 layer: layers 1..1)"),
    ("attention", {1: 5}, "teacher index 5 is out of range (the teacher has 2 layers: layers 1..2)"),
    ("hidden", {}, "params.layer_map is empty; leave it out for the uniform map"),
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
    for name, starts in [("hidden", "Hidden-state matching through learned projections"),
                         ("attention", "Attention-map transfer (Zagoruyko & Komodakis 2017")]:
        [i] = [i for i, line in enumerate(lines) if line.split()[:1] == [name]]
        assert lines[i].split(None, 1)[1] == methods.describe(name) and methods.describe(name).startswith(starts)
        assert lines[i + 1].split() == ["params:", "temperature,", "alpha,", "divergence,", "beta,",
                                        "feature_weight,", "layer_map"]
