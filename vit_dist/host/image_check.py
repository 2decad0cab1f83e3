"""Finds the image files MindSpore's decoder would fail on, from their headers and ends, in parallel.

A full decode of every image would take hours on ImageNet; the header (format, size) and the end
marker catch what ends real epochs: empty files, files that are not images, formats the decoder
lacks, and truncated JPEG/PNG downloads.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

# PIL's names for what MindSpore's Decode reads (MPO: a camera JPEG with extra pictures appended).
DECODABLE_FORMATS = {"JPEG", "MPO", "PNG", "BMP", "TIFF"}
# How far from the end the end-of-image marker may sit: some cameras append a few bytes after it.
END_MARKER_WINDOW = 4096
END_MARKERS = {"JPEG": b"\xff\xd9", "MPO": b"\xff\xd9", "PNG": b"IEND"}


def problem(path: Path) -> str | None:
    """Why the decoder would fail on this file, or None if it looks whole."""
    try:
        size = path.stat().st_size
        if size == 0:
            return "empty file"
        with Image.open(path) as image:
            image_format, (width, height) = image.format, image.size
    except Image.DecompressionBombError as err:
        return f"too large to decode safely ({err})"
    except Image.UnidentifiedImageError:
        return "not an image"
    except OSError as err:  # a header cut short, or the file could not be read at all
        return f"corrupt or truncated header ({err.strerror or err})"
    if image_format not in DECODABLE_FORMATS:
        return f"{image_format} image, which MindSpore's decoder does not read; convert it to JPEG or PNG"
    if width == 0 or height == 0:
        return f"zero-size image ({width}x{height})"
    marker = END_MARKERS.get(image_format)
    if marker and marker not in _tail(path, size):
        return f"truncated {image_format} (no end-of-image marker)"
    return None


def _tail(path: Path, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(max(0, size - END_MARKER_WINDOW))
        return f.read()


def find_problems(paths: list[Path], workers: int | None = None) -> dict[int, str]:
    """{index in paths: reason} for every file the decoder would fail on. Threads, not processes:
    the work is file reads, during which PIL releases the GIL."""
    workers = workers or min(32, 4 * (os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        reasons = pool.map(problem, paths)
        return {index: reason for index, reason in enumerate(reasons) if reason is not None}
