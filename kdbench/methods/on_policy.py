"""`on_policy`: GKD, the student learning the teacher's distributions on text it writes itself."""

from __future__ import annotations

import random
from typing import Literal

from pydantic import Field

from kdbench.errors import KdbenchError
from kdbench.methods.base import Decoding, DistillationConfig, methods
from kdbench.methods.logit import LogitKD


class OnPolicyParams(DistillationConfig):
    temperature: float = Field(1.0, gt=0)  # of the divergence, as GKD's experiments
    alpha: float = Field(1.0, ge=0, le=1)  # 1: the divergence only (no cross-entropy on the student's own samples)
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "jsd"
    lmbda: float = Field(0.5, ge=0, le=1)  # share of training batches the student writes (GKD's lambda)
    sample_temperature: float = Field(1.0, gt=0)  # the student samples its outputs from softmax(logits / this)
    max_new_tokens: int | None = Field(None, gt=0)  # default: the suite's training.max_seq_length
    prompt_length: int | None = Field(None, gt=0)  # causal LM only: tokens of each block the student continues
    prompt_loss: bool = False  # causal LM only: the loss on the prompt's own tokens too, not only the continuation


@methods.register("on_policy")
class OnPolicyKD(LogitKD):
    """On-policy distillation (Agarwal et al., 2024, "On-Policy Distillation of Language Models: Learning from
    Self-Generated Mistakes", GKD), for seq2seq and causal LM tasks.

    On a share `lmbda` of the training batches, drawn per step from the run's seed, the student first writes the
    outputs itself (sampling at `sample_temperature`, with no gradient) and then learns the teacher's token
    distributions on its own text: the teacher corrects the mistakes the student actually makes, which training
    on gold or teacher text never shows it. The other batches are token-level KD on the data. The default loss is
    GKD's: the generalized JSD (beta 0.5) at temperature 1, without cross-entropy.
    - seq2seq: the student writes a target for each source of the batch.
    - causal LM: the student continues each block's first `prompt_length` tokens (default: half of
      max_seq_length) up to the block's length; the loss is on the continuation, or on the prompt's (gold)
      tokens too with `prompt_loss`.

    YAML:
        methods:
          - {name: gkd, method: on_policy, params: {lmbda: 0.5, divergence: jsd, beta: 0.5}}
    """

    Params = OnPolicyParams
    # the teacher reads the student's own text, which no cache of its logits at the data's inputs holds
    teacher_logits_suffice = False

    def __init__(self, params: OnPolicyParams | None = None):
        super().__init__(params or OnPolicyParams())
        self.write = self.collate = None
        self.draws = random.Random(0)

    @property
    def student_decoding(self) -> Decoding:
        p = self.params
        return Decoding("on-policy KD", max_new_tokens=p.max_new_tokens, prompt_length=p.prompt_length,
                        prompt_loss=p.prompt_loss, sample_temperature=p.sample_temperature)

    def bind(self, write, collate, seed: int) -> None:
        """`write(model, rows, device) -> rows`: `rows` ({input_ids, attention_mask}: the batch's inputs) with the
        targets `model` samples; `collate(rows) -> batch`: the task's collator. The draws restart from `seed`."""
        self.write, self.collate, self.draws = write, collate, random.Random(seed)

    def prepare_batch(self, model, inputs: dict) -> dict:
        if self.draws.random() >= self.params.lmbda:
            return inputs
        if self.write is None:
            raise KdbenchError("method 'on_policy': no decoding bound (kdbench.run.prepare binds the task's)")
        mask = inputs["attention_mask"].bool()
        rows = [{"input_ids": ids[keep].tolist(), "attention_mask": [1] * int(keep.sum())}
                for ids, keep in zip(inputs["input_ids"], mask)]
        training = model.training
        try:
            written = self.write(model, rows, inputs["input_ids"].device)
        finally:
            model.train(training)  # generation ran in eval mode
        return {k: v.to(inputs["input_ids"].device) for k, v in self.collate(written).items()}
