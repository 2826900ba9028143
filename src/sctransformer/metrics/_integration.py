"""Batch-integration scores of embeddings: scib-metrics' benchmark, in one call."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from anndata import AnnData

from ._retrieval import obsm_dense

#: scIB metric groups, as scib-metrics names the columns of its results.
BIO_CONSERVATION = "Bio conservation"
BATCH_CORRECTION = "Batch correction"


def integration(
    adata: AnnData,
    *,
    batch_key: str,
    label_key: str,
    embeddings: str | Sequence[str],
    pre_integrated: str | None = "X_pca",
    kbet: bool = True,
    n_jobs: int = 1,
) -> pd.DataFrame:
    """Score how well embeddings mix batches and keep labelled cell states apart (scIB metrics).

    Runs :class:`scib_metrics.benchmark.Benchmarker` (install with ``pip install
    "sctransformer[integration]"``): bio conservation by isolated labels, leiden NMI and ARI,
    silhouette of labels and cLISI; batch correction by the batch-removal silhouette (BRAS),
    iLISI, kBET, graph connectivity and principal-component regression against
    ``pre_integrated``. Scores are not min-max scaled across embeddings, so a table does not
    change when an embedding is added; the totals are scIB's weighting, 0.6 bio + 0.4 batch.

    Parameters
    ----------
    adata
        Cells with the embeddings in ``.obsm`` (not modified); a sparse embedding is densified.
    batch_key
        ``.obs`` column of the batches to mix (cells without a batch are left out).
    label_key
        ``.obs`` column of the cell labels to keep apart (cells without a label are left out);
        needs at least two labels among the cells with a batch.
    embeddings
        ``.obsm`` keys to score (a single ``str`` is one key).
    pre_integrated
        ``.obsm`` key of the embedding before integration, for the PCR comparison; ``None`` to
        leave that metric out.
    kbet
        Include kBET (the slowest metric).
    n_jobs
        Parallel jobs of the neighbour search.

    Returns
    -------
    One row per embedding, one column per metric, plus the group scores
    ``"Bio conservation"`` and ``"Batch correction"`` and their weighted ``"Total"``;
    ``.attrs["metric_type"]`` maps each column to its group.
    """
    try:
        from scib_metrics.benchmark import BatchCorrection, Benchmarker, BioConservation
    except ImportError as err:
        raise ImportError(
            'integration metrics need scib-metrics: pip install "sctransformer[integration]"'
        ) from err
    for key, role in ((batch_key, "batch_key"), (label_key, "label_key")):
        if key not in adata.obs:
            raise KeyError(f"{role} {key!r} not found in adata.obs (available: {list(adata.obs.columns)})")
    if batch_key == label_key:
        raise ValueError(
            f"batch_key and label_key are both {batch_key!r}; they must be different columns: the batches "
            "are to be mixed, the labels kept apart"
        )
    keys = [embeddings] if isinstance(embeddings, str) else list(embeddings)
    if not keys:
        raise ValueError("embeddings must name at least one .obsm key")
    repeated = sorted({str(key) for key in keys if keys.count(key) > 1})
    if repeated:
        raise ValueError(f"embeddings names {repeated} more than once; name each .obsm key once")
    if pre_integrated and pre_integrated not in adata.obsm:
        raise KeyError(
            f"pre_integrated {pre_integrated!r} (the embedding before integration, which the PCR comparison "
            f"scores against) not found in adata.obsm (available: {list(adata.obsm)}); compute it "
            "(sc.pp.pca(adata) for the default 'X_pca') or pass pre_integrated=None to leave that metric out"
        )
    for key in [*keys, *([pre_integrated] if pre_integrated else [])]:
        if key not in adata.obsm:
            raise KeyError(f"embedding {key!r} not found in adata.obsm (available: {list(adata.obsm)})")
        if not np.isfinite(obsm_dense(adata, key)).all():
            raise ValueError(f"adata.obsm[{key!r}] holds NaN or infinite values")
    labelled = (adata.obs[label_key].notna() & adata.obs[batch_key].notna()).to_numpy()
    if adata.obs[batch_key][labelled].nunique() < 2:
        raise ValueError(
            f"adata.obs[{batch_key!r}] has a single batch among the cells with a label and a batch; "
            "there is nothing to integrate"
        )
    if adata.obs[label_key][labelled].nunique() < 2:
        raise ValueError(
            f"adata.obs[{label_key!r}] has a single label among the cells with a label and a batch; "
            "the bio-conservation metrics compare labels, so pass a label_key with at least two labels"
        )
    cells = AnnData(
        obs=pd.DataFrame(
            {
                batch_key: adata.obs[batch_key].astype(str).to_numpy()[labelled],
                label_key: adata.obs[label_key].astype(str).to_numpy()[labelled],
            },
            index=adata.obs_names[labelled],
        ),
        obsm={
            key: obsm_dense(adata, key).astype(np.float32)[labelled]
            for key in {*keys, *([pre_integrated] if pre_integrated else [])}
        },
    )
    bench = Benchmarker(
        cells,
        batch_key=batch_key,
        label_key=label_key,
        embedding_obsm_keys=keys,
        # without pre_integrated scib-metrics would run a PCA of .X (empty here) that PCR alone uses
        pre_integrated_embedding_obsm_key=pre_integrated or keys[0],
        bio_conservation_metrics=BioConservation(
            nmi_ari_cluster_labels_leiden=True, nmi_ari_cluster_labels_kmeans=False
        ),
        batch_correction_metrics=BatchCorrection(
            kbet_per_label=kbet, pcr_comparison=pre_integrated is not None
        ),
        n_jobs=n_jobs,
        progress_bar=False,
    )
    bench.benchmark()
    results = bench.get_results(min_max_scale=False)
    metric_type = results.loc["Metric Type"]
    table = results.drop(index="Metric Type").astype(float)
    table.index.name = "embedding"
    table.attrs["metric_type"] = metric_type.to_dict()
    return table
