"""Suite files: loading, one-line errors that name the culprit (and its line), expansion into runs.

Every bad input is checked twice: through the Python API (a KdbenchError) and through `kdbench validate`
(one `error:` line on stderr, exit code 2).
"""

import socket
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from kdbench.cli import app
from kdbench.compress import compressors
from kdbench.errors import KdbenchError
from kdbench.methods import methods
from kdbench.models import model_types
from kdbench.plan import expand
from kdbench.suite import load_suite
from kdbench.tasks import tasks

SUITES = Path(__file__).resolve().parents[1] / "suites"

# A valid suite; the line numbers of its keys are looked up in the text, never hard-coded.
SUITE = """\
name: tiny
seeds: [0, 1]
device: cpu
tasks:
  - name: sentiment
    task: generated_sentiment
    params: {train_size: 20, transfer_size: 10, eval_size: 10}
pairs:
  - name: pair
    teacher:
      model: {model_type: bert, hidden_size: 16, num_hidden_layers: 1, num_attention_heads: 2}
      finetune: {epochs: 1}
    student:
      model: {model_type: bert, hidden_size: 8, num_hidden_layers: 1, num_attention_heads: 2}
methods:
  - name: kd
    method: logit
    params: {temperature: 2.0}
compression:
  - name: int8
    steps: [{compressor: int8}]
training: {epochs: 1, batch_size: 8}
profiling: {batch_sizes: [1]}
"""


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Validation never loads a model or a dataset: any connection attempt fails the test loudly."""

    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def write(tmp_path: Path, text: str, name: str = "suite.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def line_of(text: str, fragment: str) -> int:
    """1-based line of the only line of `text` that contains `fragment`."""
    hits = [i + 1 for i, line in enumerate(text.splitlines()) if fragment in line]
    assert len(hits) == 1, (fragment, hits)
    return hits[0]


def validate_cli(*paths: Path):
    return CliRunner().invoke(app, ["validate", *map(str, paths)])


def assert_one_line_error(path: Path, *fragments: str) -> str:
    """The API raises a one-line KdbenchError containing every fragment; the CLI prints it and exits 2."""
    with pytest.raises(KdbenchError) as info:
        load_suite(path)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    result = validate_cli(path)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {message}"], result.stderr
    assert "Traceback" not in result.output
    return message


# ---------------------------------------------------------------------------------------------------------------
# The valid suite, and every suite shipped in suites/


def test_valid_suite_loads_and_expands(tmp_path):
    suite = load_suite(write(tmp_path, SUITE))
    runs = expand(suite)
    # Per (task, pair): the teacher once, then per seed the student alone and each method.
    assert [r.run_id for r in runs] == [
        "sentiment__pair__teacher",
        "sentiment__pair__student__s0",
        "sentiment__pair__kd__s0",
        "sentiment__pair__student__s1",
        "sentiment__pair__kd__s1",
    ]
    assert [r.kind for r in runs] == ["teacher", "student", "distill", "student", "distill"]
    # Only distilled students are compressed; the spec keeps the method's params.
    assert [len(r.compression) for r in runs] == [0, 0, 1, 0, 1]
    assert runs[2].method.params == {"temperature": 2.0}
    assert len({r.spec_hash for r in runs}) == len(runs)


def test_spec_hash_is_stable_and_follows_the_spec(tmp_path):
    a = expand(load_suite(write(tmp_path, SUITE, "a.yaml")))
    b = expand(load_suite(write(tmp_path, SUITE, "b.yaml")))
    assert [r.spec_hash for r in a] == [r.spec_hash for r in b]
    changed = expand(load_suite(write(tmp_path, SUITE.replace("temperature: 2.0", "temperature: 3.0"), "c.yaml")))
    same = [x.spec_hash == y.spec_hash for x, y in zip(a, changed)]
    # The method's params are part of the distilled runs' specs only: the baselines stay cached.
    assert same == [True, True, False, True, False]


TWO_TASKS = SUITE.replace("""    params: {train_size: 20, transfer_size: 10, eval_size: 10}
""", """    params: {train_size: 20, transfer_size: 10, eval_size: 10}
  - name: reviews
    task: generated_lm
""")


def test_a_pair_runs_on_the_tasks_it_names(tmp_path):
    both = expand(load_suite(write(tmp_path, TWO_TASKS, "both.yaml")))
    assert {r.task.name for r in both} == {"sentiment", "reviews"}
    text = TWO_TASKS.replace("  - name: pair\n", "  - name: pair\n    tasks: [sentiment]\n")
    one = expand(load_suite(write(tmp_path, text, "one.yaml")))
    assert {r.task.name for r in one} == {"sentiment"}
    # naming the tasks changes none of the runs that remain: their results and caches stay valid
    assert [r.spec_hash for r in one] == [r.spec_hash for r in both if r.task.name == "sentiment"]
    bad = TWO_TASKS.replace("  - name: pair\n", "  - name: pair\n    tasks: [sentiment, review]\n")
    path = write(tmp_path, bad, "bad.yaml")
    assert_one_line_error(path, "pairs[0].tasks[1]: unknown task 'review'; the suite's tasks: sentiment, reviews",
                          f"line {line_of(bad, 'tasks: [sentiment, review]')}")


def test_a_pair_serves_all_of_a_multitask_group_or_none(tmp_path):
    text = TWO_TASKS.replace("  - name: pair\n", "  - name: pair\n    tasks: [sentiment]\n") + (
        "multitask:\n  - {name: mt, tasks: [sentiment, reviews], method: kd}\n")
    assert_one_line_error(write(tmp_path, text), "multitask[0].tasks: pair 'pair' runs on 'sentiment' but not on "
                          "'reviews'; a pair serves all of a multitask group's tasks or none")


@pytest.mark.parametrize("path", sorted(SUITES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_suite_validates(path):
    """`kdbench validate suites/*.yaml`: no network needed, even for suites that name hub models. Validation reads
    the local data files, so a suite on the copies in ../shared/data is skipped where they are absent."""
    suite = load_suite(path)
    assert expand(suite)
    files = [v for t in suite.tasks for k, v in t.params.items() if k.endswith("_file") and isinstance(v, str)]
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        pytest.skip(f"data file {missing[0]} is absent")
    result = validate_cli(path)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"ok  {path}")


def test_shipped_suites_exist():
    names = {p.name for p in SUITES.glob("*.yaml")}
    assert {"quickstart.yaml", "smoke.yaml", "sst2-local.yaml"} <= names


def test_hub_model_names_validate_offline(tmp_path):
    """Validation does not load models: a hub name passes without a network (the run would need one)."""
    text = SUITE.replace(
        "model: {model_type: bert, hidden_size: 16, num_hidden_layers: 1, num_attention_heads: 2}",
        "model: google-bert/bert-base-uncased",
    )
    suite = load_suite(write(tmp_path, text))
    assert suite.pairs[0].teacher.model == "google-bert/bert-base-uncased"


def test_validate_reports_every_bad_file(tmp_path):
    good = write(tmp_path, SUITE, "good.yaml")
    bad = write(tmp_path, SUITE.replace("seeds:", "sedes:"), "bad.yaml")
    result = validate_cli(good, bad, tmp_path / "missing.yaml")
    assert result.exit_code == 2
    assert result.stdout.splitlines() == [f"ok  {good}: 5 runs"]
    errors = result.stderr.splitlines()
    assert len(errors) == 2 and "sedes" in errors[0] and "missing.yaml" in errors[1]


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line naming the culprit, exit code 2


def test_missing_suite_file(tmp_path):
    assert_one_line_error(tmp_path / "nope.yaml", "suite file not found", "nope.yaml")


def test_yaml_that_does_not_parse_names_the_line(tmp_path):
    text = SUITE.replace("training: {epochs: 1, batch_size: 8}", "training: {epochs: 1, batch_size: 8")
    path = write(tmp_path, text)
    message = assert_one_line_error(path, str(path), "invalid YAML")
    # The parser notices the unclosed flow mapping on the next line.
    assert f"line {line_of(text, 'profiling:')}" in message


def test_yaml_with_a_tab_names_the_line(tmp_path):
    text = SUITE.replace("    task: generated_sentiment", "\ttask: generated_sentiment")
    assert_one_line_error(write(tmp_path, text), "invalid YAML", f"line {line_of(text, 'task: generated')}")


def test_a_suite_must_be_a_mapping(tmp_path):
    assert_one_line_error(write(tmp_path, "- just\n- a list\n"), "must be a YAML mapping", "list")


def test_profiling_repeats_out_of_order_fail_at_load_with_their_line(tmp_path):
    text = SUITE.replace("profiling: {batch_sizes: [1]}", "profiling: {batch_sizes: [1], min_repeats: 5, max_repeats: 3}")
    message = assert_one_line_error(write(tmp_path, text), "profiling: min_repeats (5) is more than max_repeats (3)",
                                    f"line {line_of(text, 'profiling:')}")
    assert "Value error" not in message


@pytest.mark.parametrize(
    "old, new, dotted, line_fragment",
    [
        ("seeds: [0, 1]", "sedes: [0, 1]", "sedes", "sedes"),
        ("training: {epochs: 1,", "training: {epoch: 1,", "training.epoch", "training:"),
        ("      finetune: {epochs: 1}", "      finetun: {epochs: 1}", "pairs[0].teacher.finetun", "finetun:"),
        ("    steps: [{compressor: int8}]", "    step: [{compressor: int8}]", "compression[0].step", "step:"),
        ("    method: logit", "    methd: logit", "methods[0].methd", "methd"),
    ],
    ids=["top-level", "flow-mapping", "nested", "list-item", "method-entry"],
)
def test_unknown_key_names_its_path_and_line(tmp_path, old, new, dotted, line_fragment):
    text = SUITE.replace(old, new)
    assert text != SUITE
    path = write(tmp_path, text)
    assert_one_line_error(path, str(path), dotted, "unknown key", f"line {line_of(text, line_fragment)}")


def test_wrong_value_names_its_path_and_line(tmp_path):
    text = SUITE.replace("device: cpu", "device: tpu")
    assert_one_line_error(write(tmp_path, text), "device", f"line {line_of(text, 'device: tpu')}", "'cuda'")


def test_unknown_param_key_names_the_entry_and_key(tmp_path):
    """Typos inside `params` are caught by the registered entry's own schema."""
    text = SUITE.replace("eval_size: 10}", "eval_siz: 10}")
    assert_one_line_error(write(tmp_path, text), "task 'generated_sentiment'", "params.eval_siz")


def test_unknown_param_key_names_its_line(tmp_path):
    text = SUITE.replace("eval_size: 10}", "eval_siz: 10}")
    with pytest.raises(KdbenchError, match=f"line {line_of(text, 'eval_siz')}: tasks\\[0\\].params.eval_siz"):
        load_suite(write(tmp_path, text))


def test_a_method_changes_the_training_of_its_own_students_only(tmp_path):
    plain = expand(load_suite(write(tmp_path, SUITE, "plain.yaml")))
    text = SUITE.replace("    params: {temperature: 2.0}\n", "    params: {temperature: 2.0}\n"
                         "  - {name: kd-long, method: logit, training: {epochs: 3, learning_rate: 0.01}}\n")
    runs = {(r.run_id, r.seed): r for r in expand(load_suite(write(tmp_path, text)))}
    for r in plain:  # the runs both suites have are the same runs, hashes included
        assert runs[(r.run_id, r.seed)].spec_hash == r.spec_hash and runs[(r.run_id, r.seed)].training == r.training
    long_runs = [r for r in runs.values() if r.method is not None and r.method.name == "kd-long"]
    assert len(long_runs) == 2 and all(
        (r.training.epochs, r.training.learning_rate, r.training.batch_size) == (3, 0.01, 8) for r in long_runs)
    assert len({r.spec_hash for r in long_runs}) == 2  # one per seed


def test_a_method_can_run_on_some_tasks_only(tmp_path):
    both = expand(load_suite(write(tmp_path, TWO_TASKS, "both.yaml")))
    text = TWO_TASKS.replace("    params: {temperature: 2.0}\n", "    params: {temperature: 2.0}\n"
                             "  - {name: seq, method: sequence, tasks: [reviews]}\n")
    runs = expand(load_suite(write(tmp_path, text, "some.yaml")))
    assert {(r.task.name, r.seed) for r in runs if r.method is not None and r.method.name == "seq"} == {
        ("reviews", 0), ("reviews", 1)}
    # the runs both suites have are the same runs, hashes included
    by_id = {(r.run_id, r.seed): r.spec_hash for r in runs}
    assert all(by_id[(r.run_id, r.seed)] == r.spec_hash for r in both)
    scoped = next(r for r in runs if r.method is not None and r.method.name == "seq")
    unscoped = scoped.model_copy(update={"method": scoped.method.model_copy(update={"tasks": None})})
    assert scoped.spec_hash == unscoped.spec_hash  # which tasks it serves changes none of its runs
    bad = TWO_TASKS.replace("    params: {temperature: 2.0}\n", "    params: {temperature: 2.0}\n"
                            "    tasks: [review]\n")
    assert_one_line_error(write(tmp_path, bad, "bad.yaml"), "methods[0].tasks[0]: unknown task 'review'; the "
                          "suite's tasks: sentiment, reviews", f"line {line_of(bad, 'tasks: [review]')}")


def test_start_from_student_is_its_own_run_and_the_default_keeps_every_hash(tmp_path):
    import json

    committed = Path(__file__).parent.parent / "results" / "quickstart" / "runs"
    runs = expand(load_suite(SUITES / "quickstart.yaml"))
    checked = 0
    for r in runs:  # results written before start_from existed are still the same runs
        path = committed / f"{r.run_id}.json"
        if path.exists():
            assert json.loads(path.read_text())["spec_hash"] == r.spec_hash, r.run_id
            checked += 1
    assert checked == len(runs)
    text = SUITE.replace("    params: {temperature: 2.0}\n", "    params: {temperature: 2.0}\n"
                         "  - {name: kd-sft, method: logit, params: {temperature: 2.0}, start_from: student}\n")
    by_id = {(r.run_id, r.seed): r for r in expand(load_suite(write(tmp_path, text)))}
    for seed in (0, 1):
        plain, sft = by_id[(f"sentiment__pair__kd__s{seed}", seed)], by_id[(f"sentiment__pair__kd-sft__s{seed}", seed)]
        assert (plain.method.start_from, sft.method.start_from) == ("init", "student")
        renamed = plain.model_copy(update={"method": plain.method.model_copy(update={"name": "kd-sft"})})
        assert sft.spec_hash != renamed.spec_hash  # start_from alone tells them apart
    assert_one_line_error(write(tmp_path, SUITE.replace("params: {temperature: 2.0}", "start_from: teacher"),
                                "bad.yaml"), "methods[0].start_from", "'init' or 'student'")
    grouped = TWO_TASKS.replace("    params: {temperature: 2.0}\n", "    params: {temperature: 2.0}\n"
                                "    start_from: student\n") + (
        "multitask:\n  - {name: mt, tasks: [sentiment, reviews], method: kd}\n")
    assert_one_line_error(write(tmp_path, grouped, "mt.yaml"), "multitask[0].method: method 'kd' starts from the "
                          "student alone; a multi-task student starts from its initialisation")


@pytest.mark.parametrize("training, fragments", [
    ("{max_seq_length: 32}", ["methods[1].training.max_seq_length", "is the suite's"]),
    ("{epoch: 3}", ["methods[1].training.epoch", "unknown key"]),
    ("{batch_size: 0}", ["methods[1].training.batch_size", "greater than 0"]),
], ids=["sequence-length", "unknown-key", "bad-value"])
def test_a_bad_method_training_names_the_method_and_key(tmp_path, training, fragments):
    text = SUITE.replace("    params: {temperature: 2.0}\n", "    params: {temperature: 2.0}\n"
                         f"  - {{name: kd-long, method: logit, training: {training}}}\n")
    assert_one_line_error(write(tmp_path, text), *fragments)


def test_bad_method_param_value(tmp_path):
    text = SUITE.replace("temperature: 2.0", "temperature: -1")
    assert_one_line_error(write(tmp_path, text), "method 'logit'", "params.temperature", "greater than 0")


@pytest.mark.parametrize("params, fragments", [
    ("{teacher_top_k: 0}", ["params.teacher_top_k", "greater than or equal to 1"]),
    ("{teacher_top_k: 8, fused_linear: true}", ["teacher_top_k and fused_linear cannot be combined"]),
    ("{teacher_top_k: 8, teacher_samples: 8}", ["teacher_top_k and teacher_samples cannot be combined"]),
    ("{teacher_samples: 8, divergence: jsd}", ["teacher_samples estimates forward KL's gradient without bias"]),
])
def test_bad_teacher_top_k(tmp_path, params, fragments):
    assert_one_line_error(write(tmp_path, SUITE.replace("params: {temperature: 2.0}", f"params: {params}")),
                          "method 'logit'", *fragments)


def test_a_multitask_group_refuses_a_cached_top_k_teacher(tmp_path):
    cached = "    params: {temperature: 2.0, teacher_top_k: 4}\n"
    grouped = TWO_TASKS.replace("    params: {temperature: 2.0}\n", cached) + (
        "multitask:\n  - {name: mt, tasks: [sentiment, reviews], method: kd}\n")
    assert_one_line_error(write(tmp_path, grouped), "multitask[0].method: method 'kd' caches its teacher's top-k "
                          "tokens; a multi-task student runs every task's teacher at each step")


@pytest.mark.parametrize(
    "old, bad, kind, registry",
    [
        ("task: generated_sentiment", "task: generated_sentimen", "task", tasks),
        ("method: logit", "method: logits", "method", methods),
        ("compressor: int8", "compressor: int4", "compressor", compressors),
        ("model_type: bert, hidden_size: 8", "model_type: bart, hidden_size: 8", "model type", model_types),
    ],
    ids=["task", "method", "compressor", "model-type"],
)
def test_unknown_registry_name_lists_the_available_ones(tmp_path, old, bad, kind, registry):
    name = bad.split(": ")[1].split(",")[0]
    message = assert_one_line_error(write(tmp_path, SUITE.replace(old, bad)), f"unknown {kind} '{name}'")
    assert message.endswith(f"available: {', '.join(registry.names())}")


def test_unknown_inline_config_field_is_named(tmp_path):
    text = SUITE.replace("hidden_size: 8", "hidden_sise: 8")
    assert_one_line_error(write(tmp_path, text), "pairs.pair.student", "unknown bert config field 'hidden_sise'")


def test_missing_local_model_path_is_named(tmp_path):
    text = SUITE.replace(
        "model: {model_type: bert, hidden_size: 8, num_hidden_layers: 1, num_attention_heads: 2}",
        f"model: {tmp_path / 'no-such-model'}",
    )
    assert_one_line_error(write(tmp_path, text), "pairs.pair.student", "model path not found", "no-such-model")


def test_student_cannot_be_finetuned(tmp_path):
    text = SUITE.replace(
        "      model: {model_type: bert, hidden_size: 8, num_hidden_layers: 1, num_attention_heads: 2}",
        "      model: {model_type: bert, hidden_size: 8, num_hidden_layers: 1, num_attention_heads: 2}\n"
        "      finetune: {epochs: 1}",
    )
    assert_one_line_error(write(tmp_path, text), "pairs[0]", "student.finetune is not allowed")


def test_duplicate_names_are_refused(tmp_path):
    data = yaml.safe_load(SUITE)
    data["methods"].append(dict(data["methods"][0]))
    assert_one_line_error(write(tmp_path, yaml.safe_dump(data)), "methods", "duplicate name 'kd'")


def test_missing_required_section_is_named(tmp_path):
    data = yaml.safe_load(SUITE)
    del data["pairs"]
    assert_one_line_error(write(tmp_path, yaml.safe_dump(data)), "pairs", "Field required")


def test_yaml_tags_are_refused(tmp_path):
    """safe_load only: a Python tag in a config is an error, never code that runs."""
    text = SUITE.replace("name: tiny", "name: !!python/object/apply:os.system ['true']")
    assert_one_line_error(write(tmp_path, text), "invalid YAML", f"line {line_of(text, 'python/object')}")


def test_relative_paths_resolve_against_the_suite_file(tmp_path):
    """A suite runs from any working directory: its data files and local models are found beside it."""
    folder = tmp_path / "suites"
    folder.mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "teacher").mkdir()
    text = f"""\
name: rel
tasks:
  - name: local
    task: text_classification
    params: {{train_file: ../data/train.tsv, eval_file: {tmp_path / 'data' / 'test.tsv'}}}
pairs:
  - name: p
    teacher: {{model: ../teacher}}
    student: {{model: {{model_type: bert, hidden_size: 16, num_hidden_layers: 1, num_attention_heads: 2,
                         intermediate_size: 32}}}}
"""
    suite = load_suite(write(folder, text))
    params = suite.tasks[0].params
    assert params["train_file"] == str(tmp_path / "data" / "train.tsv")
    assert params["eval_file"] == str(tmp_path / "data" / "test.tsv")  # absolute paths stay as they are
    assert suite.pairs[0].teacher.model == str(tmp_path / "teacher")
