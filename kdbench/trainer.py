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
import json
import logging
import math
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import CallbackHandler

from kdbench import heads
from kdbench.errors import KdbenchError, NonFiniteLossError
from kdbench.heads import IGNORE, Head
from kdbench.methods import DistillationConfig, LogitKD, Objective
from kdbench.models import model_inputs

log = logging.getLogger(__name__)


class Distiller(Trainer):
    """`Distiller(model=student, teacher=teacher, objective=LogitKD(DistillationConfig(...)), args=..., ...)`.

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
    if not getattr(getattr(objective, "params", None), "fused_linear", False):
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


TEACHER_LOGITS_BATCH = 256


def cache_teacher_logits(teacher, rows: list[dict], collator, device: str,
                         batch_size: int = TEACHER_LOGITS_BATCH) -> list[dict]:
    """Rows with the frozen teacher's logits attached as `teacher_logits` (one inference pass over the data)."""
    teacher.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            batch = collator([{k: v for k, v in r.items() if k != "labels"} for r in chunk])
            batch = model_inputs({k: v.to(device) for k, v in batch.items()}, teacher)
            logits = teacher(**batch).logits.float().cpu()
            out += [{**r, "teacher_logits": logits[j].tolist()} for j, r in enumerate(chunk)]
    return out


TOP_K_LOGITS = 1 << 26  # teacher logits per batch while caching its top-k (256 MB of fp32), whatever L and V


def cache_teacher_top_k(teacher, rows: list[dict], collator, device: str, *, k: int, temperature: float,
                        sampled: bool = False) -> list[dict]:
    """Rows of a language-model task with the frozen teacher's k most likely tokens at each logit position attached
    (kdbench.kernels.teacher_top_k at `temperature`): `teacher_top_log_probs` (Lt, k + 1) fp32 and
    `teacher_top_ids` (Lt, k) int32, Lt the row's label length (its logit positions). `sampled`: k tokens drawn
    from the teacher instead (kdbench.kernels.teacher_samples), by a generator seeded from each batch's first row,
    so that the draws do not depend on the process or on what ran before. One inference pass; only about
    TOP_K_LOGITS teacher logits exist at a time."""
    from kdbench.kernels import teacher_samples, teacher_top_k

    start = time.perf_counter()
    teacher.eval()
    vocab = teacher.get_output_embeddings().weight.shape[0]
    longest = max((len(r["labels"]) for r in rows), default=1)
    batch_size = max(1, min(TEACHER_LOGITS_BATCH, TOP_K_LOGITS // (longest * vocab)))
    out = []
    with torch.inference_mode():
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            batch = {key: v.to(device) for key, v in collator(chunk).items() if key != "labels"}
            logits = teacher(**model_inputs(batch, teacher)).logits
            if sampled:
                seed = zlib.crc32(str(list(chunk[0]["input_ids"])).encode())
                generator = torch.Generator(device=logits.device).manual_seed(seed)
                log_probs, ids = teacher_samples(logits, k, temperature=temperature, generator=generator)
            else:
                log_probs, ids = teacher_top_k(logits, k, temperature=temperature)
            log_probs, ids = log_probs.cpu(), ids.cpu()
            out += [{**r, TopKCollator.KEYS[0]: log_probs[j, : len(r["labels"])].clone(),
                     TopKCollator.KEYS[1]: ids[j, : len(r["labels"])].clone()} for j, r in enumerate(chunk)]
    log.info("teacher %s %d cached for %d rows in %.1f s", "samples" if sampled else "top", k, len(rows),
             time.perf_counter() - start)
    return out


TOP_K_FILE = "teacher_top_k.pt"


def save_teacher_top_k(path, rows: list[dict]) -> None:
    """The top-k that `cache_teacher_top_k` attached to `rows`, saved to `path` as three tensors: the rows' lengths
    and every row's log-probabilities and token ids, concatenated."""
    log_probs, ids = ([r[key] for r in rows] for key in TopKCollator.KEYS)
    torch.save({"lengths": torch.tensor([len(x) for x in ids], dtype=torch.long),
                "log_probs": torch.cat(log_probs), "ids": torch.cat(ids)}, path)


def load_teacher_top_k(path, rows: list[dict]) -> list[dict] | None:
    """`rows` with the top-k saved at `path` attached again; None if they were not saved for rows of these
    lengths."""
    saved = torch.load(path, weights_only=True)
    lengths = saved["lengths"].tolist()
    if lengths != [len(r["labels"]) for r in rows]:
        return None
    log_probs, ids = saved["log_probs"].split(lengths), saved["ids"].split(lengths)
    return [{**r, TopKCollator.KEYS[0]: a, TopKCollator.KEYS[1]: b} for r, a, b in zip(rows, log_probs, ids)]


class TopKCollator:
    """A task's collator for rows that carry a cached teacher's top-k (`cache_teacher_top_k`): the task's batch,
    plus `teacher_top_log_probs` (B, Lt, k + 1) and `teacher_top_ids` (B, Lt, k), padded to the batch's label
    length Lt. Padded positions, labelled IGNORE, get a uniform distribution over the buckets (never read)."""

    KEYS = ("teacher_top_log_probs", "teacher_top_ids")

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, rows):
        batch = self.collator([{k: v for k, v in r.items() if k not in self.KEYS} for r in rows])
        length = batch["labels"].shape[-1]
        log_probs, ids = ([r[key] for r in rows] for key in self.KEYS)
        uniform = -math.log(log_probs[0].shape[-1])
        batch[self.KEYS[0]] = torch.stack([_pad_rows(x, length, uniform) for x in log_probs])
        batch[self.KEYS[1]] = torch.stack([_pad_rows(x, length, 0) for x in ids])
        return batch

    @classmethod
    def pop(cls, inputs: dict):
        """(log_probs, token_ids) taken out of a batch, or None if it carries no cached top-k."""
        if cls.KEYS[0] not in inputs:
            return None
        return inputs.pop(cls.KEYS[0]), inputs.pop(cls.KEYS[1])


def _pad_rows(x: torch.Tensor, length: int, fill) -> torch.Tensor:
    """`x` (L, ...) padded with `fill` to `length` rows."""
    return torch.cat([x, x.new_full((length - x.shape[0], *x.shape[1:]), fill)]) if x.shape[0] < length else x


TRAINING_FILE = "kdbench_training.json"  # a cached model's training stats, beside its weights


@dataclass
class TrainStats:
    """`samples` counts every process's: steps x batch size per device x world size (the processes training
    together under torchrun, 1 otherwise); `samples_per_s` is the throughput of them all."""

    wall_s: float
    steps: int
    samples: int
    world_size: int = 1

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.wall_s if self.wall_s > 0 else math.nan

    def save(self, folder) -> None:
        """Write these stats into `folder` (a cached model's), as TRAINING_FILE."""
        (Path(folder) / TRAINING_FILE).write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, folder) -> TrainStats | None:
        """The stats `save` wrote into `folder`; None if it holds none."""
        path = Path(folder) / TRAINING_FILE
        return cls(**json.loads(path.read_text())) if path.exists() else None

    def then(self, later: TrainStats) -> TrainStats:
        """This training followed by `later` (a student fine-tuned alone, then distilled), as one."""
        return TrainStats(wall_s=self.wall_s + later.wall_s, steps=self.steps + later.steps,
                          samples=self.samples + later.samples, world_size=later.world_size)

    def as_dict(self) -> dict:
        return {"wall_s": round(self.wall_s, 3), "steps": self.steps, "samples": self.samples,
                "samples_per_s": round(self.samples_per_s, 1), "world_size": self.world_size}


class _StepProgress(TrainerCallback):
    """Feeds a rich progress bar (one task over training steps)."""

    def __init__(self, progress, description: str):
        self.progress, self.description, self.task = progress, description, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.task = self.progress.add_task(self.description, total=state.max_steps)

    def on_step_end(self, args, state, control, **kwargs):
        self.progress.update(self.task, completed=state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self.progress.remove_task(self.task)


def training_arguments(settings, *, seed: int, device: str, output_dir: str, max_steps: int | None = None):
    """TrainingArguments from kdbench's TrainingSettings: no checkpoints, no logging integrations."""
    steps = max_steps if max_steps is not None else settings.max_steps
    return TrainingArguments(
        output_dir=output_dir,
        num_train_epochs=settings.epochs,
        max_steps=steps if steps and steps > 0 else -1,
        per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        weight_decay=settings.weight_decay,
        warmup_steps=settings.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps in transformers 5
        bf16=settings.precision == "bf16",
        fp16=settings.precision == "fp16",
        use_cpu=device == "cpu",
        seed=seed,
        data_seed=seed,
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )


def train(model, dataset, collator, settings, *, seed: int, device: str, teacher=None, objective=None,
          progress=None, description: str = "training", max_steps: int | None = None,
          head: Head | None = None, distiller: type[Distiller] | None = None, **distiller_kwargs) -> TrainStats:
    """Train `model` in place on `dataset` (a list of tokenized dicts); return wall time, steps, samples.

    Under torchrun it trains with DDP on every process: `settings.batch_size` is per process (the Trainer's
    per_device_train_batch_size), so one step takes batch_size x world size rows and an epoch has that many fewer
    steps; each process sees its own shard of every epoch.

    `distiller` replaces the Distiller class (kdbench.multitask's), with `distiller_kwargs` for its constructor."""
    with tempfile.TemporaryDirectory(prefix="kdbench-trainer-") as tmp:
        args = training_arguments(settings, seed=seed, device=device, output_dir=tmp, max_steps=max_steps)
        callbacks = [_StepProgress(progress, description)] if progress is not None else []
        trainer = (distiller or Distiller)(model=model, args=args, train_dataset=dataset, data_collator=collator,
                                           teacher=teacher, objective=objective, callbacks=callbacks, head=head,
                                           **distiller_kwargs)
        trainer.remove_callback(PrinterCallback)  # it prints a metrics dict to stdout; tables own stdout
        start = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - start
        steps = trainer.state.global_step
        world = args.world_size  # under torchrun each process takes its own batch of `batch_size` rows per step
        if steps and settings.warmup_ratio > 0 and steps <= args.get_warmup_steps(steps):
            # linear warmup starts at learning rate 0: a run no longer than its warmup barely moves the model
            log.warning("%s: %d step(s), all of them warmup (warmup_ratio %s); the model barely trained: give it "
                        "more data, epochs or steps", description, steps, settings.warmup_ratio)
    return TrainStats(wall_s=wall, steps=steps, samples=steps * settings.batch_size * world, world_size=world)
