"""kd_loss's front (kernels/front.py): one-line input errors, one docstring for every entry point, the choice of
backend (and the opt-in kernels run through it), and a light package import."""

from __future__ import annotations

import importlib
import inspect
import os
import subprocess
import sys

import pytest
import torch

import kdbench.kernels as kernels
from kd_lean_cases import check_through_front
from kd_oracle import CUDA, device_for, impl  # noqa: F401
from kdbench.kernels import KD_LOSS_DOC, KdLossInputError, kd_loss
from kdbench.kernels import reference


# ----------------------------------------------------------------------------------------------------------------
# Errors, docs, dispatch
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (
            dict(t_shape=(4, 12)),
            r"teacher vocab 12 is larger than the student's 10; slicing teacher_logits\[\.\.\., :10\] is the caller",
        ),
        (dict(t_shape=(4, 8)), "shape mismatch"),
        (dict(t_shape=(3, 10)), "shape mismatch"),
        (dict(lab_shape=(5,)), "labels shape"),
        (dict(divergence="kl"), "unknown divergence 'kl'; available: forward_kl, reverse_kl, jsd"),
        (dict(reduction="mean"), "unknown reduction"),
        (dict(temperature=0.0), "temperature must be finite and > 0"),
        (dict(temperature=-1.0), "temperature"),
        (dict(alpha=1.5), "alpha"),
        (dict(divergence="jsd", beta=0.0), "beta must lie in"),
        (dict(feature_weight=1.0), "needs both student_features and teacher_features"),
        (dict(lab_value=10), "out of range"),
    ],
)
def test_validation_errors(impl, kwargs, match):
    kwargs = dict(kwargs)  # the parametrize dict is shared between the two impls
    dev = device_for(impl)
    s = torch.randn(4, 10, device=dev)
    t = torch.randn(*kwargs.pop("t_shape", (4, 10)), device=dev)
    labels = torch.zeros(kwargs.pop("lab_shape", (4,)), dtype=torch.long, device=dev)
    if "lab_value" in kwargs:
        if dev != "cpu":
            pytest.skip("label range is checked on CPU only (no host sync on CUDA)")
        labels[2] = kwargs.pop("lab_value")
    with pytest.raises(ValueError, match=match) as info:
        kd_loss(s, t, labels, **kwargs)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, KdLossInputError)


def test_one_docstring_for_every_entry_point():
    kernel_module = importlib.import_module("kdbench.kernels.kd_loss_triton")
    assert kd_loss.__doc__ == reference.kd_loss.__doc__ == kernel_module.kd_loss.__doc__ == KD_LOSS_DOC
    for phrase in ("T^2 scales the soft term only", "ignore_index", "batchmean", "beta * KL(p_t || m)", "(N, V)"):
        assert phrase in KD_LOSS_DOC


def test_dispatch(monkeypatch):
    s = torch.randn(2, 8)
    monkeypatch.delenv("KDBENCH_KERNEL", raising=False)
    assert kernels.backend_for(s) == ("torch")
    assert kernels.backend_for(s.double()) == "torch"
    monkeypatch.setenv("KDBENCH_KERNEL", "triton")
    assert kernels.backend_for(s) == "triton"
    monkeypatch.setenv("KDBENCH_KERNEL", "cuda")
    with pytest.raises(KdLossInputError, match="KDBENCH_KERNEL"):
        kernels.backend_for(s)
    monkeypatch.setenv("KDBENCH_KERNEL", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not CUDA:
        with pytest.raises(KdLossInputError, match="TRITON_INTERPRET=1"):
            kd_loss(s, torch.randn(2, 8))


def test_package_kd_loss_stays_the_dispatcher():
    """Importing the backends leaves the package's kd_loss the dispatcher; each backend's kd_loss is its own."""
    kernel_module = importlib.import_module("kdbench.kernels.kd_loss_triton")
    from kdbench.kernels import kd_loss as again
    from kdbench.kernels.front import kd_loss as front_kd_loss

    assert again is kd_loss is front_kd_loss and kernel_module.kd_loss is not kd_loss
    assert reference.kd_loss is not kd_loss and inspect.signature(reference.kd_loss) == inspect.signature(kd_loss)


def test_import_is_light():
    """import kdbench.kernels pulls in neither triton nor the kernel module."""
    code = ("import sys, kdbench.kernels; "
            "print('triton' in sys.modules, 'kdbench.kernels.kd_loss_triton' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "KDBENCH_KERNEL"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.parametrize("module, env", [
    ("kd_loss_split", {"KDBENCH_KERNEL": "split"}),
    ("kd_loss_split", {"KDBENCH_KERNEL": "triton", "KDBENCH_KERNEL_VARIANT": "split"}),
    ("kd_loss_persistent", {"KDBENCH_KERNEL": "persistent"}),
    ("kd_loss_persistent", {"KDBENCH_KERNEL": "triton", "KDBENCH_KERNEL_VARIANT": "new"}),
], ids=["split-KDBENCH_KERNEL", "split-KDBENCH_KERNEL_VARIANT", "persistent-KDBENCH_KERNEL",
        "persistent-KDBENCH_KERNEL_VARIANT"])
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the interpreter: -inf - -inf
def test_opt_in_kernels_selected_through_the_front(monkeypatch, module, env):
    """The opt-in kernels run through kernels/front.py: (B, L, V) logits, features, grad_output != 1."""
    check_through_front(monkeypatch, importlib.import_module(f"kdbench.kernels.{module}"), env)
