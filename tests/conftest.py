"""Shared pytest fixtures."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_REPO = Path(__file__).resolve().parents[1]

# Tests run against the sources even when the package is not installed in the environment (`make` installs it
# editable; a bare venv does not).
try:
    import mplslb  # noqa: F401
except ImportError:
    sys.path.insert(0, str(_REPO / "src"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``shared/data`` beside the checkout (CI clones with ``shared/`` next to the clone); skip if absent."""
    path = _REPO.parent / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"shared test data not found at {path} (expected beside the checkout)")
    return path
