"""Datasets of remote-sensing image-text retrieval: annotation loaders, torch datasets, val carve-out, the
noisy-correspondence protocol and the leakage check."""

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
    ImageLoadError,
    build_augmentation,
    check_images,
    collate_pairs,
    load_image,
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
    "find_shared_images",
    "list_datasets",
    "load_annotations",
    "load_caption_csv",
    "load_image",
    "load_karpathy_json",
    "load_nwpu_json",
]
