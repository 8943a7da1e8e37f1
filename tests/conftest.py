"""Shared test fixtures. The official-b0 fixture is ground truth; missing it is a failure, never a skip."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
FIXTURE_DIR = PROJECT_ROOT.parent / "shared" / "fixtures" / "official-b0"


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    if not (FIXTURE_DIR / "ckpt" / "model.ckpt.index").is_file():
        pytest.fail(f"ground-truth fixture missing: {FIXTURE_DIR} (../shared must sit beside the project)")
    return FIXTURE_DIR


@pytest.fixture(scope="session")
def fixture_ckpt(fixture_dir: Path) -> Path:
    return fixture_dir / "ckpt"


@pytest.fixture(scope="session")
def oracle(fixture_dir: Path) -> dict[str, np.ndarray]:
    with np.load(fixture_dir / "oracle.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="session")
def endpoints(fixture_dir: Path) -> dict[str, np.ndarray]:
    with np.load(fixture_dir / "endpoints.npz") as data:
        return {k: data[k] for k in data.files}
