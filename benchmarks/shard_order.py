"""Reading an epoch from many shards: all blocks shuffled together against shard by shard with a buffer.

Writes synthetic shards (sparse counts, ``--expressed`` genes per cell out of 20,000; cells stored
sorted by cell type, as many atlas files are), gzip-compressed as ``write_h5ad(compression="gzip")``
writes them and uncompressed, then reads one training epoch of minibatches exactly as training
does (:class:`~sctransformer.data.ShardBlockSampler` and :class:`~sctransformer.data.ShardBatches`)
for each order. Printed per order: seconds and cells/s of the epoch's reads, shard files opened,
distinct shards per minibatch, and the mean share of a minibatch's most common cell type (the cost
of reading shard by shard: 1/8 would be perfect mixing of the 8 types).

    python benchmarks/shard_order.py --workdir /tmp/sct_shard_order
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from importlib.metadata import version
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd

from sctransformer.data import ShardBatches, ShardBlockSampler, ShardedAnnData, _sharded, split_blocks

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import distinct_counts

N_GENES = 20_000
N_TYPES = 8


def write_shards(
    workdir: Path, n_shards: int, n_cells: int, expressed: int, compression: str | None
) -> list[Path]:
    """Synthetic shards whose cells are sorted by cell type (reused when present)."""
    folder = workdir / f"{n_shards}x{n_cells}_{expressed}genes_{compression or 'none'}"  # no stale reuse
    folder.mkdir(parents=True, exist_ok=True)
    genes = pd.Index([f"gene_{i:05d}" for i in range(N_GENES)])
    paths = []
    for shard in range(n_shards):
        path = folder / f"atlas_{shard:03d}.h5ad"
        paths.append(path)
        if path.exists():
            continue
        rng = np.random.default_rng([0, shard])
        columns = np.sort(rng.choice(N_GENES, size=(n_cells, expressed), replace=True), axis=1)
        counts = distinct_counts(columns, rng, N_GENES)
        cell_type = np.sort(rng.integers(0, N_TYPES, size=n_cells))  # stored sorted by type
        obs = pd.DataFrame(
            {"cell_type": pd.Categorical([f"type_{t}" for t in cell_type])},
            index=[f"s{shard}_c{i}" for i in range(n_cells)],
        )
        ad.AnnData(counts, obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(path, compression=compression)
    return paths


def read_epoch(data: ShardedAnnData, sampler: ShardBlockSampler) -> dict[str, float]:
    """Read one epoch of minibatches; count file opens, shards per minibatch and type purity."""
    opened = 0
    original = _sharded.h5py.File

    def counting_file(*args, **kwargs):
        nonlocal opened
        opened += 1
        return original(*args, **kwargs)

    codes = data.phenotype_codes["cell_type"]
    reader = ShardBatches(data)
    shards_per_batch, purity, n_cells = [], [], 0
    _sharded.h5py.File = counting_file
    try:
        start = time.perf_counter()
        for segments in sampler:
            batch = reader[segments]
            n_cells += batch["X"].shape[0]
            shards_per_batch.append(len({shard for shard, _, _ in segments}))
            types = codes[np.concatenate([data.offsets[s] + np.arange(a, b) for s, a, b in segments])]
            purity.append(np.bincount(types).max() / len(types))
        seconds = time.perf_counter() - start
    finally:
        _sharded.h5py.File = original
        data.close()
    return {
        "seconds": seconds,
        "cells/s": n_cells / seconds,
        "opened": opened,
        "shards/minibatch": float(np.mean(shards_per_batch)),
        "top type share": float(np.mean(purity)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/sct_shard_order"))
    parser.add_argument("--shards", type=int, default=40)
    parser.add_argument("--cells-per-shard", type=int, default=2_500)
    parser.add_argument("--expressed", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=8)
    parser.add_argument("--buffers", type=int, nargs="+", default=[1_024, 8_192])
    args = parser.parse_args()

    print(
        f"# {platform.processor() or platform.machine()}, h5py {h5py.__version__}, anndata {version('anndata')}"
    )
    print(
        f"# {args.shards} shards x {args.cells_per_shard:,} cells, ~{args.expressed} of {N_GENES:,} genes per cell, "
        f"cells sorted by cell type ({N_TYPES} types); minibatches of {args.batch_size}, blocks of "
        f"{args.block_size} cells; one epoch of all cells, one process; at most {ShardedAnnData.MAX_OPEN} files open"
    )
    print("| files | order | seconds | cells/s | files opened | shards per minibatch | top cell type share |")
    print("|---|---|---|---|---|---|---|")
    for compression in ("gzip", None):
        paths = write_shards(args.workdir, args.shards, args.cells_per_shard, args.expressed, compression)
        data = ShardedAnnData(paths, phenotype_keys=["cell_type"])
        blocks = split_blocks(data.shard_sizes, args.block_size)
        orders = {"all blocks shuffled": None} | {f"by shard, buffer {b:,}": b for b in args.buffers}
        for name, buffer in orders.items():
            sampler = ShardBlockSampler(blocks, args.batch_size, seed=0, shuffle_buffer=buffer)
            r = read_epoch(data, sampler)
            print(
                f"| {compression or 'uncompressed'} | {name} | {r['seconds']:.1f} | {r['cells/s']:,.0f} | "
                f"{r['opened']:,} | {r['shards/minibatch']:.2f} | {r['top type share']:.2f} |"
            )


if __name__ == "__main__":
    main()
