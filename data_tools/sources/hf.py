"""A Hugging Face `datasets` dataset saved with `save_to_disk`, or parquet files, via `datasets`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from data_tools.errors import UsageError
from data_tools.sample import RawSample, long_captions
from data_tools.sources import Source


def load_hf(path: Path, split: str | None):
    """Load a saved Dataset/DatasetDict directory, a parquet file, or a folder of parquet files."""
    import datasets

    if not path.exists():
        raise UsageError(f"{path}: no such dataset file or directory")
    datasets.disable_progress_bars()
    if path.is_dir() and not list(path.glob("*.parquet")):
        try:
            loaded = datasets.load_from_disk(str(path))
        except FileNotFoundError:
            raise UsageError(
                f"{path}: not a dataset saved with save_to_disk and holds no parquet files"
            ) from None
    else:
        files = sorted(map(str, path.glob("*.parquet"))) if path.is_dir() else [str(path)]
        loaded = datasets.load_dataset("parquet", data_files=files, split="train")
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if split is None and len(splits) == 1:
            split = splits[0]
        if split not in loaded:
            raise UsageError(f"{path}: choose a split with --split ({', '.join(splits)})")
        loaded = loaded[split]
    return loaded


class HfSource(Source):
    """One item per row; image columns may be `Image` features, raw bytes or file paths.

    `long_cols`: columns of long captions (a string or a list of strings per row), stored in
    column order as the `.json` sidecar's `long` list.
    """

    def __init__(
        self,
        path: Path,
        image_col: str,
        caption_col: str,
        split: str | None = None,
        long_cols: list[str] | tuple[str, ...] = (),
    ):
        import datasets

        self.path, self.split = path, split
        self.image_col, self.caption_col = image_col, caption_col
        self.long_cols = list(long_cols)
        dataset = load_hf(path, split)
        wanted = [image_col, caption_col, *self.long_cols]
        missing = [c for c in wanted if c not in dataset.column_names]
        if missing:
            raise UsageError(
                f"{path}: no column {', '.join(map(repr, missing))}; "
                f"columns are: {', '.join(dataset.column_names)}"
            )
        if isinstance(dataset.features[image_col], datasets.Image):
            # keep the encoded bytes: decoding happens once, in our validated path
            dataset = dataset.cast_column(image_col, datasets.Image(decode=False))
        self.dataset = dataset.select_columns(list(dict.fromkeys(wanted)))

    def __len__(self) -> int:
        return len(self.dataset)

    def read(self, index: int) -> RawSample:
        row = self.dataset[index]
        caption = row[self.caption_col]
        meta: dict[str, Any] = {"row": index}
        if isinstance(caption, list):
            meta["captions"] = caption
            caption = caption[0] if caption else None
        if self.long_cols:
            meta["long"] = long_captions([row[c] for c in self.long_cols])
        return RawSample(image=self._image(row[self.image_col]), caption=caption, meta=meta)

    def _image(self, cell: Any):
        if isinstance(cell, dict):  # an Image feature: {"bytes": ..., "path": ...}
            if cell.get("bytes") is not None:
                return cell["bytes"]
            cell = cell.get("path")
        if cell is None or isinstance(cell, bytes):
            return cell
        path = Path(cell)
        base = self.path if self.path.is_dir() else self.path.parent
        return path if path.is_absolute() else base / path

    def locate(self, index: int) -> str:
        return f"{self.path} row {index}"

    def describe(self) -> dict[str, Any]:
        return {
            "type": "hf",
            "path": str(self.path.resolve()),
            "split": self.split,
            "image_col": self.image_col,
            "caption_col": self.caption_col,
            **({"long_caption_cols": self.long_cols} if self.long_cols else {}),
        }
