"""Models and tokenizers: inline configs, local folders, hub names offline, the pair's shared vocabulary."""


import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, DataCollatorWithPadding

from kdbench import models
from kdbench.errors import KdbenchError
from kdbench.heads import get as get_head
from kdbench.models import model_inputs
from kdbench.suite import InlineConfig, TrainingSettings, load_suite
from kdbench.train.distiller import Distiller
from kdbench.train.loop import training_arguments

TEXTS = [
    "the plot was not good",
    "the acting felt really great but the ending was dull",
    "although the cast was fine , the music was awful",
    "the story seemed never boring",
] * 5
OTHER_TEXTS = ["colourless green ideas sleep furiously", "a quick brown fox jumps over the lazy dog"] * 5

BERT = dict(model_type="bert", hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=32)
DISTILBERT = dict(model_type="distilbert", dim=16, n_layers=1, n_heads=2, hidden_dim=32, max_position_embeddings=32)


pytestmark = pytest.mark.usefixtures("no_network")  # every test here runs without a network


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return models.train_tokenizer(TEXTS, 120, tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def saved_bert(tmp_path_factory, tokenizer):
    """A tiny BertForSequenceClassification and its tokenizer saved with save_pretrained: a local model folder."""
    folder = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, num_labels=2)
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return model, folder


def batch_of(tok, texts=TEXTS[:4]):
    return tok(texts, padding=True, return_tensors="pt")


def logits(model, batch):
    model.eval()
    with torch.inference_mode():
        return model(**model_inputs(dict(batch), model)).logits


# ---------------------------------------------------------------------------------------------------------------
# Tokenizers


def test_train_tokenizer_is_cached_on_disk(tmp_path):
    tok = models.train_tokenizer(TEXTS, 120, tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    again = models.train_tokenizer(OTHER_TEXTS, 60, tmp_path)  # the folder wins: same vocabulary back
    assert again.get_vocab() == tok.get_vocab()
    ids = tok("the plot was not good")["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert tok.unk_token_id not in ids
    assert tok.pad_token == "[PAD]"


def test_trained_vocabulary_is_the_same_every_time(tmp_path):
    """Same texts, same ids: specials, then every character and its ## continuation, then words by frequency
    (ties alphabetical). tokenizers' own trainer broke ties in hash-map order, so ids changed between processes."""
    texts = ["the plot was not good", "the film was good", "a dull plot", "zebra"]
    a = models.train_tokenizer(texts, 200, tmp_path / "a").get_vocab()
    b = models.train_tokenizer(list(reversed(texts)), 200, tmp_path / "b").get_vocab()
    assert a == b
    order = sorted(a, key=a.get)
    assert order[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = sorted(set("".join(texts).replace(" ", "")))
    assert order[5 : 5 + 2 * len(chars)] == chars + [f"##{c}" for c in chars]
    assert order[5 + 2 * len(chars) :][:4] == ["good", "plot", "the", "was"]  # each twice, alphabetical
    capped = models.train_tokenizer(texts, 5 + 2 * len(chars) + 1, tmp_path / "c")
    assert len(capped) == 5 + 2 * len(chars) + 1  # vocab_size caps the words, never the alphabet
    assert capped.convert_ids_to_tokens(capped("zebra")["input_ids"]) == ["[CLS]", "z", "##e", "##b", "##r", "##a",
                                                                          "[SEP]"]


def test_inline_pair_trains_one_tokenizer(tmp_path):
    ref = InlineConfig(**BERT)
    tok = models.pair_tokenizer(ref, ref, TEXTS, tmp_path, "key", vocab_size=100)
    assert (tmp_path / "tokenizers" / "key" / "tokenizer.json").is_file()
    assert len(tok) <= 100


def test_pair_with_different_vocabularies_is_refused(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    models.train_tokenizer(TEXTS, 120, a)
    models.train_tokenizer(OTHER_TEXTS, 80, b)
    with pytest.raises(KdbenchError) as info:
        models.pair_tokenizer(str(a), str(b), TEXTS, tmp_path, "key")
    message = str(info.value)
    assert "\n" not in message
    assert f"teacher '{a}' and student '{b}' have different vocabularies" in message
    assert "shared tokenizer" in message


def test_inline_vocab_size_must_match_a_pretrained_tokenizer(saved_bert, tmp_path):
    _, folder = saved_bert
    student = InlineConfig(**BERT, vocab_size=7)
    with pytest.raises(KdbenchError, match=r"student vocab_size 7 differs from the pair's tokenizer"):
        models.pair_tokenizer(str(folder), student, TEXTS, tmp_path, "key")
    # Without vocab_size, the inline student takes the pretrained teacher's tokenizer.
    tok = models.pair_tokenizer(str(folder), InlineConfig(**BERT), TEXTS, tmp_path, "key")
    assert len(tok) == len(models.load_tokenizer(str(folder)))


# ---------------------------------------------------------------------------------------------------------------
# A local model folder as a suite's model reference


def test_local_folder_round_trips_through_a_suite(saved_bert, tokenizer, tmp_path):
    model, folder = saved_bert
    suite_file = tmp_path / "suite.yaml"
    suite_file.write_text(
        "name: local\n"
        "tasks: [{name: t, task: generated_sentiment}]\n"
        f"pairs: [{{name: p, teacher: {{model: {folder}}}, student: {{model: {folder}}}}}]\n"
    )
    pair = load_suite(suite_file).pairs[0]
    ref = pair.teacher.model
    assert ref == str(folder) and models.is_pretrained(ref)

    tok = models.pair_tokenizer(pair.teacher.model, pair.student.model, TEXTS, tmp_path, "key")
    assert tok.get_vocab() == tokenizer.get_vocab() == models.load_tokenizer(ref).get_vocab()
    loaded = models.build_model(ref, num_labels=2, vocab_size=len(tok), seed=123)
    batch = batch_of(tok)
    assert torch.equal(logits(loaded, batch), logits(model, batch))


def test_local_folder_with_another_head_size_gets_a_new_head(saved_bert):
    _, folder = saved_bert
    loaded = models.build_model(str(folder), num_labels=5, vocab_size=0, seed=0)
    assert loaded.config.num_labels == 5 and loaded.classifier.out_features == 5


@pytest.mark.parametrize("content", ["empty", "config-without-model-type", "tokenizer-only"])
def test_broken_local_folder_is_named(tmp_path, tokenizer, content):
    if content == "config-without-model-type":
        (tmp_path / "config.json").write_text("{}")
    elif content == "tokenizer-only":
        tokenizer.save_pretrained(str(tmp_path))
    with pytest.raises(KdbenchError) as info:
        models.build_model(str(tmp_path), num_labels=2, vocab_size=10, seed=0)
    assert str(info.value).startswith(f"cannot load model from {tmp_path}: ")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("load", ["tokenizer", "model"])
def test_hub_name_offline_says_it_needs_a_network(load):
    name = "kdbench-tests/no-such-model"
    with pytest.raises(KdbenchError) as info:
        if load == "tokenizer":
            models.load_tokenizer(name)
        else:
            models.build_model(name, num_labels=2, vocab_size=10, seed=0)
    message = str(info.value)
    assert "\n" not in message
    assert message == (f"model {name!r} is not a local folder and cannot be fetched from the hub "
                       "(needs a network, or give a local path)")


# ---------------------------------------------------------------------------------------------------------------
# Inline configs


def test_inline_config_builds_a_seeded_model():
    ref = InlineConfig(**BERT)
    a = models.build_model(ref, num_labels=3, vocab_size=50, seed=0)
    b = models.build_model(ref, num_labels=3, vocab_size=50, seed=0)
    c = models.build_model(ref, num_labels=3, vocab_size=50, seed=1)
    assert a.config.hidden_size == 16 and a.config.vocab_size == 50 and a.config.num_labels == 3
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.classifier.weight, c.classifier.weight)
    assert models.describe(ref) == "bert 1L/16H"


@pytest.mark.parametrize("spec, culprit", [
    ({**BERT, "hidden_sise": 8}, "unknown bert config field 'hidden_sise'"),
    ({**DISTILBERT, "hidden_size": 8}, None),  # attribute_map: DistilBERT's hidden_size is `dim`
    ({**DISTILBERT, "num_hidden_layer": 2}, "unknown distilbert config field 'num_hidden_layer'"),
    ({"model_type": "gpt3"}, "unknown model type 'gpt3'; available: bert, distilbert, gpt2, llama, roberta, t5"),
])
def test_check_model_ref(spec, culprit):
    ref = InlineConfig(**spec)
    if culprit is None:
        models.check_model_ref(ref, "pairs.p.student")
        return
    with pytest.raises(KdbenchError) as info:
        models.check_model_ref(ref, "pairs.p.student")
    assert str(info.value) == f"pairs.p.student: {culprit}"


def test_check_model_ref_paths(tmp_path):
    models.check_model_ref("google-bert/bert-base-uncased", "t")  # a hub name: checked when loaded, not here
    models.check_model_ref(str(tmp_path), "t")
    with pytest.raises(KdbenchError, match=r"^t: model path not found: ./no/such/folder$"):
        models.check_model_ref("./no/such/folder", "t")


def test_distilbert_student_with_the_pair_tokenizer(tmp_path):
    """DistilBERT takes no token_type_ids: inputs are filtered per model, and a BERT teacher still gets them."""
    teacher_ref, student_ref = InlineConfig(**BERT), InlineConfig(**DISTILBERT)
    tok = models.pair_tokenizer(teacher_ref, student_ref, TEXTS, tmp_path, "key", vocab_size=100)
    teacher = models.build_model(teacher_ref, num_labels=2, vocab_size=len(tok), seed=0)
    student = models.build_model(student_ref, num_labels=2, vocab_size=len(tok), seed=0)
    assert type(student).__name__ == "DistilBertForSequenceClassification"

    rows = get_head("classification").encode([{"text": t, "label": i % 2} for i, t in enumerate(TEXTS[:4])], tok, 32)
    batch = DataCollatorWithPadding(tok)(rows)
    batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])  # as a BERT-style tokenizer would give
    assert "token_type_ids" not in model_inputs(batch, student)
    assert "token_type_ids" in model_inputs(batch, teacher)
    assert "token_type_ids" not in model_inputs(batch, teacher, student)
    assert logits(student, batch).shape == (4, 2)

    args = training_arguments(TrainingSettings(), seed=0, device="cpu", output_dir=str(tmp_path / "out"))
    distiller = Distiller(model=student, args=args, teacher=teacher)
    student.train()
    loss = distiller.compute_loss(student, dict(batch))
    assert torch.isfinite(loss) and loss.requires_grad


# ---------------------------------------------------------------------------------------------------------------
# Causal LMs: GPT-2 from a local folder (the hub pair's code path), Llama from an inline config


@pytest.fixture(scope="module")
def saved_gpt2(tmp_path_factory):
    """A tiny GPT-2 saved the way the hub serves one: byte-level BPE tokenizer without a pad token, LM head."""
    from tokenizers import Tokenizer, decoders, models as tok_models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    folder = tmp_path_factory.mktemp("gpt2")
    bpe = Tokenizer(tok_models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator(TEXTS * 4, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = GPT2TokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                            unk_token="<|endoftext|>")
    assert tok.pad_token is None
    torch.manual_seed(0)
    eos = tok.eos_token_id
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                       bos_token_id=eos, eos_token_id=eos))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model.eval(), folder


def test_local_gpt2_loads_as_a_causal_lm_with_a_pad_token(saved_gpt2, tmp_path):
    model, folder = saved_gpt2
    head = get_head("causal_lm")
    tok = models.pair_tokenizer(str(folder), str(folder), TEXTS, tmp_path, "key")
    assert tok.pad_token == tok.eos_token == "<|endoftext|>"  # GPT-2 has none; padding is masked anyway
    loaded = models.build_model(str(folder), head=head, num_labels=0, vocab_size=len(tok), seed=0)
    assert type(loaded).__name__ == "GPT2LMHeadModel"
    [whole] = head.encode([{"text": t} for t in TEXTS], tok, 10_000)
    # GPT-2 adds no EOS itself: the head ends each text with one
    assert whole["input_ids"].count(tok.eos_token_id) == len(TEXTS) and whole["input_ids"][-1] == tok.eos_token_id
    batch = head.collator(tok)(head.encode([{"text": t} for t in TEXTS], tok, 8)[:2])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=batch["input_ids"]).logits, model(input_ids=batch["input_ids"]).logits)


def test_gpt2_student_with_another_vocab_size_is_refused(saved_gpt2, tmp_path):
    _, folder = saved_gpt2
    student = InlineConfig(model_type="gpt2", n_embd=16, n_layer=1, n_head=2, vocab_size=123)
    with pytest.raises(KdbenchError, match=r"student vocab_size 123 differs from the pair's tokenizer \(\d+ tokens\)"):
        models.pair_tokenizer(str(folder), student, TEXTS, tmp_path, "key")


@pytest.mark.parametrize("ref, layers", [
    ({"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
      "num_key_value_heads": 2, "intermediate_size": 64}, 2),
    ({"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 2}, 1),
])
def test_inline_causal_lm_configs(ref, layers, tmp_path):
    head = get_head("causal_lm")
    config = InlineConfig(**ref)
    models.check_model_ref(config, "pairs.p.student")
    model = models.build_model(config, head=head, num_labels=0, vocab_size=77, seed=0)
    assert model.config.num_hidden_layers == layers and model.get_output_embeddings().out_features == 77
    assert models.describe(config) == f"{ref['model_type']} {layers}L/32H"
    model.save_pretrained(tmp_path)
    again = models.load_saved(tmp_path, head)
    ids = torch.randint(0, 77, (2, 5))
    assert torch.equal(again(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
