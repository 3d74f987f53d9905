"""PyTorch datasets over a :class:`~msa.data.annotations.RetrievalSplit`: caption rows for training, images and
captions apart for evaluation (each image is encoded once, whatever its number of captions)."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from msa.data.annotations import RetrievalSplit
from msa.data.images import ImageLoadError, find_bad_images, load_image

logger = logging.getLogger(__name__)

AUGMENTATIONS = ("flip", "vflip", "rot90", "rotate", "crop")


def check_images(
    split: RetrievalSplit, skip_bad: bool = False, decode: bool = False, progress: Callable | None = None
) -> RetrievalSplit:
    """Check every image of a split: its header (cheap), or with ``decode`` a full decode as training does.

    Args:
        skip_bad: drop bad images and their captions, counting them in ``split.skipped["bad_image"]`` (and their
            captions in ``"caption_of_bad_image"``) and logging their names; without it any bad image raises.
        decode: fully decode each image (slow on big datasets; the training CLI does it with ``--skip-bad``).
        progress: optional wrapper for the iteration (e.g. ``tqdm``), called as ``progress(paths, total=count)``.

    Returns:
        The split itself when nothing is bad, else a filtered copy with ``text_to_image`` re-indexed.

    Raises:
        ImageLoadError: without ``skip_bad``, when an image is bad; one line giving the count and the first files.
    """
    bad_files = find_bad_images(split.image_paths, decode=decode, progress=progress)
    if not bad_files:
        return split
    examples = "; ".join(f"{path}: {reason}" for path, reason in list(bad_files.items())[:3])
    if not skip_bad:
        raise ImageLoadError(
            f"{len(bad_files)} bad image(s) in {split.name} {split.split} ({examples}); "
            "pass skip_bad / --skip-bad to skip and count them"
        )
    logger.warning("%s %s: skipping %d bad image(s): %s", split.name, split.split, len(bad_files), examples)
    bad = {index for index, path in enumerate(split.image_paths) if Path(path) in bad_files}
    new_index: dict[int, int] = {}
    image_paths = []
    for index, path in enumerate(split.image_paths):
        if index not in bad:
            new_index[index] = len(image_paths)
            image_paths.append(path)
    kept = [t for t, image in enumerate(split.text_to_image) if image not in bad]
    skipped = dict(split.skipped)
    skipped["bad_image"] = skipped.get("bad_image", 0) + len(bad)
    skipped["caption_of_bad_image"] = skipped.get("caption_of_bad_image", 0) + len(split.captions) - len(kept)
    return replace(
        split,
        image_paths=image_paths,
        captions=[split.captions[t] for t in kept],
        text_to_image=[new_index[split.text_to_image[t]] for t in kept],
        skipped=skipped,
    )


def build_augmentation(names: Sequence[str]) -> Callable[[Image.Image], Image.Image] | None:
    """PIL-level train-time augmentations applied before the backbone's own preprocessing.

    The published MSA code trains without augmentation (the default, ``names=()``); the AMFMN family uses flips,
    rotations and crops: ``flip`` (horizontal), ``vflip``, ``rot90`` (a random multiple of 90 degrees, lossless for
    nadir imagery), ``rotate`` (uniform in [-90, 90] degrees), ``crop`` (random resized crop, 80-100% of the area,
    back to the input size).
    """
    from torchvision import transforms

    unknown = set(names) - set(AUGMENTATIONS)
    if unknown:
        raise ValueError(f"unknown augmentation(s) {sorted(unknown)}; choose from {AUGMENTATIONS}")
    steps: list[Callable] = []
    for name in names:
        if name == "flip":
            steps.append(transforms.RandomHorizontalFlip())
        elif name == "vflip":
            steps.append(transforms.RandomVerticalFlip())
        elif name == "rot90":
            steps.append(_RandomRot90())
        elif name == "rotate":
            steps.append(transforms.RandomRotation(90))
        elif name == "crop":
            steps.append(_RandomResizedCropSameSize())
    return transforms.Compose(steps) if steps else None


class _RandomRot90:
    def __call__(self, image: Image.Image) -> Image.Image:
        k = int(torch.randint(4, (1,)))
        return image if k == 0 else image.rotate(90 * k, expand=True)


class _RandomResizedCropSameSize:
    def __call__(self, image: Image.Image) -> Image.Image:
        from torchvision import transforms

        size = (image.height, image.width)
        return transforms.RandomResizedCrop(size, scale=(0.8, 1.0), ratio=(0.9, 1.1))(image)


class _SeededRNG:
    """Seed torch's and Python's global generators for one sample, restoring them afterwards.

    Augmentations draw from the global generators; seeding them from (seed, epoch, index) makes a sample's
    augmentation independent of the number of workers and of where a resumed run restarts.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __enter__(self) -> None:
        self.torch_state = torch.random.get_rng_state()
        self.python_state = random.getstate()
        torch.manual_seed(self.seed)
        random.seed(self.seed)

    def __exit__(self, *exc: Any) -> None:
        torch.random.set_rng_state(self.torch_state)
        random.setstate(self.python_state)


class CaptionPairDataset(torch.utils.data.Dataset):
    """Training pairs, one per caption row: ``(image [3, H, W], caption, image_index, row)``.

    Args:
        split: the split (possibly with noisy captions).
        transform: the backbone's preprocessing (``model.image_transform(train=True)``), PIL -> tensor.
        augmentation: optional PIL augmentation run before ``transform`` (see :func:`build_augmentation`).
        seed: the augmentation seed; call :meth:`set_epoch` each epoch.
    """

    def __init__(
        self,
        split: RetrievalSplit,
        transform: Callable[[Image.Image], torch.Tensor],
        augmentation: Callable[[Image.Image], Image.Image] | None = None,
        seed: int = 0,
    ) -> None:
        self.split = split
        self.transform = transform
        self.augmentation = augmentation
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.split.num_captions

    def __getitem__(self, row: int) -> tuple[torch.Tensor, str, int, int]:
        image_index = self.split.text_to_image[row]
        image = load_image(self.split.image_paths[image_index])
        with _SeededRNG(hash((self.seed, self.epoch, row)) & 0x7FFFFFFF):
            if self.augmentation is not None:
                image = self.augmentation(image)
            pixels = self.transform(image)
        return pixels, self.split.captions[row], image_index, row


def collate_pairs(batch: list[tuple[torch.Tensor, str, int, int]]) -> dict[str, Any]:
    """Stack a list of :class:`CaptionPairDataset` items: ``images`` [B, 3, H, W], ``captions`` (list of B str),
    ``image_ids`` [B] (captions of one image share an id), ``rows`` [B]."""
    images, captions, image_ids, rows = zip(*batch)
    return {
        "images": torch.stack(images),
        "captions": list(captions),
        "image_ids": torch.tensor(image_ids, dtype=torch.long),
        "rows": torch.tensor(rows, dtype=torch.long),
    }


class ImageDataset(torch.utils.data.Dataset):
    """The images of a split for evaluation: ``(image [3, H, W], index)``."""

    def __init__(self, image_paths: Sequence[str | Path], transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.image_paths = list(image_paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(load_image(self.image_paths[index])), index


class EpochSampler(torch.utils.data.Sampler[int]):
    """A seeded shuffle per epoch that can start mid-epoch, and shard across ranks.

    The permutation of epoch ``e`` depends only on ``(seed, e)``; rank ``r`` of ``world_size`` takes positions
    ``r, r + W, ...`` of it (padded by wrapping so every rank gets the same number of full batches). ``start_batch``
    skips batches already trained before an interruption, so a resumed run sees exactly the remaining ones.
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    def batches_per_epoch(self) -> int:
        per_rank = self.num_items // self.world_size if self.drop_last else -(-self.num_items // self.world_size)
        if self.drop_last:
            return per_rank // self.batch_size
        return -(-per_rank // self.batch_size)

    def _indices(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.num_items, generator=generator).tolist()
        else:
            order = list(range(self.num_items))
        if not self.drop_last and len(order) % self.world_size:
            order += order[: self.world_size - len(order) % self.world_size]
        order = order[self.rank :: self.world_size]
        batches = self.batches_per_epoch()
        return (
            order[self.start_batch * self.batch_size : batches * self.batch_size]
            if self.drop_last
            else order[self.start_batch * self.batch_size :]
        )

    def __iter__(self):
        return iter(self._indices())

    def __len__(self) -> int:
        return len(self._indices())
