"""The fake suite of fake_results, written to a results folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from fake_results import fake_runs, write_suite


@pytest.fixture
def suite_dir(tmp_path) -> Path:
    return write_suite(tmp_path / "toy-suite", fake_runs())
