"""Embeddings on disk: `.npy` files written a batch at a time and read back memory-mapped.

A set whose embeddings exceed RAM streams them here (`vlp-eval --embeddings-dir`): the writer
puts each batch's rows at their final positions, so nothing of size N × D is ever held in
memory, and `open_embeddings` maps the finished file as an (N, D) float32 tensor that every
evaluator reads like an in-RAM one. File-backed pages a reader touched still count towards the
process's resident memory, so a reader that scans the file (eval.exact_search) hands each block's
pages back with `release` once it is done with them; the kernel's page cache keeps them.

The files are plain `.npy` (`numpy.load(path, mmap_mode="r")` opens them), float32, rows in the
set's order.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import weakref
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

DTYPE = np.dtype("<f4")
PAGE = mmap.PAGESIZE
_MAPPED: weakref.WeakValueDictionary[int, np.ndarray] = weakref.WeakValueDictionary()
"""Start address → array of every live mapping open_embeddings made; `release` drops pages
only inside these (on anonymous memory MADV_DONTNEED would zero the data)."""


def _header(rows: int, dim: int) -> bytes:
    header = {"descr": DTYPE.str, "fortran_order": False, "shape": (rows, dim)}
    buffer = _Buffer()
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.data


class _Buffer:
    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data


class EmbeddingWriter:
    """Writes an (N, dim) float32 `.npy` file row block by row block, in any order.

    N need not be known in advance: rows land at `offset + row × row_bytes`, and `close`
    writes the header for the rows seen. numpy pads `.npy` headers so that the shape can grow
    in place, so the header's length does not depend on N (checked on close).
    """

    def __init__(self, path: Path, dim: int) -> None:
        self.path, self.dim = path, dim
        self.row_bytes = dim * DTYPE.itemsize
        path.parent.mkdir(parents=True, exist_ok=True)
        self._header_bytes = len(_header(0, dim))
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self.num_rows = 0

    def write(self, start: int, rows: Tensor) -> None:
        """Rows start, start + 1, ... of the file; rows is (B, dim)."""
        data = np.ascontiguousarray(rows.detach().cpu().numpy(), dtype=DTYPE)
        if data.ndim != 2 or data.shape[1] != self.dim:
            raise ValueError(f"{self.path}: rows of shape {data.shape}, expected (B, {self.dim})")
        os.pwrite(self._fd, data.tobytes(), self._header_bytes + start * self.row_bytes)
        self.num_rows = max(self.num_rows, start + len(data))

    def write_at(self, positions: Tensor, rows: Tensor) -> None:
        """Row positions[i] := rows[i]; consecutive positions are written as one block."""
        order = positions.argsort()
        positions, rows = positions[order], rows[order]
        breaks = (positions.diff() != 1).nonzero().flatten().add(1).tolist()
        for run_start, run_end in zip([0, *breaks], [*breaks, len(positions)], strict=True):
            self.write(int(positions[run_start]), rows[run_start:run_end])

    def close(self) -> Path:
        """Write the header for num_rows rows; the file is complete once this returns."""
        header = _header(self.num_rows, self.dim)
        if len(header) != self._header_bytes:
            raise RuntimeError(f"{self.path}: .npy header grew from {self._header_bytes} bytes")
        os.pwrite(self._fd, header, 0)
        os.ftruncate(self._fd, self._header_bytes + self.num_rows * self.row_bytes)
        os.close(self._fd)
        return self.path


def open_embeddings(path: Path) -> Tensor:
    """(N, D) float32 tensor backed by the file (copy-on-write: writes never reach it)."""
    try:
        array = np.load(path, mmap_mode="c")
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: not a readable .npy embedding file ({error})") from error
    if array.ndim != 2 or array.dtype != DTYPE:
        raise ValueError(f"{path}: expected (N, D) float32 rows, found {array.dtype} {array.shape}")
    tensor = torch.from_numpy(array)
    if array.size:
        _MAPPED[tensor.data_ptr()] = array
    return tensor


def is_mapped(tensor: Tensor) -> bool:
    """Whether tensor's memory lies inside a file mapping made by open_embeddings."""
    return _mapping_of(tensor) is not None


def _mapping_of(tensor: Tensor) -> tuple[int, int] | None:
    address = tensor.data_ptr()
    for start, array in list(_MAPPED.items()):
        if start <= address < start + array.nbytes:
            return start, array.nbytes
    return None


def release(tensor: Tensor) -> None:
    """Hand the resident pages under a contiguous mapped tensor back to the page cache.

    Only whole pages inside the tensor's bytes are dropped (neighbouring rows keep theirs);
    the data stays valid and is read from the file again if touched. No-op for in-RAM tensors.
    """
    mapping = _mapping_of(tensor)
    if mapping is None or not tensor.is_contiguous() or tensor.numel() == 0:
        return
    begin = tensor.data_ptr()
    end = min(begin + tensor.numel() * tensor.element_size(), sum(mapping))
    first, last = -(-begin // PAGE) * PAGE, end // PAGE * PAGE
    if last > first:
        _madvise(first, last - first)


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return libc


def _madvise(address: int, length: int) -> None:
    if _libc().madvise(ctypes.c_void_p(address), ctypes.c_size_t(length), mmap.MADV_DONTNEED):
        raise OSError(ctypes.get_errno(), "madvise(MADV_DONTNEED) failed")
