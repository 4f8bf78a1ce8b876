"""The suite file: schema and loading with line-numbered errors (kdbench.plan expands a suite into runs).

A suite is YAML loaded with `yaml.safe_load` semantics (no tags, no code) and validated by pydantic models that
forbid unknown keys. Tasks, methods and compressors are named by registry key; their `params` are validated by
the registered entry's own schema, so adding a method never touches this file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_serializer, model_validator)

from kdbench import suite_rules as rules
from kdbench import two_stage
from kdbench.errors import KdbenchError
from kdbench.yamlfile import dotted, first_non_finite, line_of, one_line, read_yaml

class Strict(BaseModel):
    # allow_inf_nan=False: `.inf`, `.nan` and strings such as "inf" are refused for every float setting
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class OptimSettings(Strict):
    """How a model is trained. Defaults suit tiny CPU models."""

    epochs: float = Field(3.0, gt=0)
    max_steps: int = -1  # > 0 overrides epochs; -1: train for `epochs`
    batch_size: int = Field(32, gt=0)
    learning_rate: float = Field(1e-3, gt=0)
    weight_decay: float = 0.01
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"

    _epochs_bounded = field_validator("epochs")(rules.bounded_epochs)
    _steps_bounded = field_validator("max_steps")(rules.bounded_steps)


class TrainingSettings(OptimSettings):
    """Student training, and the sequence length every model of the suite sees."""

    max_seq_length: int = Field(64, gt=0)


class FinetuneSettings(OptimSettings):
    """Fine-tuning of a teacher on the task's labelled split, cached on disk by the hash of this spec."""


class InlineConfig(BaseModel):
    """A tiny model built from a transformers config: `model_type` plus config fields (sizes)."""

    model_config = ConfigDict(extra="allow")  # config fields are checked against the config class in models.py
    model_type: str


ModelRef = Union[str, InlineConfig]  # a hub name or local path, or an inline config


class FromTeacher(Strict):
    """A student made of some of its teacher's layers (kdbench.student_init): `layers` or `every` for a one-stack
    model; `encoder_layers`, `decoder_layers` (and `every` for a stack not listed) for an encoder-decoder."""

    layers: list[int] | None = Field(None, min_length=1)
    every: int | None = Field(None, ge=1)
    encoder_layers: list[int] | None = Field(None, min_length=1)
    decoder_layers: list[int] | None = Field(None, min_length=1)


class FromRun(Strict):
    """A student that starts from another run's distilled student, of the same seed (two-stage distillation, e.g.
    general distillation on a masked-LM corpus, then task distillation): `pair`'s student distilled by `method` on
    `task` (kdbench.two_stage)."""

    pair: str
    task: str
    method: str


class ModelSpec(Strict):
    model: ModelRef | None = None  # required, except for a student given `from_teacher` (which takes the teacher's)
    finetune: FinetuneSettings | None = None  # teachers only: fine-tune on the task first (cached)
    from_teacher: FromTeacher | None = None  # students only
    from_run: FromRun | None = None  # students only; its model is the first stage's (kdbench.two_stage)

    @model_serializer(mode="wrap")
    def _without_absent_from_teacher(self, handler):
        # left out when absent, so that every spec from before it existed keeps its hash (runs, cached teachers)
        data = handler(self)
        if isinstance(data, dict) and data.get("from_teacher") is None:
            data.pop("from_teacher", None)
        if isinstance(data, dict) and data.get("from_run") is None:
            data.pop("from_run", None)
        return data


class TeacherSpec(ModelSpec):
    """One of a pair's `teachers`: a teacher and its weight in the ensemble's soft targets (normalised to sum 1)."""

    weight: float = Field(1.0, gt=0)


class PairSpec(Strict):
    name: rules.Name
    teacher: ModelSpec | None = None  # one teacher, or `teachers`
    # Several teachers, each fine-tuned and reported on its own; students distil from their ensemble, whose soft
    # targets at the method's temperature T are the weighted average of the teachers' softmax(z_i / T)
    # (`teacher_average: probs`), or the softmax at T of their weighted average logits (`logits`).
    teachers: list[TeacherSpec] | None = Field(None, min_length=2)
    teacher_average: Literal["probs", "logits"] = "probs"
    student: ModelSpec
    # The names of the suite's tasks this pair runs on (default: every task), e.g. a BERT pair for the classification
    # tasks and a Llama pair for the language-modelling one. Which tasks it serves changes none of its runs.
    tasks: list[str] | None = Field(None, min_length=1)

    def runs_on(self, task_name: str) -> bool:
        return self.tasks is None or task_name in self.tasks

    @property
    def teacher_roles(self) -> list[tuple[str, ModelSpec]]:
        """(where in the suite, spec) of each teacher: [("teacher", ...)], or [("teachers.0", ...), ...]."""
        if self.teachers is None:
            return [("teacher", self.teacher)]
        return [(f"teachers.{i}", t) for i, t in enumerate(self.teachers)]

    @model_serializer(mode="wrap")
    def _without_absent_teachers(self, handler):
        # left out for a one-teacher pair, so that every spec from before they existed keeps its hash
        data = handler(self)
        if isinstance(data, dict) and data.get("teachers") is None:
            data.pop("teachers", None)
            data.pop("teacher_average", None)
        return data

    @model_validator(mode="after")
    def _student_not_finetuned(self):
        if (self.teacher is None) == (self.teachers is None):
            raise ValueError("give `teacher` or `teachers`, not both" if self.teacher is not None
                             else "a pair needs `teacher` (or `teachers`)")
        if self.teachers is None and "teacher_average" in self.model_fields_set:
            raise ValueError("teacher_average is for a pair with `teachers`")
        if self.student.finetune is not None:
            raise ValueError("student.finetune is not allowed: students are trained by the methods")
        for role, teacher in self.teacher_roles:
            if teacher.from_teacher is not None or teacher.from_run is not None:
                raise ValueError(f"{role}.{'from_teacher' if teacher.from_teacher else 'from_run'} is not allowed: "
                                 "it is for students")
            if teacher.model is None:
                raise ValueError(f"{role}.model is required")
        if self.teachers is not None and self.student.from_teacher is not None:
            raise ValueError("student.from_teacher takes one teacher's layers; with `teachers`, give the student "
                             "its own `model`")
        if self.student.from_run is not None:
            given = [key for key in ("model", "from_teacher") if key in self.student.model_fields_set]
            if given:  # (the model that two_stage.resolve_pairs sets is not in the fields given)
                raise ValueError(f"student: give `from_run` alone, not `{given[0]}` too; its model is the first "
                                 "stage's student")
            # its model reference (tokenizer, family) is the first stage's, set by Suite._first_stages
        elif self.student.from_teacher is None:
            if self.student.model is None:
                raise ValueError("student needs `model` or `from_teacher` (or `from_run`)")
        elif self.student.model is None:
            # The student shares the teacher's model reference (its tokenizer, its family) with fewer layers.
            self.student.model = self.teacher.model.model_copy(deep=True) if isinstance(
                self.teacher.model, BaseModel) else self.teacher.model
        elif self.student.model != self.teacher.model:
            raise ValueError("student: give `model` or `from_teacher`, not both")
        return self


class TaskSpec(Strict):
    name: rules.Name  # the name used in tables
    task: str  # registry key
    params: dict[str, Any] = Field(default_factory=dict)


class ResourceSettings(Strict):
    """What one run asks of a Ray cluster (`kdbench run --ray`); in-process runs ignore it."""

    gpus_per_run: float | None = Field(None, ge=0)  # None: 1 if the driver sees CUDA, else 0
    cpus_per_run: float = Field(1.0, gt=0)


class MethodSpec(Strict):
    name: rules.Name
    method: str  # registry key
    params: dict[str, Any] = Field(default_factory=dict)
    # Changes to the suite's `training` for this method's students (method_training), e.g. fewer epochs for a
    # method that trains on twice the rows, so that methods compare at equal steps.
    training: dict[str, Any] = Field(default_factory=dict)
    # What the distilled student starts from: its initialisation (pretrained weights, or random for an inline
    # config), or the student alone of the same seed, as trained on the labels (supervised fine-tuning first, then
    # distillation, as GKD and MiniLLM do). Its rows' train s and steps then include the student alone's.
    start_from: Literal["init", "student"] = "init"
    # The names of the suite's tasks this method runs on (default: every task), e.g. sequence-level or on-policy KD
    # on the language-modelling tasks only. Which tasks it serves changes none of its runs. A multi-task group
    # names its own tasks.
    tasks: list[str] | None = Field(None, min_length=1)
    resources: ResourceSettings | None = None  # under --ray: this method's runs ask for these instead of the suite's

    def runs_on(self, task_name: str) -> bool:
        return self.tasks is None or task_name in self.tasks


class CompressionStep(Strict):
    compressor: str  # registry key
    params: dict[str, Any] = Field(default_factory=dict)


class CompressionSpec(Strict):
    name: str
    steps: list[CompressionStep] = Field(min_length=1)
    recover_steps: int = Field(0, ge=0)  # distil the compressed student from the teacher for N steps first


class MultitaskSpec(Strict):
    """One student for several tasks: a shared encoder with a head per task, each task's examples distilled from
    that task's teacher with the suite method `method` (see kdbench.train.multitask)."""

    name: rules.Name  # the name used in tables: one row per task of the group
    tasks: list[str] = Field(min_length=2)  # names of the suite's tasks
    method: str  # name of one of the suite's methods


class ProfilingSettings(Strict):
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 32])
    seq_length: int | None = None  # default: the training max_seq_length
    warmup: int = Field(3, ge=0)
    min_repeats: int = Field(5, ge=1)
    max_repeats: int = Field(50, ge=1)
    time_budget_s: float = Field(1.0, gt=0)
    memory: bool = True  # peak memory (a subprocess on CPU: costs a few seconds per variant)
    # Generative heads (causal LM, seq2seq): also time greedy generate() of exactly this many new tokens after the
    # profiling batch (ms per token, tokens/s). None: forward latency only.
    generate_tokens: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _repeats_in_order(self):
        if self.min_repeats > self.max_repeats:
            raise ValueError(f"min_repeats ({self.min_repeats}) is more than max_repeats ({self.max_repeats})")
        return self


class Suite(Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$"), AfterValidator(rules.path_component)]
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    tasks: list[TaskSpec] = Field(min_length=1)
    pairs: list[PairSpec] = Field(min_length=1)
    methods: list[MethodSpec] = Field(default_factory=list)
    compression: list[CompressionSpec] = Field(default_factory=list)
    multitask: list[MultitaskSpec] = Field(default_factory=list)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    profiling: ProfilingSettings = Field(default_factory=ProfilingSettings)
    # Relative to the suite file's folder, like data files, so a suite writes to one place from any working
    # directory; the default keeps a user's runs apart from a checkout's committed results/.
    output_dir: str = "kdbench-results"  # results land in <output_dir>/<name>/
    cache_dir: str = ".kdbench_cache"  # fine-tuned teachers, tokenizers, trained students
    resources: ResourceSettings = Field(default_factory=ResourceSettings)  # per run, under --ray
    max_retries: int = Field(2, ge=0)  # under --ray: re-runs of a run whose worker died (not of a run that failed)

    @field_validator("tasks", "pairs", "methods", "compression", "multitask")
    @classmethod
    def _unique_names(cls, items):
        names = [i.name for i in items]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate name {sorted(dup)[0]!r}")
        return items

    @field_validator("pairs")
    @classmethod
    def _first_stages(cls, pairs):
        two_stage.resolve_pairs(pairs)  # unknown pairs and cycles of `from_run`; a two-stage student's model
        return pairs


# ---------------------------------------------------------------------------------------------------------------
# Loading


def load_suite(path: str | Path) -> Suite:
    """Parse and validate a suite file; every problem is a one-line KdbenchError naming the file, key path and
    line."""
    try:
        return _load(Path(path))
    except KdbenchError as e:
        raise KdbenchError(one_line(str(e))) from None


def _load(path: Path) -> Suite:
    if not path.is_file():
        raise KdbenchError(f"suite file not found: {path}")
    data, root = read_yaml(path)
    if not isinstance(data, dict):
        raise KdbenchError(f"{path}: a suite must be a YAML mapping, got {type(data).__name__}")
    bad = first_non_finite(data)  # params are free-form dicts here: their schemas see only what they declare
    if bad is not None:
        raise KdbenchError(f"{path}:{line_of(root, bad[0])}: {dotted(bad[0])}: must be a finite number, got {bad[1]}")
    try:
        suite = Suite.model_validate(data)
    except ValidationError as e:
        errors = e.errors()
        # A typo of a required key also makes that key missing: name the typo, which is what the user wrote.
        err = next((x for x in errors if x["type"] == "extra_forbidden"), errors[0])
        loc = [p for p in err["loc"] if not _is_union_tag(p)]
        raise KdbenchError(f"{path}:{line_of(root, loc)}: {dotted(loc)}: {_message(err)}") from None
    except RecursionError:
        raise KdbenchError(f"{path}: nested too deeply") from None
    resolve_paths(suite, path.parent)
    from kdbench.suite_checks import check_registry_names  # it reads the suite's classes: imported after them

    try:
        check_registry_names(suite)
    except KdbenchError as e:
        loc = getattr(e, "loc", None)
        where = f"{line_of(root, loc)}: {dotted(loc)}" if loc else ""
        raise KdbenchError(f"{path}:{where}: {e}") from None
    return suite


def _resolve(value: str, base: Path) -> str:
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def resolve_paths(suite: Suite, base: Path) -> None:
    """Relative local paths in a suite (task data files, local model folders, output_dir and cache_dir) are
    relative to the suite file, so a suite runs from any working directory. They are stored resolved: the
    RunResult holds absolute paths."""
    from kdbench.tasks import tasks

    suite.output_dir, suite.cache_dir = _resolve(suite.output_dir, base), _resolve(suite.cache_dir, base)
    for t in suite.tasks:
        if t.task not in tasks:
            continue  # reported by check_registry_names
        for key in getattr(tasks.get(t.task), "path_params", ()):
            if isinstance(t.params.get(key), str):
                t.params[key] = _resolve(t.params[key], base)
    for p in suite.pairs:
        for spec in [*(t for _, t in p.teacher_roles), p.student]:
            if isinstance(spec.model, str) and spec.model.startswith((".", "/", "~")):
                spec.model = _resolve(spec.model, base)


def _is_union_tag(part) -> bool:
    # pydantic inserts the union member's name (e.g. 'str', 'InlineConfig') into error locations
    return isinstance(part, str) and (part in ("str", "InlineConfig") or part.startswith("function-"))


def _message(err) -> str:
    if err["type"] == "extra_forbidden":
        return "unknown key"
    return err["msg"].removeprefix("Value error, ")  # pydantic's prefix for a validator's own ValueError
