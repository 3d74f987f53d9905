"""Reading images as the models see them: 8-bit RGB, whatever the file's bit depth, band layout or size.

Remote-sensing archives ship 16-bit and float TIFFs, grayscale, palette, RGBA and CMYK files and scenes larger than
PIL's decompression-bomb limit. :func:`load_image` is the one loader used by training, evaluation and search:

- High-bit-depth single-band images (``I;16*``, ``I``, ``F``) are stretched linearly from their own minimum/maximum
  to 0..255 (a plain ``convert("RGB")`` clips them, so 16-bit imagery loads as a white image). Non-finite values map
  to 0, a constant image to 0.
- Palette images with transparency go through RGBA; alpha is dropped (the colour values are kept as stored).
- Scenes above ``PIL.Image.MAX_IMAGE_PIXELS`` (where PIL starts warning of a decompression bomb) but within PIL's hard
  limit (twice that) are reduced on load by the smallest integer factor that brings them under it; JPEGs are reduced
  by the decoder, so the full-size pixels are never held. Above the hard limit the image is refused with an
  :class:`ImageLoadError` naming the file (counted as a bad image with ``skip_bad``); raise
  ``PIL.Image.MAX_IMAGE_PIXELS`` to load such scenes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)


class ImageLoadError(OSError):
    """An image file is missing or cannot be decoded (the message names the file)."""


def _read_errors() -> tuple[type[BaseException], ...]:
    # DecompressionBombError is not an OSError: without it here a too-large scene escapes every skip_bad handler.
    return (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a PIL image of any mode to 8-bit RGB (see the module docstring for the rules)."""
    mode = image.mode
    if mode == "F" or mode == "I" or mode.startswith("I;"):
        return _stretch_to_8bit(np.asarray(image)).convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def _stretch_to_8bit(values: np.ndarray) -> Image.Image:
    values = values.astype(np.float64)
    finite = np.isfinite(values)
    out = np.zeros(values.shape, dtype=np.uint8)
    if finite.any():
        low, high = values[finite].min(), values[finite].max()
        if high > low:
            scaled = (values[finite] - low) * (255.0 / (high - low))
            out[finite] = np.rint(scaled).astype(np.uint8)
    return Image.fromarray(out, "L")


def _reduction_factor(size: tuple[int, int], limit: int | None) -> int:
    """The smallest integer factor that brings ``size`` under ``limit`` pixels (1 when it already is)."""
    pixels = size[0] * size[1]
    if not limit or pixels <= limit:
        return 1
    factor = math.isqrt(pixels // limit)
    while math.ceil(size[0] / factor) * math.ceil(size[1] / factor) > limit:
        factor += 1
    return max(factor, 2)


@contextlib.contextmanager
def _bomb_warning_answered() -> Iterator[None]:
    """Silence PIL's warning between MAX_IMAGE_PIXELS and the hard limit: the caller reduces such images on load.

    The warning fires while decoding too (TIFF), so the whole load runs inside. ``catch_warnings`` swaps the
    process-wide filters: loads in several threads at once may leave this one filter installed, which only hides a
    warning this module answers anyway (DataLoader workers are processes and unaffected).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


def load_image(path: str | Path) -> Image.Image:
    """Open an image file (JPEG, PNG, TIFF, ...) as 8-bit RGB, reducing scenes above PIL's pixel limit.

    Raises:
        ImageLoadError: the file is missing, cannot be decoded, or is above PIL's hard decompression-bomb limit;
            the message names the file.
    """
    try:
        with _bomb_warning_answered(), Image.open(path) as image:
            limit = Image.MAX_IMAGE_PIXELS
            factor = _reduction_factor(image.size, limit)
            if factor > 1:
                original = image.size
                # JPEG decodes at 1/2, 1/4 or 1/8 scale directly (no-op for other formats).
                image.draft(image.mode, (original[0] // factor, original[1] // factor))
                rgb = to_rgb(image)
                rgb = rgb.reduce(_reduction_factor(rgb.size, limit))
                logger.info("%s: %dx%d scene reduced to %dx%d on load", path, *original, *rgb.size)
                return rgb
            return to_rgb(image)
    except _read_errors() as error:
        raise ImageLoadError(f"cannot read image {path}: {error}") from error


def image_header_problem(path: str | Path) -> str | None:
    """A cheap check that reads only the file header: why the file cannot be an image we can load, or ``None``.

    Finds missing files, non-image files, unsupported formats and scenes above PIL's hard pixel limit; a file
    truncated after its header passes (only a full decode finds that, see :func:`image_decode_problem`).
    """
    if not Path(path).is_file():
        return "missing file"
    try:
        with _bomb_warning_answered(), Image.open(path) as image:
            if image.width < 1 or image.height < 1:
                return f"empty image ({image.width}x{image.height})"
    except _read_errors() as error:
        return str(error) or type(error).__name__
    return None


def image_decode_problem(path: str | Path) -> str | None:
    """Decode the whole image as :func:`load_image` does: why it fails, or ``None``."""
    if not Path(path).is_file():
        return "missing file"
    try:
        load_image(path)
    except ImageLoadError as error:
        return str(error.__cause__ or error)
    return None


def find_bad_images(
    paths: Iterable[str | Path], decode: bool = False, progress: Callable | None = None
) -> dict[Path, str]:
    """Check image files; a file listed several times is checked once.

    Args:
        paths: the image files.
        decode: fully decode each image (finds truncated and corrupt pixel data; slow on big datasets); without it
            only the header is read (:func:`image_header_problem`).
        progress: optional iterable wrapper (e.g. ``tqdm``), called as ``progress(distinct_paths, total=count)``.

    Returns:
        ``{path: reason}`` for every bad file, in the order given.
    """
    distinct = list(dict.fromkeys(Path(p) for p in paths))
    check = image_decode_problem if decode else image_header_problem
    iterator: Iterable[Path] = progress(distinct, total=len(distinct)) if progress is not None else distinct
    bad: dict[Path, str] = {}
    for path in iterator:
        problem = check(path)
        if problem is not None:
            bad[path] = problem
    return bad
