"""Shared test fixtures."""

from __future__ import annotations

import pytest
from synthetic_data import SyntheticDataset, write_synthetic_dataset

# --- Synthetic datasets (see tests/synthetic_data.py) ---------------------------------------------------------------


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory):
    """Factory: ``synthetic_dataset(layout="karpathy", num_images=10, captions_per_image=5, seed=0)`` writes (once per
    session and argument set) a synthetic dataset and returns its :class:`synthetic_data.SyntheticDataset`.

    The files are shared by every test asking for the same arguments: read them, never modify them (copy the folder
    with ``shutil.copytree`` first, or call ``synthetic_data.write_synthetic_dataset`` into ``tmp_path``).
    """
    cache: dict[tuple, SyntheticDataset] = {}

    def make(layout: str = "karpathy", num_images: int = 10, captions_per_image: int = 5, seed: int = 0):
        key = (layout, num_images, captions_per_image, seed)
        if key not in cache:
            root = tmp_path_factory.mktemp(f"synthetic_{layout}")
            cache[key] = write_synthetic_dataset(root, layout, num_images, captions_per_image, seed)
        return cache[key]

    return make
