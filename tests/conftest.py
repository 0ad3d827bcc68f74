"""Shared fixtures: paths to the read-only reference data in ../shared/data, and the gpu marker."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"reference data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def svs_path(shared_data) -> Path:
    return shared_data / "slides" / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="session")
def qptiff_path(shared_data) -> Path:
    return shared_data / "slides" / "vectra-multiplex-if.qptiff"


@pytest.fixture(scope="session")
def dicom_path(shared_data) -> Path:
    return shared_data / "slides" / "sparse-tiled-wsi.dcm"


@pytest.fixture(scope="session")
def real_glomeruli(shared_data) -> Path:
    return shared_data / "real-glomeruli"


@pytest.fixture(scope="session")
def dataset_root(tmp_path_factory) -> Path:
    """A tiny annotated glomeruli dataset (tests/glomeruli_dataset.py: 3 cases x 2 stains)."""
    from glomeruli_dataset import make_dataset

    root = tmp_path_factory.mktemp("glomeruli")
    make_dataset(root)
    return root
