"""Distillation methods, one module each, registered by name in `methods` (kdbench.methods.base).

Importing the package registers every method, so that `methods` and `make_objective` know them all. It imports
pydantic only (suite validation and `kdbench ls` use it): torch, kdbench.introspect and the kernels are imported
where a model or a loss is at hand.
"""

from kdbench.methods import attention, hidden, logit, on_policy, progressive, sequence  # noqa: F401 - registers
from kdbench.methods.base import make_objective, methods

__all__ = ["make_objective", "methods"]
