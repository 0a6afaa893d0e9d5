"""A folder of images with same-stem caption files: `a/cat.jpg` + `a/cat.txt` (+ `a/cat.json`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from data_tools.errors import UsageError
from data_tools.sample import BadSample, RawSample, Reason
from data_tools.sources import Source

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def find_images(root: Path) -> list[Path]:
    """Image files under `root`, recursively, in a stable (sorted) order."""
    if not root.is_dir():
        raise UsageError(f"{root}: no such directory")
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        suffixes = " ".join(sorted(IMAGE_SUFFIXES))
        raise UsageError(f"{root}: no image files found (looked for {suffixes})")
    return images


class FolderSource(Source):
    """One item per image; its caption is the same-stem `.txt`, its metadata the `.json`."""

    def __init__(self, root: Path):
        self.root = root
        self.images = find_images(root)

    def __len__(self) -> int:
        return len(self.images)

    def read(self, index: int) -> RawSample:
        image = self.images[index]
        caption_file = image.with_suffix(".txt")
        caption = caption_file.read_bytes() if caption_file.is_file() else None
        meta: dict[str, Any] = {}
        json_file = image.with_suffix(".json")
        if json_file.is_file():
            try:
                meta = json.loads(json_file.read_bytes())
            except ValueError as err:
                raise BadSample(Reason.MALFORMED_ROW, f"{json_file.name}: {err}") from None
            if not isinstance(meta, dict):
                raise BadSample(Reason.MALFORMED_ROW, f"{json_file.name}: not a JSON object")
        meta["path"] = self.images[index].relative_to(self.root).as_posix()
        return RawSample(image=image, caption=caption, meta=meta)

    def locate(self, index: int) -> str:
        return str(self.images[index])

    def describe(self) -> dict[str, Any]:
        return {"type": "folder", "path": str(self.root.resolve())}
