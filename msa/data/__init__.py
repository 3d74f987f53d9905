"""Datasets of remote-sensing image-text retrieval: annotation loaders, torch datasets, val carve-out, the
noisy-correspondence protocol, the image loader and checks, and the leakage check."""

from msa.data.annotations import (
    DATASET_LAYOUTS,
    AnnotationError,
    Annotations,
    ImageRecord,
    RetrievalSplit,
    add_caption_noise,
    carve_val,
    list_datasets,
    load_annotations,
    load_caption_csv,
    load_karpathy_json,
    load_nwpu_json,
)
from msa.data.datasets import (
    AUGMENTATIONS,
    CaptionPairDataset,
    EpochSampler,
    ImageDataset,
    build_augmentation,
    check_images,
    collate_pairs,
)
from msa.data.images import (
    ImageLoadError,
    find_bad_images,
    image_decode_problem,
    image_header_problem,
    load_image,
    to_rgb,
)
from msa.data.leakage import LeakageReport, file_sha256, find_shared_images

__all__ = [
    "AUGMENTATIONS",
    "DATASET_LAYOUTS",
    "AnnotationError",
    "Annotations",
    "CaptionPairDataset",
    "EpochSampler",
    "ImageDataset",
    "ImageLoadError",
    "ImageRecord",
    "LeakageReport",
    "RetrievalSplit",
    "add_caption_noise",
    "build_augmentation",
    "carve_val",
    "check_images",
    "collate_pairs",
    "file_sha256",
    "find_bad_images",
    "find_shared_images",
    "image_decode_problem",
    "image_header_problem",
    "list_datasets",
    "load_annotations",
    "load_caption_csv",
    "load_image",
    "load_karpathy_json",
    "load_nwpu_json",
    "to_rgb",
]
