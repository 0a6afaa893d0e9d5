"""Rows of a CSV/TSV/JSONL/parquet table that point at local image files.

Cells are kept as read (bytes where the file may not be valid UTF-8) so that a bad row is
skipped and counted at its own index instead of failing the whole table.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

from data_tools.errors import UsageError
from data_tools.sample import BadSample, RawSample, Reason, long_captions
from data_tools.sources import Source

TABLE_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".parquet": "parquet"}
_MALFORMED = object()
"""Placeholder for a row that could not be parsed; reading it raises BadSample."""


def read_table(path: Path, columns: list[str]) -> tuple[list[str], dict[str, list[Any]]]:
    """Return (all column names, {column: values}) for the requested columns."""
    if not path.is_file():
        raise UsageError(f"{path}: no such table file")
    kind = TABLE_FORMATS.get(path.suffix.lower())
    if kind is None:
        known = ", ".join(TABLE_FORMATS)
        raise UsageError(f"{path}: unknown table format {path.suffix!r} (expected one of {known})")
    reader = {"csv": _read_delimited, "tsv": _read_delimited, "jsonl": _read_jsonl}.get(
        kind, _read_parquet
    )
    return reader(path, columns)


def check_columns(path: Path, available: list[str], wanted: list[str]) -> None:
    missing = [c for c in wanted if c not in available]
    if missing:
        raise UsageError(
            f"{path}: no column {', '.join(map(repr, missing))}; "
            f"columns are: {', '.join(available)}"
        )


def _read_delimited(path: Path, columns: list[str]):
    csv.field_size_limit(sys.maxsize)
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    # surrogateescape keeps undecodable bytes so the caption check can report them per row
    with path.open(newline="", encoding="utf-8", errors="surrogateescape") as handle:
        rows = csv.reader(handle, delimiter=delimiter)
        header = next(rows, None)
        if header is None:
            raise UsageError(f"{path}: the table is empty (no header row)")
        check_columns(path, header, columns)
        positions = [header.index(c) for c in columns]
        values: dict[str, list[Any]] = {c: [] for c in columns}
        for row in rows:
            if not row:
                continue
            for column, position in zip(columns, positions, strict=True):
                cell = row[position] if len(row) == len(header) else _MALFORMED
                values[column].append(cell)
    return header, values


def _read_jsonl(path: Path, columns: list[str]):
    values: dict[str, list[Any]] = {c: [] for c in columns}
    seen: set[str] = set()
    with path.open("rb") as handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                # surrogateescape keeps undecodable bytes for the per-row caption check
                row = json.loads(line.decode("utf-8", "surrogateescape"))
                if not isinstance(row, dict):
                    raise ValueError("not an object")
                seen.update(row)
            except ValueError:
                row = {c: _MALFORMED for c in columns}
            for column in columns:
                values[column].append(row.get(column))
    if columns and not any(len(v) for v in values.values()):
        raise UsageError(f"{path}: the table has no rows")
    check_columns(path, sorted(seen), columns)
    return sorted(seen), values


def _read_parquet(path: Path, columns: list[str]):
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)  # not pq.read_table: that imports pandas (0.4 s start-up)
    names = parquet.schema_arrow.names
    check_columns(path, names, columns)
    table = parquet.read(columns=columns)
    return names, {c: table.column(c).to_pylist() for c in columns}


class TableSource(Source):
    """One item per table row: an image path (relative to `root`) and a caption.

    `long_cols` name columns of long captions (a string or a list of strings per cell); their
    non-empty captions go, in column order, to the `.json` sidecar's `long` list.
    """

    def __init__(
        self,
        path: Path,
        image_col: str,
        caption_col: str,
        root: Path | None = None,
        long_cols: list[str] | tuple[str, ...] = (),
    ):
        self.path = path
        self.image_col, self.caption_col = image_col, caption_col
        self.long_cols = list(long_cols)
        self.root = root if root is not None else path.parent
        _, values = read_table(path, [image_col, caption_col, *self.long_cols])
        self.images, self.captions = values[image_col], values[caption_col]
        self.long = list(zip(*(values[c] for c in self.long_cols), strict=True))
        _reject_urls(path, image_col, self.images)

    def __len__(self) -> int:
        return len(self.images)

    def read(self, index: int) -> RawSample:
        image, caption = self.images[index], self.captions[index]
        if image is _MALFORMED or caption is _MALFORMED:
            raise BadSample(Reason.MALFORMED_ROW, "row could not be parsed")
        meta: dict[str, Any] = {"row": index}
        if self.long_cols:
            meta["long"] = long_captions(list(self.long[index]))
        return RawSample(image=self.image_path(image), caption=caption, meta=meta)

    def image_path(self, cell: Any) -> Path | None:
        if cell is None or cell == "":
            return None
        if isinstance(cell, bytes):
            cell = cell.decode("utf-8", "surrogateescape")
        cell = str(cell).removeprefix("file://")
        return self.root / cell

    def locate(self, index: int) -> str:
        return f"{self.path.name} row {index + 1}"

    def describe(self) -> dict[str, Any]:
        return {
            "type": "table",
            "path": str(self.path.resolve()),
            "image_col": self.image_col,
            "caption_col": self.caption_col,
            "root": str(self.root.resolve()),
            **({"long_caption_cols": self.long_cols} if self.long_cols else {}),
        }


def _reject_urls(path: Path, column: str, cells: list[Any]) -> None:
    first = next((c for c in cells if isinstance(c, str)), "")
    if first.startswith(("http://", "https://", "s3://", "gs://")):
        raise UsageError(
            f"{path}: column {column!r} holds URLs ({first[:60]}); vlp-shard reads local files: "
            "download them with img2dataset, then run `vlp-shard reshard` on its output"
        )
