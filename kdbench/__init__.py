"""kdbench: benchmark knowledge distillation end to end (distill, compress, profile, report).

Heavy modules (torch, transformers, triton) load on first use, so `kdbench --help` stays instant:
`from kdbench import Distiller` imports the trainer only then.
"""

__version__ = "0.1.0"

_LAZY = {
    "Distiller": "kdbench.trainer",
    "DistillationConfig": "kdbench.methods",
    "LogitKD": "kdbench.methods",
    "load_suite": "kdbench.suite",
    "run_suite": "kdbench.runner",
    "KdbenchError": "kdbench.errors",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kdbench' has no attribute {name!r}")


__all__ = list(_LAZY) + ["__version__"]
