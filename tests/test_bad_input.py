"""Bad samples are skipped and counted by reason; usage errors are one line with exit code 2."""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import make_image, run_cli

INJECTED = {
    "missing_file": 2,
    "empty_image": 1,
    "undecodable_image": 2,
    "truncated_image": 2,
    "decompression_bomb": 1,
    "empty_caption": 3,
    "non_utf8_caption": 2,
    "malformed_row": 1,
}


def _bad_table(root: Path, num_good: int = 20) -> Path:
    """A CSV with `num_good` good rows and the INJECTED bad ones interleaved."""
    img = root / "img"
    for i in range(num_good):
        make_image(img / f"g{i}.jpg", seed=i)
    whole = make_image(root / "big.jpg", 400, 300).read_bytes()
    (img / "empty.jpg").write_bytes(b"")
    (img / "text.jpg").write_bytes(b"this is not an image at all")
    (img / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    (img / "cut1.jpg").write_bytes(whole[: len(whole) // 2])
    (img / "cut2.jpg").write_bytes(whole[: len(whole) * 4 // 5])
    Image.new("L", (12000, 12000)).save(img / "bomb.png")  # 144 Mpx, a few hundred KB
    bad_rows = [
        b"img/nope1.jpg,missing",
        b"img/sub/nope2.jpg,missing",
        b"img/empty.jpg,empty file",
        b"img/text.jpg,text file",
        b"img/garbage.png,garbage png",
        b"img/cut1.jpg,cut",
        b"img/cut2.jpg,cut",
        b"img/bomb.png,bomb",
        b"img/g0.jpg,",
        b'img/g1.jpg,"   "',
        b'img/g2.jpg,"\t\n"',
        b"img/g3.jpg,caf\xe9",
        b"img/g4.jpg,\xff\xfe bad",
        b"img/g5.jpg,a,b,too many fields",
    ]
    rows = [f"img/g{i}.jpg,good caption {i}".encode() for i in range(num_good)]
    for i, row in enumerate(bad_rows):  # interleave so bad rows land in several shards
        rows.insert(3 * i + 1, row)
    table = root / "bad.csv"
    table.write_bytes(b"image,caption\n" + b"\n".join(rows) + b"\n")
    return table


def _stats_errors(directory: Path) -> Counter:
    total = Counter()
    for path in directory.glob("*_stats.json"):
        total.update(json.loads(path.read_text())["errors"])
    return total


def test_every_bad_kind_is_counted_in_stats_manifest_and_summary(tmp_path, cli):
    table = _bad_table(tmp_path)
    code, out, err = cli(
        "table",
        table,
        tmp_path / "out",
        "--image-col",
        "image",
        "--caption-col",
        "caption",
        "--samples-per-shard",
        "10",
        "--image-size",
        "32",
        "--workers",
        "2",
    )
    assert code == 0, err
    train = tmp_path / "out" / "train"
    expected = INJECTED
    assert dict(_stats_errors(train)) == expected
    manifest = json.loads((train / "manifest.json").read_text())
    assert manifest["errors"] == expected and manifest["samples"] == 20
    assert sum(json.loads((train / "sizes.json").read_text()).values()) == 20
    assert f"skipped {sum(expected.values())} bad items" in out
    for reason, count in expected.items():
        assert f"{reason} {count}" in out
    stats = [json.loads(p.read_text()) for p in train.glob("*_stats.json")]
    examples = [e for s in stats for e in s["examples"].get("missing_file", [])]
    assert any("nope1.jpg" in e and "bad.csv row" in e for e in examples)


def test_verify_reports_the_sharders_counts(tmp_path, cli):
    table = _bad_table(tmp_path, num_good=6)
    cli(
        "table",
        table,
        tmp_path / "raw",
        "--image-col",
        "image",
        "--caption-col",
        "caption",
        "--resize-mode",
        "none",
        "--samples-per-shard",
        "100",
    )
    pattern = str(tmp_path / "raw" / "train" / "00000.tar")
    code, out, _ = cli("verify", pattern)
    assert code == 0 and "6 good, 0 bad" in out
    # corrupt the shard set the way web data is corrupt, then compare both tools' counts
    from tests.test_sources import _img2dataset_like

    corrupt = _img2dataset_like(tmp_path / "web", 9, 3)
    first = tmp_path / "web" / "00000.tar"
    data = bytearray(first.read_bytes())
    start = data.index(b"\xff\xd8")  # the first JPEG: destroy its header
    data[start : start + 100] = b"x" * 100
    first.write_bytes(bytes(data))
    last = tmp_path / "web" / "00002.tar"
    with tarfile.open(last) as tar:
        end = max(m.offset_data + m.size for m in tar)
    last.write_bytes(last.read_bytes()[: end - 100])  # cut inside the last member
    code, out, _ = cli("verify", corrupt)
    assert code == 1
    verify_counts = {
        line.split()[0]: int(line.split()[1])
        for line in out.splitlines()[1:]
        if line.startswith("  ") and line.split()[1].isdigit()
    }
    code, _, _ = cli("reshard", corrupt, tmp_path / "re", "--image-size", "32")
    assert code == 0
    assert dict(_stats_errors(tmp_path / "re" / "train")) == verify_counts
    assert verify_counts.get("truncated_tar") == 1


def test_verify_flags_sizes_json_mismatch(tmp_path, cli):
    code, _, _ = cli(
        "demo",
        tmp_path,
        "--num-samples",
        30,
        "--eval-samples",
        5,
        "--image-size",
        32,
        "--samples-per-shard",
        10,
    )
    sizes = tmp_path / "train" / "sizes.json"
    sizes.write_text(json.dumps({"00000.tar": 10, "00001.tar": 11, "00002.tar": 10}))
    code, out, _ = cli("verify", str(tmp_path / "train" / "{00000..00002}.tar"))
    assert code == 1 and "00001.tar: sizes.json says 11 samples, found 10 good" in out


USAGE_ERRORS = [
    (
        ["table", "{tmp}/none.csv", "{tmp}/o", "--image-col", "a", "--caption-col", "b"],
        "none.csv: no such table file",
    ),
    (
        ["table", "{tmp}/t.csv", "{tmp}/o", "--image-col", "picture", "--caption-col", "caption"],
        "no column 'picture'; columns are: image, caption",
    ),
    (
        ["table", "{tmp}/urls.csv", "{tmp}/o", "--image-col", "image", "--caption-col", "caption"],
        "holds URLs",
    ),
    (
        [
            "table",
            "{tmp}/t.csv",
            "{tmp}/o",
            "--image-col",
            "image",
            "--caption-col",
            "caption",
            "--num-nodes",
            "2",
            "--node-rank",
            "2",
        ],
        "--node-rank 2 must be in [0, 2)",
    ),
    (["folder", "{tmp}/nothing", "{tmp}/o"], "nothing: no such directory"),
    (
        ["hf", "{tmp}/nothing", "{tmp}/o", "--image-col", "a", "--caption-col", "b"],
        "nothing: no such dataset",
    ),
    (["reshard", "{tmp}/in/{{0..3}}.tar", "{tmp}/o"], "no such shard files"),
    (["fashion-mnist", "{tmp}/o", "--idx-dir", "{tmp}"], "dataset-fashion-mnist"),
    (["eval-set", "classification", "{tmp}/o"], "needs either --folder or --table"),
    (["demo", "{tmp}/o", "--image-size", "4"], "--image-size 4 is too small"),
]


def test_missing_caption_in_jsonl(tmp_path, cli):
    make_image(tmp_path / "a.jpg")
    table = tmp_path / "t.jsonl"
    table.write_text(
        '{"image": "a.jpg", "caption": null}\n{"image": "a.jpg"}\n'
        '{"image": "a.jpg", "caption": "ok"}\nnot json\n'
    )
    code, out, _ = cli(
        "table", table, tmp_path / "o", "--image-col", "image", "--caption-col", "caption"
    )
    assert code == 0
    assert dict(_stats_errors(tmp_path / "o" / "train")) == {
        "missing_caption": 2,
        "malformed_row": 1,
    }


@pytest.mark.parametrize(("args", "message"), USAGE_ERRORS)
def test_usage_errors_are_one_line_exit_2(tmp_path, cli, args, message):
    make_image(tmp_path / "a.jpg")
    (tmp_path / "t.csv").write_text("image,caption\na.jpg,hello\n")
    (tmp_path / "urls.csv").write_text("image,caption\nhttps://example.com/a.jpg,hello\n")
    code, out, err = cli(*(a.format(tmp=tmp_path) for a in args))
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("vlp-shard: error: ") and message in err


def test_usage_error_in_a_fresh_process_has_no_traceback(tmp_path):
    result = run_cli(
        "table", tmp_path / "x.csv", tmp_path / "o", "--image-col", "a", "--caption-col", "b"
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"vlp-shard: error: {tmp_path}/x.csv: no such table file"
    ]
    result = run_cli("table", "--bogus")
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_numeric_labels_need_classnames_and_odd_cells_are_counted(tmp_path, cli):
    make_image(tmp_path / "a.jpg")
    (tmp_path / "labels.csv").write_text("path,label\na.jpg,2\na.jpg,10\n")
    code, _, err = cli(
        "eval-set",
        "classification",
        tmp_path / "o",
        "--table",
        tmp_path / "labels.csv",
        "--image-col",
        "path",
        "--label-col",
        "label",
    )
    assert code == 2 and "holds class indices; pass --classnames" in err
    (tmp_path / "t.jsonl").write_text(
        '{"image": "a.jpg", "caption": 123}\n{"image": "a.jpg", "caption": "fine"}\n'
    )
    code, out, _ = cli(
        "table",
        tmp_path / "t.jsonl",
        tmp_path / "o2",
        "--image-col",
        "image",
        "--caption-col",
        "caption",
    )
    assert code == 0 and "malformed_row 1" in out
    (tmp_path / "r.csv").write_text("image,a,b\na.jpg,hello,\n")
    code, out, _ = cli(
        "eval-set",
        "retrieval",
        tmp_path / "o3",
        "--table",
        tmp_path / "r.csv",
        "--image-col",
        "image",
        "--caption-col",
        "a",
        "--caption-col",
        "b",
    )
    assert code == 0 and "skipped" not in out
