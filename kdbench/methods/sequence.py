"""`sequence`: sequence-level KD, the student trained on what the teacher decodes."""

from __future__ import annotations

from pydantic import Field

from kdbench.methods.base import Decoding, DistillationConfig, methods
from kdbench.methods.logit import LogitKD


class SequenceParams(DistillationConfig):
    alpha: float = Field(0.0, ge=0, le=1)  # 0: pure sequence-level KD, cross-entropy on the teacher's outputs
    num_beams: int = Field(1, ge=1)  # 1: greedy decoding (Kim & Rush use beam search, e.g. 5)
    max_new_tokens: int | None = Field(None, gt=0)  # default: the suite's training.max_seq_length
    keep_references: bool = False  # train on the gold targets too, next to the teacher's
    prompt_length: int | None = Field(None, gt=0)  # causal LM only: tokens of each block the teacher continues
    prompt_loss: bool = False  # causal LM only: train on the prompt's own tokens too, not only the continuation


@methods.register("sequence")
class SequenceKD(LogitKD):
    """Sequence-level KD (Kim & Rush, 2016, "Sequence-Level Knowledge Distillation"), for seq2seq and causal LM
    tasks.

    The teacher decodes once per run (greedy, or beam search with `num_beams`), and the student is trained on
    those outputs instead of the gold text: it learns the teacher's mode rather than a token-level match to every
    target.
    - seq2seq: a target for every training (and transfer) source.
    - causal LM: a continuation of every training block's first `prompt_length` tokens (default: half of
      max_seq_length), up to the block's length, cut after an end-of-sequence token; the student's loss is on
      the continuation only, or on the prompt's gold tokens too with `prompt_loss`.
    `alpha` > 0 adds word-level KD on the teacher's own outputs (their "Seq-KD + Word-KD"); `keep_references`
    also keeps the gold rows.

    YAML:
        methods:
          - {name: seq-kd, method: sequence, params: {num_beams: 4, alpha: 0.5, temperature: 2.0}}
          - {name: lm-seq-kd, method: sequence, params: {prompt_length: 64}}     # a causal LM task
    """

    Params = SequenceParams

    def __init__(self, params: SequenceParams | None = None):
        super().__init__(params or SequenceParams())

    @property
    def teacher_decoding(self) -> Decoding:
        p = self.params
        return Decoding("sequence-level KD", max_new_tokens=p.max_new_tokens, num_beams=p.num_beams,
                        prompt_length=p.prompt_length, prompt_loss=p.prompt_loss)

    def training_rows(self, rows: list[dict], teacher_decoded: list[dict] | None) -> list[dict]:
        return rows + teacher_decoded if self.params.keep_references else teacher_decoded
