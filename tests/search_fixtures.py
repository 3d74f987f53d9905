"""Image folders for the archive-search tests: synthetic images in every mode and format the index must take, and
files it must skip."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image

# shared/data next to the checkout (or next to the folder of worktrees holding it).
_CANDIDATES = [Path(__file__).resolve().parents[up] / "shared" / "data" / "rs_mini" for up in (2, 3)]
REAL_IMAGES = next((path for path in _CANDIDATES if path.is_dir()), _CANDIDATES[0])
# Messages name no machine path: the test suite runs on checkouts without the shared data.
NO_REAL_IMAGES = "the rs_mini real images (shared/data/rs_mini next to the checkout) are not available"


def pattern(seed: int, size: tuple[int, int] = (48, 40)) -> np.ndarray:
    """A smooth random RGB picture [H, W, 3] uint8 (distinct per seed)."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, size=(4, 4, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(low).resize(size, Image.BILINEAR))


def make_synthetic_folder(root: Path, count: int = 12) -> dict[str, list[str]]:
    """Write good images of several formats and modes (nested folders, upper-case extensions) and bad files.

    Returns:
        ``{"good": relative paths, "bad": relative paths, "ignored": relative paths}``.
    """
    root.mkdir(parents=True, exist_ok=True)
    formats = [("jpg", "RGB"), ("png", "L"), ("png", "RGBA"), ("png", "P"), ("bmp", "RGB"), ("webp", "RGB")]
    good = []
    for index in range(count):
        extension, mode = formats[index % len(formats)]
        folder = root / ("nested/deeper" if index % 3 == 0 else "flat")
        folder.mkdir(parents=True, exist_ok=True)
        name = f"scene_{index:03d}.{extension.upper() if index % 4 == 1 else extension}"
        Image.fromarray(pattern(index)).convert(mode).save(folder / name)
        good.append((folder / name).relative_to(root).as_posix())
    sixteen_bit = (pattern(99)[..., 0].astype(np.uint16) * 257).astype(np.uint16)
    Image.fromarray(sixteen_bit).save(root / "flat" / "sixteen_bit.tif")
    good.append("flat/sixteen_bit.tif")
    Image.fromarray(pattern(98, (900, 700))).save(root / "flat" / "large.jpeg")
    good.append("flat/large.jpeg")

    (root / "bad").mkdir()
    (root / "bad" / "empty.png").write_bytes(b"")
    (root / "bad" / "not_an_image.jpg").write_text("this is text, not a JPEG\n")
    Image.fromarray(pattern(97)).save(root / "bad" / "truncated_source.jpg")
    data = (root / "bad" / "truncated_source.jpg").read_bytes()
    (root / "bad" / "truncated_source.jpg").unlink()
    (root / "bad" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "notes.txt").write_text("not an image extension: ignored\n")
    return {
        "good": sorted(good),
        "bad": ["bad/empty.png", "bad/not_an_image.jpg", "bad/truncated.jpg"],
        "ignored": ["notes.txt"],
    }


def copy_real_images(root: Path) -> list[str]:
    """Copy the rs_mini images (TIFF and JPEG) into ``root``; their relative paths."""
    copied = []
    for path in sorted(REAL_IMAGES.glob("*/images/*")):
        target = root / path.relative_to(REAL_IMAGES)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
        copied.append(target.relative_to(root).as_posix())
    return copied
