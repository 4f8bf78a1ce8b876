"""What the profile tests share: a tiny BERT classifier and its batches."""

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=500, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    return BertForSequenceClassification(cfg).eval()


def _make_inputs(batch_size):
    g = torch.Generator().manual_seed(batch_size)
    ids = torch.randint(1, 500, (batch_size, 16), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.fixture
def make_inputs():
    """`make_inputs(batch_size)`: a (batch_size, 16) batch of token ids, fixed by the batch size."""
    return _make_inputs
