"""Training a model: TrainingArguments from a suite's settings, the Distiller's run, and what it cost (TrainStats)."""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from transformers import PrinterCallback, TrainerCallback, TrainingArguments

from kdbench.heads import Head
from kdbench.train.distiller import Distiller

log = logging.getLogger(__name__)


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

    `distiller` replaces the Distiller class (kdbench.train.multitask's), with `distiller_kwargs` for its
    constructor."""
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
