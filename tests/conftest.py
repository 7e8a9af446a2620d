"""Shared fixtures: where the real datasets live, and quiet TensorFlow logs."""

import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _shared_data_dir() -> pathlib.Path:
    """Real data sits beside the checkout (`../shared/data`) unless TFMIR_DATA_DIR says otherwise."""
    override = os.environ.get("TFMIR_DATA_DIR")
    if override:
        return pathlib.Path(override)
    return REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data_dir() -> pathlib.Path:
    path = _shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"real data folder not found: {path} (set TFMIR_DATA_DIR)")
    return path
