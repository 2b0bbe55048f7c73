import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data" / "drone-1500x1000"

from demo import make_demo_dataset  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own cache folder and no dataset root from the environment."""
    monkeypatch.setenv("DRONE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("DRONE_DATA_ROOT", raising=False)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """A small synthetic dataset (12 pairs, 96×64) in the Kaggle archive layout; read-only use."""
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), n=12, size=(96, 64), seed=1,
                             mask_form="both", split_counts=(8, 2, 2))


@pytest.fixture
def fresh_demo(tmp_path) -> Path:
    """A demo dataset a test may damage."""
    return make_demo_dataset(tmp_path / "data", n=6, size=(48, 32), seed=2, split_counts=(4, 1, 1))


def real_data_or_skip() -> Path:
    if not (SHARED / "dataset" / "semantic_drone_dataset" / "original_images").is_dir():
        pytest.skip(f"real dataset copy not found at {SHARED}")
    return SHARED
