"""Teacher caches: a frozen teacher's logits computed once, row by row, as the teacher gives them."""

import torch

from kdbench.train.teacher_cache import cache_teacher_logits
from tiny import tiny_bert


def test_cache_teacher_logits_matches_the_teacher():
    from transformers import DataCollatorWithPadding, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[PAD]": 0, "a": 1}, "[PAD]")),
                                  pad_token="[PAD]")
    teacher = tiny_bert(1)
    rows = [{"input_ids": [5 + i, 6, 7][: 1 + i % 3], "attention_mask": [1] * (1 + i % 3), "labels": i % 3}
            for i in range(5)]
    out = cache_teacher_logits(teacher, rows, DataCollatorWithPadding(tok), "cpu", batch_size=2)
    assert [r["labels"] for r in out] == [r["labels"] for r in rows]
    with torch.no_grad():
        for r, o in zip(rows, out):
            single = teacher(input_ids=torch.tensor([r["input_ids"]])).logits[0]
            assert torch.allclose(torch.tensor(o["teacher_logits"]), single, atol=1e-5)
