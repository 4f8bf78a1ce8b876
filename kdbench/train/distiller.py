"""Distiller: a `transformers.Trainer` that swaps in a distillation loss, and nothing else.

The training loop, DDP, mixed precision and checkpointing stay the Trainer's. `compute_loss` runs the frozen
teacher under `eval()` and `no_grad`, fills in teacher labels for transfer-set rows, and asks the method's
Objective for the loss. Without a teacher it is plain cross-entropy: the "student alone" baseline.
An objective may first replace the batch (`prepare_batch`: on-policy KD has the student write it), and with its
`fused_linear` the models' output layers run inside the loss instead of the models (`fused_linear_loss`).
An objective with trainable modules (projections) has them attached to the student for the length of `train()`
only (`objective_attached`), so the Trainer's optimizer trains them and the student comes back as the plain model.
Under DDP (torchrun) the Trainer wraps a `DistillationStep` instead of the student: the whole loss is its forward,
so that the projections' and a multi-task student's gradients are averaged too; a non-finite loss on any process
stops them all at the same step. With bf16/fp16 that forward, teacher and loss included, runs under the Trainer's
autocast (one process: the student's forward alone).
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from types import SimpleNamespace

import torch
from transformers import Trainer
from transformers.trainer_callback import CallbackHandler

from kdbench import heads
from kdbench.errors import KdbenchError, NonFiniteLossError
from kdbench.heads import IGNORE, Head
from kdbench.methods.base import DistillationConfig, Objective
from kdbench.methods.logit import LogitKD
from kdbench.models import model_inputs
from kdbench.train.teacher_cache import TopKCollator


class Distiller(Trainer):
    """`Distiller(model=student, teacher=teacher, distillation=DistillationConfig(...), args=..., ...)`.

    `distillation` sets the logit-KD terms. Another method (kdbench.methods: hidden, attention, ...) is an
    `objective=` instead.

    `head` (kdbench.heads, default: classification) says which logit positions predict which labels and gives the
    hard loss. `teacher=None` trains the student on its labels alone. A classifier's rows labelled TEACHER_LABEL (-1)
    take the teacher's argmax as their hard label, so an unlabelled transfer set can be mixed into the training data.
    A batch may carry precomputed `teacher_logits` (N, C) (see `cache_teacher_logits`), or a language model
    teacher's top-k tokens (`cache_teacher_top_k`, `TopKCollator`): then the teacher's forward pass is skipped. That
    is exact for a frozen teacher in eval mode and saves its cost on every epoch and seed. With an `objective` and
    batches that carry the teacher this way, `teacher` may be None: the teacher need not be in memory at all.
    """

    def __init__(self, model=None, args=None, *more, teacher: torch.nn.Module | None = None,
                 objective: Objective | None = None, distillation: DistillationConfig | None = None,
                 head: Head | None = None, **kwargs):
        self.student = model
        if model is not None and args is not None and _data_parallel(args):
            model = DistillationStep(model, self.step_loss)  # what DDP wraps: see DistillationStep
        super().__init__(model, args, *more, **kwargs)
        if isinstance(model, DistillationStep):  # callbacks (an objective's stages) see the student, as without DDP
            self.callback_handler.__class__ = _StudentCallbacks
            self.callback_handler.model = model
        self.head = head or heads.get("classification")
        self.teacher = teacher
        self.objective = objective or (LogitKD(distillation) if teacher is not None else None)
        if teacher is not None:
            teacher.to(self.args.device).eval()
            teacher.requires_grad_(False)
            if self.objective is not None:
                self.objective.setup(self.student, teacher)  # builds its trainable modules (kept if already built)
                for callback in self.objective.callbacks():
                    self.add_callback(callback)

    def train(self, *args, **kwargs):
        # An objective's schedule may freeze parameters stage by stage; a run that stops early (a NaN loss) must
        # still hand back the student as trainable as it came, for the recovery training after pruning.
        trainable = [(p, p.requires_grad) for p in self.student.parameters()]
        try:
            with objective_attached(self.student, self.teacher, self.objective):
                return super().train(*args, **kwargs)
        finally:
            for p, flag in trainable:
                p.requires_grad_(flag)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if isinstance(getattr(model, "module", model), DistillationStep):
            loss, student_out = model(inputs)  # through DDP's forward, so that every gradient is averaged
        else:
            loss, student_out = self.step_loss(model, inputs)
        self.stop_if_not_finite(loss)
        return (loss, student_out) if return_outputs else loss

    def step_loss(self, model, inputs):
        """(loss, student outputs) of one batch for `model` (the student)."""
        return self.distillation_loss(model, self.teacher, self.objective, self.head, inputs)

    def stop_if_not_finite(self, loss) -> None:
        """A non-finite loss stops the run; under DDP every rank stops at the same step (the loss of one rank's
        shard decides for all), so none is left waiting for the others' gradients."""
        finite = torch.isfinite(loss.detach()).reshape(1)
        if self.args.world_size > 1:
            finite = self.accelerator.gather(finite.to(torch.int32)).bool().all()  # int: NCCL and gloo both take it
        if not finite:
            step = self.state.global_step + 1
            if torch.isfinite(loss.detach()):
                raise NonFiniteLossError(f"loss is not finite in another process at step {step}; run stopped")
            raise NonFiniteLossError(f"loss is {loss.item()} at step {step}; run stopped")

    def distillation_loss(self, model, teacher, objective, head, inputs):
        """(loss, student outputs) of one batch: the hard loss without a teacher, else the objective's loss on the
        logit rows `head` lines up with the labels."""
        if teacher is not None and objective is not None:
            inputs = dict(objective.prepare_batch(model, inputs))  # on-policy KD: the student writes the targets
        labels = batch_labels = inputs.pop("labels")
        cached = inputs.pop("teacher_logits", None)
        top_k = TopKCollator.pop(inputs)
        flags = dict(output_hidden_states=bool(objective and objective.needs_hidden_states),
                     output_attentions=bool(objective and objective.needs_attentions))
        if teacher is not None and cached is None and top_k is None and fused_linear(objective, head):
            return self.fused_linear_loss(model, teacher, objective, head, inputs, labels, batch_labels, flags)
        student_out = model(**model_inputs(inputs, model), **flags)
        student_logits = head.logits(student_out)  # (N, V) rows; an extractive QA model's start and end, stacked
        if objective is None or (teacher is None and cached is None and top_k is None):
            loss = head.hard_loss(student_logits, labels)
        else:
            if cached is not None:
                teacher_out = SimpleNamespace(logits=cached)
            elif top_k is not None:  # (log_probs, token_ids) per logit position (kdbench.kernels.top_k_kd_loss)
                teacher_out = SimpleNamespace(logits=None, top_k=top_k)
            else:
                teacher.eval()  # Trainer.train() puts every registered module in train mode
                with torch.no_grad():
                    teacher_out = teacher(**model_inputs(inputs, teacher), **flags)
            teacher_logits = head.logits(teacher_out)
            labels = head.fill_teacher_labels(labels, teacher_logits)
            # The losses see the logit rows that predict labels (a causal LM's shifted positions); features and
            # attention maps stay as the models returned them.
            s_logits, aligned = head.align(student_logits, labels)
            t_logits, _ = head.align(teacher_logits, labels)
            loss = objective.loss(_with_logits(student_out, s_logits), _with_logits(teacher_out, t_logits), aligned,
                                  **self.token_masks(model, inputs, batch_labels, flags))
        return loss, student_out

    def fused_linear_loss(self, model, teacher, objective, head, inputs, labels, batch_labels, flags):
        """`distillation_loss` with the output layers run inside the loss (a method's `fused_linear`): the models
        return their last hidden states instead of logits, and kdbench.kernels.fused_linear_kd_loss makes the
        logits chunk by chunk, so that no (B, L, V) logits tensor exists."""
        from kdbench import output_layer

        student_inputs, teacher_inputs = model_inputs(inputs, model), model_inputs(inputs, teacher)
        teacher.eval()  # Trainer.train() puts every registered module in train mode
        output_layer.check_logits(model, student_inputs, "the student")  # once per model: exact, or refused
        output_layer.check_logits(teacher, teacher_inputs, "the teacher")
        with output_layer.captured(model, what="the student") as student_layer:
            student_out = model(**student_inputs, **flags)
        with torch.no_grad(), output_layer.captured(teacher, what="the teacher") as teacher_layer:
            teacher_out = teacher(**teacher_inputs, **flags)
        # the rows that predict labels, as `align` gives the logits' (language-model heads keep every position)
        s_rows, aligned = head.align(student_layer.hidden, labels)
        t_rows, _ = head.align(teacher_layer.hidden, labels)
        student_view = _replaced(student_out, logits=None,
                                 output_layer=replace(student_layer, hidden=s_rows))
        teacher_view = _replaced(teacher_out, logits=None,
                                 output_layer=replace(teacher_layer, hidden=t_rows))
        loss = objective.loss(student_view, teacher_view, aligned,
                              **self.token_masks(model, inputs, batch_labels, flags))
        return loss, student_out

    @staticmethod
    def token_masks(model, inputs, batch_labels, flags) -> dict:
        """Feature methods leave padding tokens out; logit-only objectives keep their 3-argument loss."""
        mask = {"attention_mask": inputs.get("attention_mask")} if any(flags.values()) else {}
        if mask and _is_encoder_decoder(model):
            mask["decoder_attention_mask"] = decoder_token_mask(inputs, batch_labels)
        return mask


def _data_parallel(args) -> bool:
    """Whether `args` train with DDP over several processes (torchrun)."""
    _ = args.device  # sets up the process group state that world_size reads
    return args.world_size > 1


class DistillationStep(torch.nn.Module):
    """The student behind one forward that returns the batch's loss: what DDP wraps when several processes train.

    DDP averages a parameter's gradient only if the parameter was used inside the wrapped module's forward. A
    feature method's projections (applied to the hidden states after the student's forward) and a multi-task
    student's task models (called one by one by the distiller) are not: DDP fails on the first, and silently leaves
    the second unsynchronised. Here the whole loss, from the student's forward to the objective's terms, is the
    forward. The teacher is not a submodule: it is frozen, and DDP need not broadcast it.
    """

    def __init__(self, student: torch.nn.Module, step_loss):
        super().__init__()
        self.student = student
        self.step_loss = step_loss  # Distiller.step_loss: (model, inputs) -> (loss, outputs)

    def forward(self, inputs: dict):
        return self.step_loss(self.student, inputs)


class _StudentCallbacks(CallbackHandler):
    """A CallbackHandler that hands its callbacks the student where the Trainer gives it a DistillationStep."""

    def __setattr__(self, name, value):
        if name == "model" and isinstance(value, DistillationStep):
            value = value.student
        super().__setattr__(name, value)


def fused_linear(objective, head, method: str | None = None, task: str | None = None) -> bool:
    """Whether `objective` runs the output layers inside its loss (its `fused_linear`); refused, in one line
    naming `method` and `task` when given, for a head whose logits are not a vocabulary."""
    if not getattr(objective, "fused_linear", False):
        return False
    if not head.vocab_rows:
        raise KdbenchError(f"{f'method {method!r}: ' if method else ''}fused_linear is for language-model tasks "
                           f"(vocabulary logits); {f'task {task!r}' if task else 'this task'} has a {head.kind} head")
    return True


def _with_logits(out, logits):
    """A view of model outputs `out` with other logits (the hidden states and attentions stay, an encoder-decoder's
    encoder_/decoder_/cross_ ones included)."""
    if logits is getattr(out, "logits", None):
        return out
    return _replaced(out, logits=logits)


def _replaced(out, **fields):
    """A SimpleNamespace of the fields of model outputs `out` (a ModelOutput, or a SimpleNamespace), with `fields`
    set."""
    return SimpleNamespace(**{**(dict(out.items()) if hasattr(out, "items") else dict(vars(out))), **fields})


def _is_encoder_decoder(model) -> bool:
    model = getattr(model, "module", model)  # DDP
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def decoder_token_mask(inputs: dict, labels):
    """(B, Lt) of an encoder-decoder's decoder positions that count, for feature methods: the batch's
    `decoder_attention_mask` if it has one, else the positions with a label (the seq2seq head pads labels with
    IGNORE and `decoder_input_ids` to the same length, and decoder position i predicts label i); None (every
    position) when neither lines up with the decoder inputs."""
    given = inputs.get("decoder_attention_mask")
    if given is not None:
        return given
    decoder = inputs.get("decoder_input_ids")
    if labels is not None and decoder is not None and labels.shape == decoder.shape:
        return labels != IGNORE
    return None


PROJECTIONS = "kd_projections"  # the student's submodule that holds an objective's trainable modules in training


@contextlib.contextmanager
def objective_attached(student, teacher, objective):
    """While training: the objective's trainable modules (`objective.modules`) are the student's submodule
    `kd_projections`, so the Trainer's optimizer, device placement and train/eval switches include them; and if the
    objective needs attention maps, both models run eager attention (SDPA returns none).

    On exit the student is the plain model again (same parameters, same state_dict, no hooks left by transformers'
    output capturing) and both models have their attention implementation back, so what is saved, profiled and
    compressed is what was trained, measured the same way as every other student. No-op without a teacher or
    objective.
    """
    modules = getattr(objective, "modules", None) if teacher is not None else None
    wants_outputs = teacher is not None and objective is not None and (
        objective.needs_hidden_states or objective.needs_attentions)
    hooks = [_forward_hooks(student), _forward_hooks(teacher)] if wants_outputs else []
    switched = []
    try:
        if teacher is not None and objective is not None and objective.needs_attentions:
            for m in (student, teacher):
                previous = m.config._attn_implementation
                if previous != "eager":
                    m.set_attn_implementation("eager")
                    switched.append((m, previous))
        if modules is not None:
            student.add_module(PROJECTIONS, modules.to(next(student.parameters()).device))
        yield
    finally:
        if modules is not None and PROJECTIONS in student._modules:
            delattr(student, PROJECTIONS)
        for m, previous in switched:
            m.set_attn_implementation(previous)
        for before in hooks:
            _remove_new_forward_hooks(before)


_HOOKED_FLAG = "_output_capturing_hooks_installed"


def _forward_hooks(model) -> list:
    """(module, its forward-hook ids, whether transformers marked it hooked) for every submodule of `model`."""
    return [(m, set(m._forward_hooks), _HOOKED_FLAG in m.__dict__) for m in model.modules()]


def _remove_new_forward_hooks(before: list) -> None:
    """Remove the forward hooks added since `_forward_hooks` was taken.

    transformers 5 installs output-capturing hooks (local closures) the first time a model is asked for hidden
    states or attentions and leaves them there; they make the model unpicklable (the profiler's memory
    measurement pickles it). Removing them, and the flag that says they are installed, gives back the model as it
    was: transformers installs them again when it next needs them.
    """
    for module, ids, flagged in before:
        for hid in set(module._forward_hooks) - ids:
            for table in (module._forward_hooks, module._forward_hooks_with_kwargs,
                          module._forward_hooks_always_called):
                table.pop(hid, None)
        if not flagged and _HOOKED_FLAG in module.__dict__:
            delattr(module, _HOOKED_FLAG)
