"""Fixtures shared by several test files."""
from pathlib import Path

import pytest

SHARED_ISIC2017 = Path(__file__).resolve().parents[2] / "shared" / "data" / "isic2017"


@pytest.fixture(scope="session")
def isic2017_prepared(tmp_path_factory):
    """The shared ISIC 2017 copy prepared once per session with split_7_3.csv (about a minute)."""
    if not (SHARED_ISIC2017 / "split_7_3.csv").exists():
        pytest.skip(f"real ISIC 2017 data not found at {SHARED_ISIC2017}")
    from scsonet.data import prepare_dataset

    out = tmp_path_factory.mktemp("isic2017") / "prepared"
    prepare_dataset("isic2017", SHARED_ISIC2017, out, split_file=SHARED_ISIC2017 / "split_7_3.csv", progress=False)
    return out
