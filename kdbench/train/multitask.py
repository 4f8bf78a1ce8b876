"""Multi-task distillation: one student for several tasks, each task taught by its own teacher.

Liu et al. (2019, "Improving Multi-Task Deep Neural Networks via Knowledge Distillation for Natural Language
Understanding") and Clark et al. (2019, "BAM! Born-Again Multi-Task Networks for Natural Language Understanding")
distil several single-task teachers into one multi-task student: a shared encoder with one output head per task,
trained on the union of the tasks' data, every example distilled from the teacher of its own task. One encoder then
serves N tasks: N times fewer encoder parameters than N single-task students.

Here the student of task k is the usual transformers model for its head (AutoModelForSequenceClassification with
the task's label count), and all of them hold the same encoder module (`base_model_prefix`: `bert`, `distilbert`,
...), so each task's model is profiled, compressed and saved like any other student. Training mixes the tasks'
rows (labelled split plus transfer set) in one shuffled stream; a batch holding rows of several tasks is split by
task, each part goes through its task's model, teacher, objective and head (Distiller.compute_loss), and the parts'
losses are averaged weighted by their row counts. So bigger tasks get more updates, like MT-DNN's sampling in
proportion to dataset size.

YAML (the method's parameters come from the suite method it names):
    methods:
      - {name: kd, method: logit, params: {temperature: 4.0, alpha: 0.7}}
    multitask:
      - {name: multitask-kd, tasks: [sentiment, topics], method: kd}
"""

from __future__ import annotations

import contextlib

import torch

from kdbench.errors import KdbenchError
from kdbench.train.distiller import Distiller, objective_attached


class MultiTaskStudent(torch.nn.Module):
    """The task models as one module, so the optimizer sees each shared parameter once."""

    def __init__(self, models: dict[str, torch.nn.Module]):
        super().__init__()
        self.tasks = torch.nn.ModuleDict(models)

    def forward(self, *args, **kwargs):  # the Distiller calls each task's model itself
        raise TypeError("MultiTaskStudent has no forward of its own; call .tasks[name]")


def build_students(ref, tasks: list[tuple[str, int]], *, head, vocab_size: int, seed: int) -> dict:
    """{task name: model}, one model per (name, num_labels), all holding the first model's encoder."""
    from kdbench import models

    built = {name: models.build_model(ref, head=head, num_labels=n, vocab_size=vocab_size, seed=seed)
             for name, n in tasks}
    first = next(iter(built.values()))
    prefix = first.base_model_prefix
    encoder = getattr(first, prefix, None)
    if not isinstance(encoder, torch.nn.Module):
        raise KdbenchError(f"multitask: {type(first).__name__} has no shared encoder at .{prefix}")
    for model in built.values():
        setattr(model, prefix, encoder)
    return built


def describe_sharing(students: dict, task: str) -> dict:
    """What the variant of `task` shares: the group's tasks and the parameters of all its models together."""
    params = {id(p): p.numel() for m in students.values() for p in m.parameters()}
    own = sum(p.numel() for p in students[task].parameters())
    return {"tasks": list(students), "group_params": sum(params.values()), "task_params": own,
            "note": "the encoder is shared by the group's tasks"}


class MultiTaskDistiller(Distiller):
    """A Distiller over a MultiTaskStudent: rows carry `task` (an index into `parts`), each part of a batch is
    distilled by its task's (student, teacher, objective, head)."""

    def __init__(self, *args, parts: list[tuple], **kwargs):
        super().__init__(*args, **kwargs)  # no teacher of its own: the parts have theirs
        self.parts = parts
        for _, teacher, objective, _ in parts:
            teacher.to(self.args.device).eval().requires_grad_(False)

    def train(self, *args, **kwargs):
        with contextlib.ExitStack() as stack:
            for student, teacher, objective, _ in self.parts:
                objective.setup(student, teacher)
                for callback in objective.callbacks():
                    self.add_callback(callback)
                stack.enter_context(objective_attached(student, teacher, objective))
            return super().train(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise KdbenchError("multitask: the student has no single output to return")
        return super().compute_loss(model, inputs)

    def step_loss(self, model, inputs):
        """(the batch's loss, None); the task models are the parts' students (the MultiTaskStudent's `tasks`), so
        under DDP they all run inside its wrapped forward (distiller.DistillationStep)."""
        task = inputs.pop("task")
        total = 0.0
        for k in task.unique().tolist():
            rows = task == k
            part = {key: value[rows] for key, value in inputs.items()}
            loss, _ = self.distillation_loss(*self.parts[k], part)  # (student, teacher, objective, head)
            total = total + loss * (rows.sum() / len(task))
        return total, None
