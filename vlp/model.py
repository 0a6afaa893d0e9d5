"""Models: open_clip towers built from registered model configs."""

from __future__ import annotations

from pathlib import Path

import open_clip

MODEL_CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "models"
"""vlp's own open_clip model configs; every JSON dropped here is available by name."""

_registered: set[Path] = set()


def register_model_configs(*directories: Path) -> list[str]:
    """Register vlp's model configs (and any extra directories) with open_clip; return all names."""
    for directory in (MODEL_CONFIG_DIR, *map(Path, directories)):
        if directory.resolve() not in _registered:
            open_clip.add_model_config(directory)
            _registered.add(directory.resolve())
    return open_clip.list_models()
