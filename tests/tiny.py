"""Settings shared by the tests that run suites end to end: models and profiling small enough for seconds."""

BERT = {"model_type": "bert", "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 32}
FAST_PROFILING = {"batch_sizes": [1], "warmup": 0, "min_repeats": 1, "max_repeats": 1, "time_budget_s": 0.01,
                  "memory": False}
