"""Image size figures, as the container tests (tests/image) record them; the benchmarks never build an image."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tests.support.models import ROOT

# Written by tests/image at the end of their session: sizes in bytes under these keys.
RESULTS = ROOT / "bench" / "results" / "image.json"
IMAGE, BASE, INSTALLED = "image_bytes", "base_image_bytes", "requirements_installed_bytes"
NOT_MEASURED = "not measured (run the container tests)"


@dataclass(frozen=True)
class ImageSizes:
    image: int | None
    over_base: int | None
    installed: int | None


def read_sizes(path: Path = RESULTS) -> ImageSizes | None:
    """The sizes the container tests measured, or None when they have not run (or measured no size)."""
    if not path.is_file():
        return None
    figures = json.loads(path.read_text())
    image, base, installed = (figures.get(key) for key in (IMAGE, BASE, INSTALLED))
    if image is None:
        return None
    return ImageSizes(image, image - base if base is not None else None, installed)
