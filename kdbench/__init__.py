"""kdbench: benchmark knowledge distillation end to end (distill, compress, profile, report).

Heavy modules (torch, transformers, triton) load on first use, so `kdbench --help` stays instant:
`from kdbench import Distiller` imports kdbench.train only then.
"""

__version__ = "0.1.0"

from kdbench import quiet as _quiet  # noqa: E402 - before any submodule can import torchao

_quiet.install()

_LAZY = {
    "Distiller": "kdbench.train.distiller",
    "DistillationConfig": "kdbench.methods.base",
    "LogitKD": "kdbench.methods.logit",
    "load_suite": "kdbench.suite",
    "run_suite": "kdbench.run.runner",
    "KdbenchError": "kdbench.errors",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kdbench' has no attribute {name!r}")


__all__ = list(_LAZY) + ["__version__"]
