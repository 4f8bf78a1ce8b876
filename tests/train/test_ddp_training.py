"""Every objective's trainable parameters under DDP (torchrun, 2 CPU processes): the student's, a feature method's
projections (used after the student's forward), a staged method's frozen layers, a multi-task student's task models
(called one by one); both ranks end with the same weights."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

gloo = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                          reason="torch.distributed with gloo is not available")


TRAINERS = textwrap.dedent('''
    import hashlib, json, sys
    import torch
    from transformers import default_data_collator
    from kdbench import distributed, heads, models
    from kdbench.methods import make_objective
    from kdbench.train import loop, multitask
    from kdbench.suite import InlineConfig, TrainingSettings

    def digest(model):
        return hashlib.sha1(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()

    device = distributed.setup("cpu")
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(5, 100, (12,), generator=g).tolist(), "attention_mask": [1] * 12,
             "token_type_ids": [0] * 12, "labels": i % 2} for i in range(64)]
    bert = dict(model_type="bert", num_attention_heads=2, max_position_embeddings=32)
    teacher_ref = InlineConfig(**bert, num_hidden_layers=2, hidden_size=16, intermediate_size=32)
    student_ref = InlineConfig(**bert, num_hidden_layers=1, hidden_size=8, intermediate_size=16)
    head = heads.get("classification")
    teacher = models.build_model(teacher_ref, head=head, num_labels=2, vocab_size=100, seed=0)
    settings = TrainingSettings(max_steps=3, batch_size=4)
    out = {}
    for method in ("logit", "hidden", "attention", "progressive", "multitask"):
        if method == "multitask":
            students = multitask.build_students(student_ref, [("a", 2), ("b", 2)], head=head, vocab_size=100, seed=1)
            parts = [(students[n], teacher, make_objective("logit", {}), head) for n in ("a", "b")]
            model = multitask.MultiTaskStudent(students)
            initial = digest(model)
            stats = loop.train(model, [{**r, "task": i % 2} for i, r in enumerate(rows)], default_data_collator,
                               settings, seed=0, device=device, head=head, distiller=multitask.MultiTaskDistiller,
                               parts=parts)
        else:
            model = models.build_model(student_ref, head=head, num_labels=2, vocab_size=100, seed=1)
            initial = digest(model)
            stats = loop.train(model, rows, default_data_collator, settings, seed=0, device=device,
                               teacher=teacher, objective=make_objective(method, {}), head=head)
        out[method] = {"digests": distributed.gather(digest(model)), "trained": digest(model) != initial,
                       "stats": stats.as_dict()}
    if distributed.is_main():
        print(json.dumps(out))
    distributed.teardown()
''')


@gloo
@pytest.mark.slow
def test_under_ddp_every_method_keeps_the_ranks_weights_equal(tmp_path):
    script = tmp_path / "trainers.py"
    script.write_text(TRAINERS)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)], capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "1"},
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("{")))
    assert sorted(out) == ["attention", "hidden", "logit", "multitask", "progressive"]
    for method, r in out.items():
        assert len(set(r["digests"])) == 1, f"{method}: the two ranks ended with different weights"
        assert r["trained"], method
        assert r["stats"] == {**r["stats"], "steps": 3, "samples": 3 * 4 * 2, "world_size": 2}
