"""k-means for ProtoCLIP episodes: vlp's torch Lloyd on a GPU against faiss-cpu (the peer).

    python bench/kmeans_gpu.py            # on a GPU machine (faiss-cpu carried as a wheel)

From the same initial centroids, 20 Lloyd iterations of both on clustered unit vectors in 128
dimensions (E = 50,000, K = 2,000, two noise levels): objective (sum of squared distances) and
time, also with TF32 matmuls; then the reference recipe's size, E = 200,000 and K = 20,000: the
time of 20 GPU iterations (two chunk sizes, peak memory) and of 2 faiss-cpu iterations, whose
objectives are compared. Writes bench/results/kmeans_gpu.json.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from _common import RESULTS, git_state, machine_info, write_results

from vlp.prototypes import lloyd


def clustered(rows: int, dim: int, centers: int, noise: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    means = torch.randn(centers, dim, generator=generator)
    which = torch.randint(0, centers, (rows,), generator=generator)
    return F.normalize(means[which] + noise * torch.randn(rows, dim, generator=generator), dim=1)


def faiss_run(x: torch.Tensor, init: torch.Tensor, iters: int) -> dict[str, Any]:
    """faiss.Kmeans as vlp.prototypes.kmeans configures it, from the given centroids."""
    import faiss

    model = faiss.Kmeans(
        x.shape[1],
        init.shape[0],
        niter=iters,
        max_points_per_centroid=x.shape[0],
        min_points_per_centroid=1,
    )
    started = time.perf_counter()
    model.train(x.numpy(), init_centroids=init.numpy())
    seconds = time.perf_counter() - started
    distances, _ = model.assign(x.numpy())
    splits = sum(stat["nsplit"] for stat in model.iteration_stats)
    return {
        "objective": float(distances.sum(dtype=np.float64)),
        "seconds": round(seconds, 3),
        "empty_cluster_splits": splits,
    }


def gpu_run(x: torch.Tensor, init: torch.Tensor, iters: int, **options) -> dict[str, Any]:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = lloyd(x.cuda(), init.shape[0], iters, init.cuda(), **options)
    torch.cuda.synchronize()
    return {
        "objective": result.objective,
        "seconds": round(time.perf_counter() - started, 3),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
    }


def first_rows(x: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    return x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:count]].clone()


def agreement(rows: int, k: int, noise: float) -> dict[str, Any]:
    x = clustered(rows, 128, 5_000, noise, seed=0)
    init = first_rows(x, k, seed=1)
    peer = faiss_run(x, init, 20)
    gpu_run(x, init, 1)  # warm-up
    ours = gpu_run(x, init, 20)
    torch.set_float32_matmul_precision("high")
    tf32 = gpu_run(x, init, 20)
    torch.set_float32_matmul_precision("highest")
    relative = (ours["objective"] - peer["objective"]) / peer["objective"]
    tf32_relative = (tf32["objective"] - peer["objective"]) / peer["objective"]
    return {
        "rows": rows, "clusters": k, "noise": noise, "iterations": 20, "faiss_cpu": peer,
        "torch_lloyd": ours, "torch_lloyd_tf32": tf32, "objective_relative_difference": relative,
        "tf32_objective_relative_difference": tf32_relative,
        "speedup": round(peer["seconds"] / ours["seconds"], 1),
    }  # fmt: skip


def full_scale() -> dict[str, Any]:
    x = clustered(200_000, 128, 20_000, 0.5, seed=2)
    init = first_rows(x, 20_000, seed=3)
    runs = {f"chunk_{c}": gpu_run(x, init, 20, chunk_size=c) for c in (4096, 16384)}
    peer, ours = faiss_run(x, init, 2), gpu_run(x, init, 2)
    return {
        "rows": 200_000, "clusters": 20_000, "torch_lloyd_20_iterations": runs,
        "faiss_cpu_2_iterations": peer, "torch_lloyd_2_iterations": ours,
        "objective_relative_difference_2_iterations":
            (ours["objective"] - peer["objective"]) / peer["objective"],
        "faiss_cpu_seconds_per_iteration": round(peer["seconds"] / 2, 2),
    }  # fmt: skip


def main() -> int:
    import faiss

    payload = {
        "benchmark": "kmeans_gpu",
        "command": "bench/kmeans_gpu.py",
        "git": git_state(),
        "machine": {
            **machine_info(),
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "faiss": faiss.__version__,
            "faiss_threads": faiss.omp_get_max_threads(),
        },
        "agreement": [agreement(50_000, 2_000, noise) for noise in (0.5, 2.0)],
        "full_scale": full_scale(),
    }
    for run in payload["agreement"]:
        print(
            f"E={run['rows']} K={run['clusters']} noise {run['noise']}: faiss-cpu "
            f"{run['faiss_cpu']['seconds']} s, torch Lloyd {run['torch_lloyd']['seconds']} s, "
            f"objective {run['objective_relative_difference']:+.1e} relative"
        )
    scale = payload["full_scale"]
    print(
        f"E=200k K=20k: 20 GPU iterations {scale['torch_lloyd_20_iterations']['chunk_4096']} ; "
        f"faiss-cpu {scale['faiss_cpu_seconds_per_iteration']} s per iteration"
    )
    path = write_results(RESULTS / "kmeans_gpu.json", payload)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
