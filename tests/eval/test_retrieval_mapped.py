"""Retrieval beyond RAM: memory-mapped embeddings give exactly the in-RAM results.

The exact search reads an in-RAM tensor and a memory-mapped one through the same tiles, so
ranks and metrics must be equal bit for bit (no tolerance); the tiles' ranks are also checked
against ranks counted from the whole score matrix.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from evalkit import demo_eval_sets, tiny_run

from eval.cli import main
from eval.embedding_store import EmbeddingWriter, is_mapped, open_embeddings, release
from eval.exact_search import NO_HIT, exact_ranks


def mapped(tensor: torch.Tensor, path) -> torch.Tensor:
    writer = EmbeddingWriter(path, tensor.shape[1])
    writer.write(0, tensor)
    return open_embeddings(writer.close())


def reference_ranks(queries, gallery, pair_query, pair_gallery) -> torch.Tensor:
    """Counted from the whole (Q, G) score matrix, one query at a time."""
    scores = queries @ gallery.T
    ranks = []
    for query in range(len(queries)):
        positives = pair_gallery[pair_query == query]
        if len(positives) == 0:
            ranks.append(NO_HIT)
            continue
        negative = torch.ones(len(gallery), dtype=torch.bool)
        negative[positives] = False
        best = scores[query, positives].max()
        ranks.append(int((scores[query, negative] >= best).sum()))
    return torch.tensor(ranks)


@pytest.fixture(scope="module")
def embeddings():
    generator = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(600, 16, generator=generator), dim=1)
    images[500:550] = images[0:50]  # duplicated images: exact ties count against the model
    owners = torch.randint(0, 550, (1500,), generator=generator)
    texts = F.normalize(images[owners] + 0.6 * torch.randn(1500, 16, generator=generator), dim=1)
    return images, texts, owners  # images 550..599 have no caption


def test_writer_puts_rows_in_place_and_numpy_reads_the_file(tmp_path):
    rows = torch.randn(10, 4)
    writer = EmbeddingWriter(tmp_path / "e.npy", 4)
    writer.write_at(torch.tensor([7, 8, 9, 0, 1]), rows[[7, 8, 9, 0, 1]])
    writer.write_at(torch.tensor([4, 2, 3, 6, 5]), rows[[4, 2, 3, 6, 5]])
    path = writer.close()
    assert np.array_equal(np.load(path), rows.numpy())
    assert torch.equal(open_embeddings(path), rows)


def test_release_drops_pages_of_mapped_tensors_only(tmp_path):
    ram = torch.randn(5000, 64)
    disk = mapped(ram, tmp_path / "e.npy")
    assert is_mapped(disk) and is_mapped(disk[100:200]) and not is_mapped(ram)
    total = disk.sum()
    release(disk)
    release(ram)  # anonymous memory: MADV_DONTNEED would zero it, so release must skip it
    assert torch.equal(disk, ram) and disk.sum() == total


def test_unreadable_embedding_file_names_it(tmp_path):
    bad = tmp_path / "bad.npy"
    bad.write_bytes(b"not numpy")
    with pytest.raises(ValueError, match="bad.npy"):
        open_embeddings(bad)


@pytest.mark.parametrize("chunk_size, block_size", [(0, 0), (64, 100), (1000, 37), (7, 600)])
def test_mapped_ranks_equal_in_ram_ranks_and_the_whole_matrix(
    embeddings, tmp_path, chunk_size, block_size
):
    images, texts, owners = embeddings
    captions = torch.arange(len(texts))
    disk_images, disk_texts = mapped(images, tmp_path / "i.npy"), mapped(texts, tmp_path / "t.npy")
    for queries, gallery, disk_queries, disk_gallery, pairs in (
        (texts, images, disk_texts, disk_images, (captions, owners)),
        (images, texts, disk_images, disk_texts, (owners, captions)),
    ):
        in_ram = exact_ranks(queries, gallery, pairs, chunk_size, block_size)
        on_disk = exact_ranks(disk_queries, disk_gallery, pairs, chunk_size, block_size)
        assert torch.equal(on_disk, in_ram)
        assert torch.equal(in_ram, reference_ranks(queries, gallery, *pairs))


def peak_rss_kib() -> int:
    status = Path("/proc/self/status").read_text().splitlines()
    return int(next(line for line in status if line.startswith("VmHWM:")).split()[1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc")
def test_mapped_search_peak_memory_is_a_tile_not_the_gallery(tmp_path):
    """A 200k x 256 gallery (195 MiB) searched with 16 MiB blocks stays far below its size."""
    generator = torch.Generator().manual_seed(1)
    writer = EmbeddingWriter(tmp_path / "g.npy", 256)
    for start in range(0, 200_000, 20_000):
        writer.write(start, F.normalize(torch.randn(20_000, 256, generator=generator), dim=1))
    gallery = open_embeddings(writer.close())
    queries = gallery[:256].clone()
    positives = (torch.arange(256), torch.arange(256))
    release(gallery)
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    before = peak_rss_kib()
    ranks = exact_ranks(queries, gallery, positives, block_size=16384)
    grown_mib = (peak_rss_kib() - before) / 1024
    assert ranks.tolist() == [0] * 256
    assert grown_mib < 100  # block and tile: 16 MiB each; the gallery would be 195 MiB


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return tiny_run(tmp_path_factory), demo_eval_sets(tmp_path_factory)


def test_vlp_eval_with_embeddings_dir_equals_in_ram(inputs, capsys, tmp_path):
    run_dir, eval_dir = inputs
    results = {}
    for name, extra in (("ram", []), ("mapped", ["--embeddings-dir", tmp_path / "emb"])):
        output = tmp_path / f"{name}.json"
        args = ["--checkpoint", run_dir, "--dataset", eval_dir / "retrieval", "--output", output,
                "--workers", 0, "--retrieval-method", "exact", *extra]  # fmt: skip
        assert main([str(a) for a in args]) == 0, capsys.readouterr().err
        results[name] = json.loads(output.read_text())
    assert results["mapped"]["metrics"] == results["ram"]["metrics"]
    images = np.load(tmp_path / "emb" / "retrieval_images.npy", mmap_mode="r")
    texts = np.load(tmp_path / "emb" / "retrieval_texts.npy", mmap_mode="r")
    details = results["mapped"]["details"]
    assert images.shape[0] == details["num_images"] and texts.shape[0] == details["num_captions"]


def test_unwritable_embeddings_dir_is_a_usage_error(inputs, capsys, tmp_path):
    run_dir, eval_dir = inputs
    blocker = tmp_path / "file"
    blocker.write_text("")
    code = main(["--checkpoint", str(run_dir), "--dataset", str(eval_dir / "retrieval"),
                 "--embeddings-dir", str(blocker / "sub")])  # fmt: skip
    assert code == 2 and "--embeddings-dir" in capsys.readouterr().err
