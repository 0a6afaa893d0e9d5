"""Retrieval set of studies/gap.yaml: held-out Fashion-MNIST mosaics, each with its caption.

    python bench/gap_study.py SHARDS_DIR OUT      (the last prepare command of studies/gap.yaml)

The gap study itself (CLIP vs CUA vs CUAXU at embedding dims 32/64/128 on the demo shapes and
Fashion-MNIST mosaics, three seeds) is studies/gap.yaml, run by `vlp-study` (`make studies`).
Fashion-MNIST has no captioned test split, so the study's retrieval and geometry metrics use
mosaics drawn with another seed (new combinations of training-split items): this writes the
shards in SHARDS_DIR as a clip_benchmark retrieval set in OUT (images with their training
captions). A complete OUT is left as it is.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vlp.data.format import DATASET_TYPE_FILE  # noqa: E402


def build_retrieval_set(shards: Path, out: Path) -> None:
    images = out.parent / f"{out.name}-images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for tar_path in sorted(shards.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name in sorted(n for n in members if n.endswith(".jpg")):
                key = name.removesuffix(".jpg")
                (images / name).write_bytes(tar.extractfile(members[name]).read())
                caption = tar.extractfile(members[key + ".txt"]).read().decode()
                rows.append({"image": name, "caption": caption})
    table = out.parent / f"{out.name}.csv"
    with table.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["image", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    command = [sys.executable, "-m", "data_tools", "eval-set", "retrieval", str(out),
               "--table", str(table), "--root", str(images), "--image-col", "image",
               "--caption-col", "caption"]  # fmt: skip
    subprocess.run(command, cwd=REPO, check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shards", type=Path, help="folder of the held-out training shards")
    parser.add_argument("out", type=Path, help="the retrieval set to write")
    args = parser.parse_args()
    if (args.out / DATASET_TYPE_FILE).is_file():
        print(f"{args.out}: complete")
        return 0
    build_retrieval_set(args.shards, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
