"""Archive search: index a folder of images once (``msa-index``), then find images by text (``msa-search``) with
global cosine candidates re-ranked by MSCMAT.

Example::

    from msa.search import Searcher, build_index

    build_index("msa-tiny", "scenes/", "scenes.index")
    searcher = Searcher("scenes.index")
    for hit in searcher.search(["many planes parked near a terminal"], top_k=5)[0]:
        print(hit.path, hit.score, hit.scale_scores)
"""

import importlib
from typing import Any

# Lazy, so that `python -m msa.search.index` (and torchrun) do not import the module twice.
_EXPORTS = {
    "Hit": "msa.search.query",
    "Searcher": "msa.search.query",
    "IndexReport": "msa.search.index",
    "IndexOptions": "msa.search.index",
    "build_index": "msa.search.index",
    "update_index": "msa.search.index",
    **{
        name: "msa.search.storage"
        for name in (
            "IndexCorruptError",
            "IndexFormatError",
            "IndexLockedError",
            "IndexMissingError",
            "ModelMismatchError",
            "SearchIndexError",
        )
    },
}

__all__ = [
    "Hit",
    "IndexCorruptError",
    "IndexFormatError",
    "IndexLockedError",
    "IndexMissingError",
    "IndexOptions",
    "IndexReport",
    "ModelMismatchError",
    "SearchIndexError",
    "Searcher",
    "build_index",
    "update_index",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'msa.search' has no attribute {name!r}")
