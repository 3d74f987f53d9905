"""Archive search: index a folder of images once (``msa-index``), then find images by text (``msa-search``) with
global cosine candidates re-ranked by MSCMAT.

Example::

    from msa.search import Searcher, build_index

    build_index("msa-tiny", "scenes/", "scenes.index")
    searcher = Searcher("scenes.index")
    for hit in searcher.search(["many planes parked near a terminal"], top_k=5)[0]:
        print(hit.path, hit.score, hit.scale_scores)
"""

from msa.search.index import IndexReport, build_index, update_index
from msa.search.query import Hit, Searcher
from msa.search.storage import (
    IndexCorruptError,
    IndexFormatError,
    IndexLockedError,
    IndexMissingError,
    ModelMismatchError,
    SearchIndexError,
)

__all__ = [
    "Hit",
    "IndexCorruptError",
    "IndexFormatError",
    "IndexLockedError",
    "IndexMissingError",
    "IndexReport",
    "ModelMismatchError",
    "SearchIndexError",
    "Searcher",
    "build_index",
    "update_index",
]
