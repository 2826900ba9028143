"""Peak memory of streaming from shards: embed 1,000,000 cells, train one epoch on 200,000 of them.

Writes a synthetic sharded data set (sparse CSR counts, ~1,000 expressed genes per cell out of
20,000, 100 shards of 10,000 cells, about 8 GB), then runs each measurement in a fresh process and
reports its peak resident memory (``ru_maxrss``) and time:

- ``embed``: ``get_latent_representation`` of the first 100,000, 300,000 and all 1,000,000 cells
  (cells/s should not fall with the number of cells: time linear in cells);
- ``train``: one epoch of ``train`` on the first 200,000 cells (20 shards).

The model is small (``--d-model 32 --n-layers 1 --max-length 128`` by default) because the
question is whether the data path keeps memory bounded, not how fast a large model runs here.

    python benchmarks/memory.py --workdir /tmp/sct_memory          # writes the shards once
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

N_GENES = 20_000
CELLS_PER_SHARD = 10_000


def distinct_counts(draws: np.ndarray, rng: np.random.Generator, n_genes: int):
    """Cells x genes counts (CSR) from each cell's sorted gene draws, repeats dropped; values geometric."""
    import scipy.sparse as sp

    keep = np.ones_like(draws, dtype=bool)
    keep[:, 1:] = draws[:, 1:] != draws[:, :-1]
    indices = draws[keep]
    indptr = np.concatenate([[0], np.cumsum(keep.sum(1))]).astype(np.int64)
    data = rng.geometric(0.4, size=indices.size).astype(np.float32)
    return sp.csr_matrix((data, indices, indptr), shape=(len(draws), n_genes))


def write_shards(workdir: Path, n_shards: int, expressed: int, seed: int = 0) -> list[Path]:
    """Synthetic count shards (reused when present)."""
    import anndata as ad
    import pandas as pd

    workdir.mkdir(parents=True, exist_ok=True)
    genes = pd.Index([f"gene_{i:05d}" for i in range(N_GENES)])
    paths = []
    for shard in range(n_shards):
        path = workdir / f"atlas_{shard:03d}.h5ad"
        paths.append(path)
        if path.exists():
            continue
        rng = np.random.default_rng([seed, shard])
        n = CELLS_PER_SHARD
        # ~expressed distinct genes per cell, drawn with a skew so that some genes are common
        draws = (N_GENES * rng.power(0.5, size=(n, int(expressed * 1.1)))).astype(np.int32)
        draws.sort(axis=1)
        counts = distinct_counts(draws, rng, N_GENES)
        obs = pd.DataFrame(
            {"cell_type": pd.Categorical(rng.choice([f"type_{i}" for i in range(8)], size=n))},
            index=[f"cell_{shard}_{i}" for i in range(n)],
        )
        ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(path)
        print(f"wrote {path.name}: {counts.nnz / n:.0f} expressed genes per cell", flush=True)
    return paths


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def run_phase(args: argparse.Namespace) -> dict:
    """One measurement, in this (fresh) process."""
    import torch

    import sctransformer as sct

    torch.set_num_threads(args.threads)
    paths = sorted(Path(args.workdir).glob("atlas_*.h5ad"))
    hyper = {"d_model": args.d_model, "n_layers": args.n_layers, "n_heads": 2, "max_length": args.max_length}
    if args.phase == "embed":
        n_shards = args.cells // CELLS_PER_SHARD
        data = sct.data.ShardedAnnData(paths[:n_shards], phenotype_keys=["cell_type"])
        model = sct.GeneTransformer.from_shards(data, **hyper, seed=0)
        start = time.perf_counter()
        embedding = model.get_latent_representation(data, batch_size=256)
        seconds = time.perf_counter() - start
        assert embedding.shape == (data.n_obs, args.d_model) and np.isfinite(embedding).all()
    else:
        data = sct.data.ShardedAnnData(paths[: args.cells // CELLS_PER_SHARD], phenotype_keys=["cell_type"])
        model = sct.GeneTransformer.from_shards(data, **hyper, seed=0)
        start = time.perf_counter()
        model.train(
            max_epochs=1,
            batch_size=64,
            train_size=0.99,
            calibrate=False,
            enable_progress_bar=False,
            logger=None,
        )
        seconds = time.perf_counter() - start
    return {
        "phase": args.phase,
        "cells": data.n_obs,
        "seconds": round(seconds, 1),
        "cells_per_s": round(data.n_obs / seconds, 1),
        "peak_rss_gib": round(_peak_rss_gib(), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", default="/tmp/sct_memory")
    parser.add_argument("--shards", type=int, default=100)
    parser.add_argument("--expressed", type=int, default=1000)
    parser.add_argument(
        "--embed-cells",
        type=int,
        nargs="+",
        default=[100_000, 300_000, 1_000_000],
        help="multiples of 10,000",
    )
    parser.add_argument("--train-cells", type=int, default=200_000, help="a multiple of 10,000")
    parser.add_argument("--d-model", type=int, default=32)
    parser.add_argument("--n-layers", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--phase", choices=["embed", "train"], help=argparse.SUPPRESS)
    parser.add_argument("--cells", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(run_phase(args)))
        return
    for n in [*args.embed_cells, args.train_cells]:  # whole shards of CELLS_PER_SHARD cells each
        if n <= 0 or n % CELLS_PER_SHARD or n > args.shards * CELLS_PER_SHARD:
            parser.error(
                f"cell counts must be multiples of {CELLS_PER_SHARD:,} (the cells of a shard) up to "
                f"--shards x {CELLS_PER_SHARD:,} = {args.shards * CELLS_PER_SHARD:,}, got {n:,}"
            )

    start = time.perf_counter()
    write_shards(Path(args.workdir), args.shards, args.expressed)
    print(f"shards ready in {time.perf_counter() - start:.0f} s", flush=True)
    common = [
        "--workdir", args.workdir, "--d-model", str(args.d_model), "--n-layers", str(args.n_layers),
        "--max-length", str(args.max_length), "--threads", str(args.threads),
    ]  # fmt: skip
    runs = [("embed", n) for n in args.embed_cells] + [("train", args.train_cells)]
    rows = []
    for phase, cells in runs:
        out = subprocess.run(
            [sys.executable, __file__, *common, "--phase", phase, "--cells", str(cells)],
            capture_output=True,
            text=True,
        )
        if out.returncode != 0:
            raise SystemExit(out.stderr[-3000:])
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)

    print(f"\nmachine: {platform.machine()}, {args.threads} torch threads; model d_model={args.d_model}, "
          f"{args.n_layers} layer(s), max_length={args.max_length}; {N_GENES} genes, ~{args.expressed} "
          "expressed per cell")  # fmt: skip
    print(f"{'run':<8}{'cells':>11}{'seconds':>10}{'cells/s':>10}{'peak RSS GiB':>14}")
    for row in rows:
        print(
            f"{row['phase']:<8}{row['cells']:>11,}{row['seconds']:>10.1f}{row['cells_per_s']:>10.1f}"
            f"{row['peak_rss_gib']:>14.2f}"
        )


if __name__ == "__main__":
    main()
