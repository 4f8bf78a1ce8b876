"""Two-stage students (`student: {from_run: ...}`, kdbench.two_stage): loading, refusals, order, hashes, the shared
tokenizer. No training here (tests/run/test_first_stage.py trains)."""

import copy

import pytest

from kdbench.errors import KdbenchError
from kdbench.plan import expand, first_stage_spec, tokenizer_tasks
from kdbench.suite import ModelSpec, load_suite
from tiny import tiny_suite_data, write_suite
from tiny_two_stage import CORPUS, FROM_RUN, TASK_KD, two_stage_data

def load(folder, data, name="suite.yaml"):
    return load_suite(write_suite(folder, data, name))


def test_the_first_stage_runs_before_the_runs_that_start_from_it(tmp_path):
    specs = expand(load(tmp_path, two_stage_data(tmp_path)))
    ids = [s.run_id for s in specs]
    first = ids.index("corpus__pair__general__s0")
    for kind in ("student", "kd"):
        assert first < ids.index(f"sentiment__two__{kind}__s0")
    # the pairs that start from nothing keep the suite's order: task by task
    assert ids.index("sentiment__pair__kd__s0") < ids.index("corpus__pair__teacher")


def test_second_stage_runs_carry_their_first_stage_hash_and_the_teacher_does_not(tmp_path):
    suite = load(tmp_path, two_stage_data(tmp_path))
    by_id = {s.run_id: s for s in expand(suite)}
    first = by_id["corpus__pair__general__s0"]
    assert first_stage_spec(suite, by_id["sentiment__two__kd__s0"].pair, 0) == first
    assert by_id["sentiment__two__student__s0"].first_stage == first.spec_hash
    assert by_id["sentiment__two__kd__s0"].first_stage == first.spec_hash
    assert by_id["sentiment__two__teacher"].first_stage is None
    assert by_id["sentiment__pair__kd__s0"].first_stage is None
    # the student's model is its first stage's (its tokenizer and family), set, not given
    assert by_id["sentiment__two__kd__s0"].pair.student.model == by_id["sentiment__pair__kd__s0"].pair.student.model


def hashes(folder, data, name):
    return {s.run_id: s.spec_hash for s in expand(load(folder, data, name))}


def test_changing_the_first_stage_changes_the_second_stages_hash_and_nothing_else_does(tmp_path):
    data = two_stage_data(tmp_path)
    before = hashes(tmp_path, data, "a.yaml")
    assert hashes(tmp_path, copy.deepcopy(data), "b.yaml") == before  # the same suite: the same hashes
    changed = copy.deepcopy(data)
    changed["methods"][0]["params"]["temperature"] = 3.0  # general-kd: the first stage
    after = hashes(tmp_path, changed, "c.yaml")
    moved = {run_id for run_id in before if before[run_id] != after[run_id]}
    assert moved == {"corpus__pair__general__s0", "sentiment__two__student__s0", "sentiment__two__kd__s0"}
    other = copy.deepcopy(data)
    other["methods"][1]["params"]["temperature"] = 3.0  # kd: a second-stage method, not the first stage
    assert {r for r, h in hashes(tmp_path, other, "d.yaml").items() if before[r] != h} == {
        "sentiment__pair__kd__s0", "sentiment__two__kd__s0"}


def test_a_one_stage_spec_keeps_the_hash_it_had_before_from_run(tmp_path):
    # the committed quickstart results pin the hashes themselves (tests/test_suite.py); here, the keys left out
    assert "from_run" not in ModelSpec(model="x").model_dump()
    specs = expand(load(tmp_path, tiny_suite_data(tmp_path, tmp_path, [TASK_KD])))
    assert all(s.first_stage is None for s in specs)
    assert all(s.spec_hash == s.model_copy(update={"first_stage": None}).spec_hash for s in specs)


def test_linked_tasks_share_one_tokenizer_and_others_keep_their_own(tmp_path):
    suite = load(tmp_path, two_stage_data(tmp_path))
    for task in ("sentiment", "corpus"):
        assert [t.name for t in tokenizer_tasks(suite, task)] == ["sentiment", "corpus"]
    data = tiny_suite_data(tmp_path, tmp_path, [TASK_KD])
    data["tasks"].append(copy.deepcopy(CORPUS))
    plain = load(tmp_path, data, "plain.yaml")
    assert [t.name for t in tokenizer_tasks(plain, "sentiment")] == ["sentiment"]


def edit(change):
    def apply(data):
        change(data)
        return data
    return apply


def _set_from_run(**fields):
    return edit(lambda d: d["pairs"][0]["student"]["from_run"].update(fields))


def _cycle(data):
    data["pairs"][1]["student"] = {"from_run": {"pair": "two", "task": "corpus", "method": "general"}}
    data["pairs"][1]["tasks"] = ["corpus"]


def _multitask(data):
    data["tasks"].append({"name": "other", "task": "generated_sentiment",
                          "params": {"train_size": 16, "eval_size": 8}})
    data["multitask"] = [{"name": "mt", "tasks": ["sentiment", "other"], "method": "kd"}]
    data["methods"][1]["tasks"] = ["sentiment", "other"]
    data["pairs"][0]["tasks"] = ["sentiment", "other"]


@pytest.mark.parametrize("change, fragment", [
    (_set_from_run(task="nope"), "unknown task 'nope'"),
    (_set_from_run(method="nope"), "unknown method 'nope'"),
    (_set_from_run(pair="nope"), "unknown pair 'nope'"),
    (_set_from_run(task="sentiment"), "pair 'two' runs on 'sentiment', the task its students start from"),
    (edit(lambda d: d["pairs"][0].pop("tasks")), "pair 'two' runs on 'corpus', the task its students start from"),
    (_set_from_run(method="kd"), "method 'kd' does not run on task 'corpus'"),
    (edit(lambda d: d["pairs"][1].update(tasks=["sentiment"])), "pair 'pair' does not run on task 'corpus'"),
    (_set_from_run(pair="two"), "from_run makes a cycle (two -> two)"),
    (edit(_cycle), "from_run makes a cycle (two -> pair -> two)"),
    (edit(lambda d: d["pairs"][0]["student"].update(model=d["pairs"][1]["student"]["model"])),
     "give `from_run` alone, not `model` too"),
    (edit(lambda d: d["pairs"][0]["student"].update(from_teacher={"every": 2})),
     "give `from_run` alone, not `from_teacher` too"),
    (edit(lambda d: d["pairs"][0]["teacher"].update(from_run=dict(FROM_RUN))), "teacher.from_run is not allowed"),
    (_set_from_run(stage=2), "unknown key"),
    (edit(_multitask), "a multitask suite builds its students from their own model; from_run is for"),
])
def test_a_bad_from_run_is_refused_in_one_line_naming_it(tmp_path, change, fragment):
    path = write_suite(tmp_path, change(two_stage_data(tmp_path)))
    with pytest.raises(KdbenchError) as e:
        load_suite(path)
    message = str(e.value)
    assert fragment in message and "\n" not in message
    assert message.startswith(f"{path}:")


def test_the_cli_refuses_a_bad_from_run_with_exit_2(tmp_path):
    from typer.testing import CliRunner

    from kdbench.cli import app

    path = write_suite(tmp_path, _set_from_run(method="nope")(two_stage_data(tmp_path)))
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2 and "unknown method 'nope'" in result.output
