"""What tests in several folders share: tiny suites (as YAML dicts and loaded), models and profiling small enough for
seconds."""

from pathlib import Path

BERT = {"model_type": "bert", "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 32}
T5 = {"model_type": "t5", "num_layers": 1, "num_heads": 2, "d_kv": 8, "relative_attention_num_buckets": 8}
LLAMA = {"model_type": "llama", "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
         "max_position_embeddings": 32}
# a causal LM task and a Llama 1L/16 teacher (two fine-tuning steps) with a 1L/8 student, for tiny_suite_data
LM_TASK = {"name": "lm", "task": "generated_lm", "params": {"train_size": 64, "eval_size": 16}}
LM_PAIR = {"name": "llama", "teacher": {"model": {**LLAMA, "hidden_size": 16, "intermediate_size": 32},
                                        "finetune": {"max_steps": 2, "batch_size": 8}},
           "student": {"model": {**LLAMA, "hidden_size": 8, "intermediate_size": 16}}}
FAST_PROFILING = {"batch_sizes": [1], "warmup": 0, "min_repeats": 1, "max_repeats": 1, "time_budget_s": 0.01,
                  "memory": False}


def tiny_suite_data(folder: Path, cache_dir: Path, methods: list[dict], **overrides) -> dict:
    """A seconds-long suite as the dict of its YAML: generated sentiment, a BERT 1L/16 teacher fine-tuned for two
    steps, a 1L/8 student, results under `folder`/results."""
    return {
        "name": "tiny",
        "device": "cpu",
        "seeds": [0],
        "tasks": [{"name": "sentiment", "task": "generated_sentiment",
                   "params": {"train_size": 64, "transfer_size": 32, "eval_size": 32}}],
        "pairs": [{"name": "pair",
                   "teacher": {"model": {**BERT, "hidden_size": 16, "intermediate_size": 32},
                               "finetune": {"max_steps": 2, "batch_size": 16}},
                   "student": {"model": {**BERT, "hidden_size": 8, "intermediate_size": 16}}}],
        "methods": methods,
        "training": {"max_steps": 2, "batch_size": 16, "max_seq_length": 32},
        "profiling": FAST_PROFILING,
        "output_dir": str(folder / "results"),
        "cache_dir": str(cache_dir),
        **overrides,
    }


def tiny_suite(folder: Path, cache_dir: Path, methods: list[dict], **overrides):
    """tiny_suite_data written as a YAML file in `folder` (a new name each time) and loaded as a user's suite is."""
    from kdbench.suite import load_suite

    data = tiny_suite_data(folder, cache_dir, methods, **overrides)
    return load_suite(write_suite(folder, data, f"suite-{len(list(folder.glob('suite-*.yaml')))}.yaml"))


def write_suite(folder: Path, data: dict, name: str = "suite.yaml") -> Path:
    """A suite's dict written as YAML to `folder`/`name`."""
    import yaml

    path = folder / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def tiny_t5(tok, seed: int = 0, **fields):
    """A T5 of 16 wide for `tok`, in eval mode, its weights fixed by `seed`."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(**{"vocab_size": len(tok), "d_model": 16, "d_ff": 32, "num_layers": 1, "num_heads": 2,
                         "d_kv": 8, "relative_attention_num_buckets": 8, "decoder_start_token_id": tok.pad_token_id,
                         **fields})
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(config).eval()


def save_tiny_bart(folder: Path, texts: list[str], *, d_model: int = 16, seed: int = 0,
                   decoder_start: int = 2) -> Path:
    """A BART-style model folder, as from_pretrained reads one: a byte-level BPE tokenizer trained on `texts`
    that wraps a text as <s> ... </s> (ids: <s> 0, <pad> 1, </s> 2, as BART's), and a BartForConditionalGeneration
    of `d_model` wide that starts its decoder with </s> and whose generation forces <s> first (bart-large's
    config)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import BartConfig, BartForConditionalGeneration, PreTrainedTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=specials))
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", pad_token="<pad>", eos_token="</s>",
                                  unk_token="<unk>", mask_token="<mask>")
    config = BartConfig(vocab_size=len(tok), d_model=d_model, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=2 * d_model,
                        decoder_ffn_dim=2 * d_model, max_position_embeddings=64, pad_token_id=1, bos_token_id=0,
                        eos_token_id=2, decoder_start_token_id=decoder_start)
    torch.manual_seed(seed)
    model = BartForConditionalGeneration(config)
    model.generation_config.forced_bos_token_id = 0  # transformers 5 keeps it in the generation config only
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def save_tiny_bart_pair(folder: Path, texts: list[str]) -> tuple[str, str]:
    """Two local BART-style folders under `folder` sharing one tokenizer: a 16-wide teacher and an 8-wide
    student (save_tiny_bart), as (teacher path, student path)."""
    return (str(save_tiny_bart(folder / "teacher", texts, d_model=16, seed=0)),
            str(save_tiny_bart(folder / "student", texts, d_model=8, seed=1)))


def tiny_bert(seed: int, hidden: int = 16, vocab: int = 40):
    """A 1-layer BERT classifier (3 labels) of `hidden` wide, no dropout, its weights fixed by `seed`."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=16, num_labels=3,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config)


def labelled_batch(n: int, labels, seq: int = 6, vocab: int = 40) -> dict:
    """A classifier's batch of `n` random rows with `labels`; the first row ends in two padding positions."""
    import torch

    g = torch.Generator().manual_seed(n)
    ids = torch.randint(5, vocab, (n, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0  # some padding
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor(labels)}
