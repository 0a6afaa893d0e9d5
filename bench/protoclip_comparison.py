"""Linear probe and clustering quality of one run: the score command of studies/protoclip.yaml.

    python bench/protoclip_comparison.py RUN_DIR OUTPUT.json [--eval zeroshot] [--seed S]

The comparison itself (CLIP against ProtoCLIP without back translation, with it, and with the
MiniLM teacher; demo shapes and Fashion-MNIST; three seeds) is the study studies/protoclip.yaml,
run by `vlp-study` (`make studies`). vlp-study calls this once per finished run: on the run's
labelled eval set (its config's `eval.<--eval>.dataset`) and its latest checkpoint it writes
{"metrics": {"linear_probe": ..., "ami": ...}}:

- linear_probe: accuracy of a logistic regression on the image embeddings, trained on a
  stratified half of the set and tested on the other half (split seeded by --seed);
- ami: adjusted mutual information between the labels and a k-means of the image embeddings
  into as many clusters as classes (seeded by --seed).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from eval.checkpoints import resolve_checkpoint
from eval.datasets import open_eval_set
from eval.models import load_model
from eval.options import EvalOptions
from eval.zero_shot import run_zeroshot_classification


def score(run_dir: Path, eval_dir: Path, seed: int) -> dict[str, float]:
    from sklearn.cluster import KMeans
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import adjusted_mutual_info_score
    from sklearn.model_selection import train_test_split

    model = load_model(resolve_checkpoint(run_dir), device="cpu")
    dataset = open_eval_set(eval_dir)
    outputs = run_zeroshot_classification(model, dataset, EvalOptions(workers=0))
    x, y = outputs.images.embeddings.numpy(), outputs.labels.numpy()
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.5, stratify=y, random_state=seed
    )
    probe = LogisticRegression(max_iter=2000).fit(x_train, y_train)
    clusters = KMeans(len(dataset.classnames), n_init=10, random_state=seed).fit_predict(x)
    return {
        "linear_probe": float(probe.score(x_test, y_test)),
        "ami": float(adjusted_mutual_info_score(y, clusters)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--eval", default="zeroshot", help="the run's evaluator whose set to use")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    config = yaml.safe_load((args.run_dir / "config.yaml").read_text())
    eval_dir = Path(config["eval"][args.eval]["dataset"])
    metrics = score(args.run_dir, eval_dir, args.seed)
    payload = {"dataset": str(eval_dir), "task": "linear_probe_and_clustering", "metrics": metrics}
    args.output.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"{args.run_dir}: {metrics}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
