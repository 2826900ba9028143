"""Phenotype predictions into ``.obs`` / ``.obsm``."""

from __future__ import annotations

from numbers import Real

import numpy as np
import pandas as pd
import scanpy as sc
from anndata import AnnData

from sctransformer._keys import KEYS, confidence_key, prediction_key
from sctransformer._settings import settings
from sctransformer.data import ShardedAnnData
from sctransformer.model import GeneTransformer

from ._utils import counts_of, record_run


def _reuse_colors(adata: AnnData, source: str, target: str) -> None:
    """Give predicted labels the colours their true labels have in ``adata.uns``, if any."""
    colors = adata.uns.get(f"{source}_colors")
    column = adata.obs.get(source)
    if colors is None or column is None or not isinstance(column.dtype, pd.CategoricalDtype):
        return
    by_label = dict(zip(column.cat.categories.astype(str), colors, strict=False))
    predicted = adata.obs[target].cat.categories
    if all(label in by_label for label in predicted):
        adata.uns[f"{target}_colors"] = [by_label[label] for label in predicted]


def _over_clustering(
    adata: AnnData | ShardedAnnData,
    model: GeneTransformer,
    resolution: float,
    batch_size: int | None,
    seed: int,
) -> pd.Categorical:
    """Leiden clusters of the model's cell embedding (on a temporary AnnData; ``adata`` is untouched)."""
    embedding = model.get_latent_representation(adata, batch_size=batch_size)
    tmp = AnnData(obs=pd.DataFrame(index=np.arange(adata.n_obs).astype(str)), obsm={"X_sct": embedding})
    sc.pp.neighbors(tmp, use_rep="X_sct", n_neighbors=min(15, max(2, adata.n_obs - 1)), random_state=seed)
    sc.tl.leiden(
        tmp, resolution=resolution, flavor="igraph", n_iterations=2, directed=False, random_state=seed
    )
    return tmp.obs["leiden"].array


def majority_vote(labels: pd.Series | np.ndarray, clusters: pd.Series | np.ndarray) -> pd.Categorical:
    """Relabel every cell with the most frequent label of its cluster (ties: first category).

    Parameters
    ----------
    labels
        Predicted label of each cell.
    clusters
        Cluster of each cell; cells with a missing cluster (NaN / None) keep their own label.
    """
    labels = pd.Series(pd.Categorical(labels))
    clusters = pd.Series(np.asarray(clusters, dtype=object))  # object: NaN stays missing, not "nan"
    if len(labels) != len(clusters):
        raise ValueError(f"labels ({len(labels)}) and clusters ({len(clusters)}) differ in length")
    counts = pd.crosstab(clusters.to_numpy(), labels.to_numpy(), dropna=False)
    counts = counts.reindex(columns=labels.cat.categories, fill_value=0)  # crosstab sorts its columns
    winner = counts.idxmax(axis=1)
    voted = clusters.map(winner)  # crosstab drops missing clusters: those cells keep their label
    voted = voted.where(clusters.notna(), labels.astype(object))
    return pd.Categorical(voted.to_numpy(), categories=labels.cat.categories)


def predict(
    adata: AnnData,
    model: GeneTransformer,
    *,
    phenotype: str | list[str] | None = None,
    min_confidence: float | None = None,
    calibrated: bool = True,
    majority_voting: bool = False,
    over_clustering: str | None = None,
    resolution: float = 2.0,
    key_added: str = KEYS.PREDICTION,
    batch_size: int | None = None,
    copy: bool = False,
    counts: ShardedAnnData | None = None,
) -> AnnData | None:
    """Predict phenotypes (cell type, ...) of every cell.

    Parameters
    ----------
    adata
        AnnData holding counts in the model's layer (need not be set up; labels are not used).
    model
        Trained :class:`~sctransformer.GeneTransformer` with phenotype keys.
    phenotype
        Phenotype key(s) to predict; default all of the model's.
    min_confidence
        Cells whose confidence is below this are labelled ``"unknown"``; in (0, 1).
    calibrated
        Use the temperatures fitted on the validation cells (see
        :meth:`~sctransformer.GeneTransformer.calibrate`) for the confidences.
    majority_voting
        Also relabel each cluster of cells with its most frequent predicted label (as
        CellTypist does), which smooths out isolated errors but can merge rare types into a
        neighbouring cluster's label.
    over_clustering
        ``.obs`` column of clusters for the vote; default leiden clusters of the model's
        embedding at ``resolution`` (computed on a temporary object, written to
        ``.obs["sct_over_clustering"]``).
    resolution
        Leiden resolution of the default over-clustering (high: many small clusters).
    key_added
        Prefix of the written keys.
    batch_size
        Cells per minibatch.
    copy
        Return a modified copy instead of writing into ``adata``.
    counts
        Read the counts of ``adata``'s cells (the same cells, in order) from these files instead of
        from ``adata``, for data too large to load: ``adata`` then needs only its ``.obs``.

    Returns
    -------
    ``adata`` (or its copy) if ``copy``, else ``None``; sets, for each phenotype ``<key>``,

    ``.obs["<key_added>_<key>"]``
        Predicted label (categorical, with the model's categories, plus ``"unknown"`` with
        ``min_confidence``).
    ``.obs["<key_added>_<key>_confidence"]``
        Probability of the predicted label.
    ``.obsm["<key_added>_<key>_probs"]``
        DataFrame of the probability of every category.
    ``.obs["<key_added>_<key>_majority_voting"]``
        With ``majority_voting``: the cluster's majority label.
    ``.obs["sct_over_clustering"]``
        With ``majority_voting`` and no ``over_clustering``: the leiden clusters used.
    ``.uns["<key_added>_<key>_colors"]``
        The colours of ``.uns["<key>_colors"]``, when the AnnData has them, so that true and
        predicted labels share colours in plots.
    ``.uns["sct"][key_added]``
        The parameters of the run.
    """
    if over_clustering is not None:
        if not majority_voting:
            raise ValueError("over_clustering is only used with majority_voting=True")
        if over_clustering not in adata.obs:
            raise KeyError(
                f"over_clustering column {over_clustering!r} not found in adata.obs; compute clusters "
                "first (e.g. sc.tl.leiden) or leave over_clustering=None"
            )
    if majority_voting and not (isinstance(resolution, Real) and resolution > 0):
        raise ValueError(f"resolution must be a positive number, got {resolution!r}")
    source = counts_of(adata, counts)
    table, probabilities = model.predict(
        source,
        phenotype=phenotype,
        min_confidence=min_confidence,
        calibrated=calibrated,
        batch_size=batch_size,
        return_probabilities=True,
    )
    clusters = None
    if majority_voting:
        clusters = (
            adata.obs[over_clustering].to_numpy()
            if over_clustering is not None
            else _over_clustering(source, model, resolution, batch_size, settings.seed)
        )
    adata = adata.copy() if copy else adata
    for key, probs in probabilities.items():
        adata.obs[prediction_key(key_added, key)] = table[key].array  # keeps the categories (same order)
        adata.obs[confidence_key(key_added, key)] = table[f"{key}_confidence"].to_numpy()
        adata.obsm[f"{prediction_key(key_added, key)}_probs"] = probs.set_axis(adata.obs_names, axis=0)
        if clusters is not None:
            voted = f"{prediction_key(key_added, key)}_{KEYS.MAJORITY_SUFFIX}"
            adata.obs[voted] = majority_vote(table[key], clusters)
        _reuse_colors(adata, key, prediction_key(key_added, key))
    if majority_voting and over_clustering is None:
        adata.obs[KEYS.OVER_CLUSTERING] = pd.Categorical(clusters)
    record_run(
        adata,
        key_added,
        "predict",
        model,
        {
            "phenotypes": list(probabilities),
            "min_confidence": min_confidence,
            "calibrated": calibrated,
            "majority_voting": majority_voting,
            "over_clustering": over_clustering,
            "resolution": resolution if majority_voting and over_clustering is None else None,
        },
    )
    return adata if copy else None
