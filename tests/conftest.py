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


#: Test files that load the machine (floods, restarts under load): under pytest-xdist (``make test`` runs two
#: workers) they share one group, so no two of them run at once. The several-node lab's tests (marked ``alone``)
#: run after the parallel part, with the machine to themselves.
HEAVY = frozenset({"test_attacks_e2e.py", "test_restart_e2e.py"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Each test file is one unit of work for pytest-xdist's ``--dist loadgroup`` (its module fixtures, a lab
    among them, are made once), and the heavy files are one unit together."""
    for item in items:
        name = item.path.name
        item.add_marker(pytest.mark.xdist_group("heavy" if name in HEAVY else str(item.path)))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``shared/data`` beside the checkout (CI clones with ``shared/`` next to the clone); skip if absent."""
    path = _REPO.parent / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"shared test data not found at {path} (expected beside the checkout)")
    return path
