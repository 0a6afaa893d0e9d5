"""Every source turns its input into the same kind of training shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_tools.sources.reshard import ReshardSource
from tests.conftest import make_image, tar_members


def _images(root: Path, count: int) -> list[str]:
    return [
        make_image(root / "img" / f"{i}.jpg", seed=i).relative_to(root).as_posix()
        for i in range(count)
    ]


def _train_samples(out: Path) -> dict[str, dict[str, bytes]]:
    """{key: {extension: bytes}} across all training shards."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted((out / "train").glob("*.tar")):
        for name, data in tar_members(shard).items():
            key, ext = name.split(".", 1)
            samples.setdefault(key, {})[ext] = data
    return samples


def _write_table(path: Path, rows: list[dict]) -> None:
    suffix = path.suffix
    if suffix in (".csv", ".tsv"):
        sep = "\t" if suffix == ".tsv" else ","
        lines = [sep.join(rows[0])] + [sep.join(str(v) for v in r.values()) for r in rows]
        path.write_text("\n".join(lines) + "\n")
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_table_formats(tmp_path, cli, suffix):
    paths = _images(tmp_path, 5)
    rows = [{"file": p, "text": f"photo number {i}", "extra": i} for i, p in enumerate(paths)]
    table = tmp_path / f"captions{suffix}"
    _write_table(table, rows)
    code, out, _ = cli(
        "table",
        table,
        tmp_path / "out",
        "--image-col",
        "file",
        "--caption-col",
        "text",
        "--image-size",
        "32",
    )
    assert code == 0, out
    samples = _train_samples(tmp_path / "out")
    assert len(samples) == 5
    first = samples["000000000"]
    assert first["txt"] == b"photo number 0"
    meta = json.loads(first["json"])
    assert (
        meta["row"] == 0
        and meta["original_width"] == 96
        and min(meta["width"], meta["height"]) == 32
    )
    sizes = json.loads((tmp_path / "out" / "train" / "sizes.json").read_text())
    assert sizes == {"00000.tar": 5}


def test_table_root_and_file_urls(tmp_path, cli):
    paths = _images(tmp_path / "data", 2)
    table = tmp_path / "t.csv"
    table.write_text("url,caption\n" + "".join(f"file://{p},c{i}\n" for i, p in enumerate(paths)))
    code, out, _ = cli(
        "table",
        table,
        tmp_path / "out",
        "--image-col",
        "url",
        "--caption-col",
        "caption",
        "--root",
        tmp_path / "data",
    )
    assert code == 0 and len(_train_samples(tmp_path / "out")) == 2


def test_folder_source_keeps_json(tmp_path, cli):
    root = tmp_path / "photos"
    for i in range(3):
        make_image(root / "sub" / f"p{i}.png", seed=i)
        (root / "sub" / f"p{i}.txt").write_text(f"  caption {i}\n")
    (root / "sub" / "p1.json").write_text(json.dumps({"long": ["A long caption. Two."]}))
    code, out, _ = cli("folder", root, tmp_path / "out", "--format", "png", "--image-size", "32")
    assert code == 0, out
    samples = _train_samples(tmp_path / "out")
    assert [s["txt"] for s in samples.values()] == [b"caption 0", b"caption 1", b"caption 2"]
    assert all("png" in s for s in samples.values())
    meta = json.loads(samples["000000001"]["json"])
    assert meta["long"] == ["A long caption. Two."] and meta["path"] == "sub/p1.png"


@pytest.mark.parametrize("saved", ["save_to_disk", "parquet"])
def test_hf_source(tmp_path, cli, saved):
    import datasets

    images = [make_image(tmp_path / f"{i}.jpg", seed=i).read_bytes() for i in range(4)]
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    data = datasets.Dataset.from_dict(
        {
            "image": [{"bytes": b, "path": None} for b in images],
            "caption": [f"hf caption {i}" for i in range(4)],
        },
        features=features,
    )
    path = tmp_path / "ds"
    if saved == "save_to_disk":
        datasets.DatasetDict({"train": data}).save_to_disk(str(path))
    else:
        path.mkdir()
        data.to_parquet(str(path / "part-0.parquet"))
    code, out, err = cli(
        "hf",
        path,
        tmp_path / "out",
        "--image-col",
        "image",
        "--caption-col",
        "caption",
        "--image-size",
        "32",
    )
    assert code == 0, err
    samples = _train_samples(tmp_path / "out")
    assert [s["txt"] for s in samples.values()] == [f"hf caption {i}".encode() for i in range(4)]


def _img2dataset_like(directory: Path, count: int, per_shard: int) -> str:
    """Shards as img2dataset writes them: key.jpg, key.txt, key.json with url/key metadata."""
    import webdataset as wds

    from tests.conftest import image_bytes

    directory.mkdir(parents=True)
    for shard in range(-(-count // per_shard)):
        with wds.TarWriter(str(directory / f"{shard:05d}.tar"), encoder=False) as tar:
            for i in range(shard * per_shard, min(count, (shard + 1) * per_shard)):
                key = f"{shard:05d}{i:04d}"
                meta = {"url": f"http://x/{i}.jpg", "key": key, "status": "success"}
                tar.write(
                    {
                        "__key__": key,
                        "jpg": image_bytes(seed=i, width=80),
                        "txt": f"web caption {i}".encode(),
                        "json": json.dumps(meta).encode(),
                    }
                )
    return f"{directory}/{{00000..{shard:05d}}}.tar"


def test_reshard_keeps_metadata_and_resizes(tmp_path, cli):
    pattern = _img2dataset_like(tmp_path / "in", 7, 3)
    code, out, err = cli(
        "reshard",
        pattern,
        tmp_path / "out",
        "--image-size",
        "24",
        "--resize-mode",
        "center_crop",
        "--format",
        "webp",
    )
    assert code == 0, err
    samples = _train_samples(tmp_path / "out")
    assert len(samples) == 7
    meta = json.loads(samples["000000004"]["json"])
    assert meta["url"] == "http://x/4.jpg" and meta["source_key"] == "000010004"
    assert (meta["width"], meta["height"]) == (24, 24)
    assert samples["000000004"]["txt"] == b"web caption 4"


def test_reshard_index_flags_truncated_and_missing_shards(tmp_path):
    pattern = _img2dataset_like(tmp_path / "in", 6, 3)
    shard = tmp_path / "in" / "00001.tar"
    shard.write_bytes(shard.read_bytes()[:2500])  # cuts the first sample's image
    source = ReshardSource(pattern.replace("00001}", "00002}"))
    reasons = []
    for i in range(len(source)):
        try:
            source.read(i)
        except Exception as bad:
            reasons.append(bad.reason.value)
    assert reasons == ["truncated_tar", "missing_file"]
    assert len(source) == 3 + 1 + 1
