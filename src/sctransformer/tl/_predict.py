"""Phenotype predictions into ``.obs`` / ``.obsm``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from numbers import Real
from typing import Any

import numpy as np
import pandas as pd
import scanpy as sc
from anndata import AnnData

from sctransformer._keys import KEYS, confidence_key, prediction_key
from sctransformer._settings import settings
from sctransformer.data import ShardedAnnData
from sctransformer.model import GeneTransformer

from ._utils import (
    check_key_added,
    counts_of,
    previous_run,
    record_run,
    recorded_runs,
    refuse_backed_copy,
    tool_records,
)

#: Colour of the ``"unknown"`` label (``min_confidence``) where the true labels have none.
UNKNOWN_COLOR = "#bbbbbb"
#: Column names that .h5ad or .zarr cannot hold as they are (besides names with ``/``).
_RESERVED_COLUMNS = frozenset({"", ".", "..", "_index", "zarr.json"})


def over_clustering_key(key_added: str) -> str:
    """``.obs`` column of the default clusters of :func:`predict`'s majority vote for ``key_added``."""
    return f"{key_added}_over_clustering"


def majority_voting_key(key_added: str, phenotype: str) -> str:
    """``.obs`` column of the majority-vote labels of ``phenotype`` written by :func:`predict`."""
    return f"{prediction_key(key_added, phenotype)}_{KEYS.MAJORITY_SUFFIX}"


def _writable(name: str) -> bool:
    """Whether ``name`` can be a column of a DataFrame written to .h5ad and .zarr as it is."""
    return "/" not in name and name not in _RESERVED_COLUMNS and not name.startswith(".")


def probability_columns(categories: Iterable[object]) -> list[str]:
    """Column names of the probabilities :func:`predict` writes: the categories, made writable.

    .h5ad and .zarr store each column of an ``.obsm`` DataFrame under its name, so ``/`` (as in
    ``"CD4+/CD45RA+/CD25- Naive T"``) becomes ``_``, and a name that is reserved there (``""``,
    ``"_index"``, ``"zarr.json"``, or one starting with ``.``) gets a leading ``_``. Names that are
    writable as they are keep them; a changed name that would repeat another gets ``_2``, ``_3``,
    .... The exact names are in the run record (see :func:`predict`) and
    :func:`probability_labels` recovers them.

    Parameters
    ----------
    categories
        Category names, in the order of the columns.

    Returns
    -------
    One distinct name per category, in the same order.
    """
    names = [str(c) for c in categories]
    taken = {name for name in names if _writable(name)}
    columns = []
    for name in names:
        if _writable(name):
            columns.append(name)
            continue
        base = name.replace("/", "_")
        base = base if _writable(base) else f"_{base}"
        column, n = base, 1
        while column in taken:
            n += 1
            column = f"{base}_{n}"
        taken.add(column)
        columns.append(column)
    return columns


def _recorded_categories(adata: AnnData, pred_key: str) -> list[list[str]]:
    """Category lists that :func:`predict` runs recorded for the probabilities of ``pred_key``."""
    found = []
    for run_key, record in recorded_runs(adata).items():
        run = next((r for r in tool_records(record) if r.get("function") == "predict"), None)
        if run is None:
            continue
        categories = run.get("categories")
        if not isinstance(categories, Mapping):
            continue
        for phenotype, names in categories.items():
            if prediction_key(str(run_key), str(phenotype)) == pred_key:
                found.append([str(name) for name in np.asarray(names, dtype=object).ravel()])
    return found


def probability_labels(
    adata: AnnData, pred_key: str, probabilities: pd.DataFrame, labels: Iterable[object] = ()
) -> list[str]:
    """The category of each column of ``.obsm[f"{pred_key}_probs"]``, as the model names it.

    :func:`predict` writes the columns with names that .h5ad and .zarr can store
    (:func:`probability_columns`) and records the exact names in ``.uns["sct"][key_added]``. Those
    are used where they match the columns; else (e.g. after :func:`anndata.concat`, which drops
    ``.uns``) a column is taken for the one label of ``labels`` whose writable name it is, and
    otherwise for its own name.

    Parameters
    ----------
    adata
        AnnData with the run record in ``.uns``.
    pred_key
        ``.obs`` column of the predicted labels, e.g. ``"sct_cell_type"``.
    probabilities
        The DataFrame of probabilities, one column per category.
    labels
        Known labels (e.g. the true and the predicted ones) to match columns to where no run
        record matches.

    Returns
    -------
    One name per column.
    """
    columns = [str(c) for c in probabilities.columns]
    for names in _recorded_categories(adata, pred_key):
        if probability_columns(names) == columns:
            return names
    by_column: dict[str, set[str]] = {}
    for label in {str(label) for label in labels}:
        by_column.setdefault(probability_columns([label])[0], set()).add(label)
    return [next(iter(found)) if len(found := by_column.get(c, set())) == 1 else c for c in columns]


def _reuse_colors(adata: AnnData, source: str, target: str) -> None:
    """Give the labels of ``.obs[target]`` the colours of the same labels of ``.obs[source]``.

    Where the true labels ``.obs[source]`` (categorical) have no colours, or fewer than their
    categories, they first get scanpy's default ones, the colours its plots would give them, so that
    a label is drawn in one colour in both. ``"unknown"`` (``min_confidence``) is grey unless the
    true labels give it a colour. Where some label gets no colour (no categorical ``.obs[source]``,
    or a label that it does not have), ``.uns[f"{target}_colors"]`` is removed, so that no colours
    of an earlier run remain and scanpy picks new ones.
    """
    adata.uns.pop(f"{target}_colors", None)
    column = adata.obs.get(source)
    if column is None or not isinstance(column.dtype, pd.CategoricalDtype):
        return
    categories = column.cat.categories.astype(str)
    colors = adata.uns.get(f"{source}_colors")
    if colors is None or len(colors) < len(categories):  # as scanpy's plots, which would replace them
        try:  # scanpy's own default colours (a private helper: without it, scanpy picks colours later)
            from scanpy.plotting._utils import _set_default_colors_for_categorical_obs
        except ImportError:
            return
        _set_default_colors_for_categorical_obs(adata, source)
        colors = adata.uns[f"{source}_colors"]
    by_label = dict(zip(categories, list(colors), strict=False))
    by_label.setdefault(KEYS.UNKNOWN, UNKNOWN_COLOR)
    predicted = adata.obs[target].cat.categories.astype(str)
    if all(label in by_label for label in predicted):
        adata.uns[f"{target}_colors"] = [str(by_label[label]) for label in predicted]


def _wrote_clusters(run: Mapping[str, Any]) -> bool:
    """Whether a :func:`predict` run (its record) wrote the default clusters of the vote."""
    params = run.get("params", {})
    return bool(params.get("majority_voting", False)) and params.get("over_clustering") is None


def _drop_obs(adata: AnnData, column: str) -> None:
    """Remove ``.obs[column]`` and its colours, where present."""
    if column in adata.obs.columns:
        del adata.obs[column]
    adata.uns.pop(f"{column}_colors", None)


def _over_clustering(
    adata: AnnData | ShardedAnnData,
    model: GeneTransformer,
    resolution: float,
    batch_size: int | None,
    seed: int,
) -> pd.Categorical:
    """Leiden clusters of the model's cell embedding (on a temporary AnnData; ``adata`` is untouched)."""
    if adata.n_obs < 3:  # too few cells for a neighbour graph: each cell is its own cluster
        return pd.Categorical(np.arange(adata.n_obs).astype(str))
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
        AnnData holding counts in the model's layer (need not be set up; labels are not used). Not
        a view of a backed AnnData, which the results cannot be written into (load the subset first
        with ``.to_memory()``).
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
        neighbouring cluster's label. With ``min_confidence``, ``"unknown"`` is a label that
        votes: a cluster whose cells are mostly below it becomes ``"unknown"`` as a whole.
    over_clustering
        ``.obs`` column of clusters for the vote; default leiden clusters of the model's
        embedding at ``resolution`` (computed on a temporary object, written to
        ``.obs["<key_added>_over_clustering"]``).
    resolution
        Leiden resolution of the default over-clustering (high: many small clusters).
    key_added
        Prefix of the written keys (without ``/``, which .h5ad cannot read back).
    batch_size
        Cells per minibatch.
    copy
        Return a modified copy instead of writing into ``adata``.
    counts
        Read the counts of ``adata``'s cells (the same cells, in order) from these files instead of
        from ``adata``, for data too large to load: ``adata`` then needs only its ``.obs`` (its
        cell names are checked against the shards', or against them made unique by
        ``obs_names_make_unique()``).

    Returns
    -------
    ``adata`` (or its copy) if ``copy``, else ``None``; sets, for each phenotype ``<key>``,

    ``.obs["<key_added>_<key>"]``
        Predicted label (categorical: the model's categories, plus ``"unknown"`` with
        ``min_confidence``, in that order, without those that no cell was given, so that scanpy
        can group by it; all categories are in the probabilities and the run record).
    ``.obs["<key_added>_<key>_confidence"]``
        Probability of the predicted label.
    ``.obsm["<key_added>_<key>_probs"]``
        DataFrame of the probability of every category of the model, one column per category,
        named as the category where .h5ad and .zarr allow it (they cannot store ``/`` in a
        column name: ``"CD4+/CD25 T Reg"`` becomes ``"CD4+_CD25 T Reg"``); the exact names are in
        the run record.
    ``.obs["<key_added>_<key>_majority_voting"]``
        With ``majority_voting``: the cluster's majority label (categories as the predicted
        label's). A run without ``majority_voting`` removes these columns of an earlier run with
        the same ``key_added``.
    ``.obs["<key_added>_over_clustering"]``
        With ``majority_voting`` and no ``over_clustering``: the leiden clusters used (removed by
        a later run with the same ``key_added`` that does not compute them).
    ``.uns["<key_added>_<key>_colors"]``, ``.uns["<key_added>_<key>_majority_voting_colors"]``
        The colours of the true labels ``.uns["<key>_colors"]``, so that true and predicted labels
        share colours in plots (``"unknown"`` is grey, ``"#bbbbbb"``, if the true labels have no
        colour for it). True labels (a categorical ``.obs["<key>"]``) without colours, or with
        fewer than their categories, first get scanpy's default colours in
        ``.uns["<key>_colors"]``, those its plots would give them. Removed where some predicted
        label has no colour this way (no categorical ``.obs["<key>"]``, or a label it does not
        have), so that no colours of an earlier run remain.
    ``.uns["sct"][key_added]``
        The parameters of the run (``"params"``) and, in ``"categories"``, the model's categories
        of each phenotype, in the order of the columns of the probabilities.
    """
    refuse_backed_copy(adata, copy)
    check_key_added(key_added)
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
    previous = previous_run(adata, key_added, "predict")
    categories: dict[str, list[str]] = {}
    for key, probs in probabilities.items():
        predicted = prediction_key(key_added, key)
        # the model's category order, without categories no cell was given (scanpy's groupby fails on them)
        adata.obs[predicted] = table[key].array.remove_unused_categories()
        adata.obs[confidence_key(key_added, key)] = table[f"{key}_confidence"].to_numpy()
        adata.obsm[f"{predicted}_probs"] = pd.DataFrame(
            probs.to_numpy(), index=adata.obs_names, columns=probability_columns(probs.columns)
        )
        categories[key] = [str(c) for c in probs.columns]
        _reuse_colors(adata, key, predicted)
        if clusters is not None:
            voted = majority_voting_key(key_added, key)
            adata.obs[voted] = majority_vote(table[key], clusters).remove_unused_categories()
            _reuse_colors(adata, key, voted)
    # votes of an earlier run with this key_added that this run does not rewrite would be stale
    earlier = np.asarray(previous.get("params", {}).get("phenotypes", []), dtype=object).ravel()
    for key in dict.fromkeys([*map(str, earlier), *probabilities]):
        if clusters is None or key not in probabilities:
            _drop_obs(adata, majority_voting_key(key_added, key))
    clusters_key = over_clustering_key(key_added)
    if majority_voting and over_clustering is None:
        adata.obs[clusters_key] = pd.Categorical(clusters)
        adata.uns.pop(f"{clusters_key}_colors", None)
    elif over_clustering != clusters_key and _wrote_clusters(previous):
        _drop_obs(adata, clusters_key)  # the earlier run's clusters, no longer those of the vote
    record_run(
        adata,
        key_added,
        "predict",
        model,
        {
            "phenotypes": list(probabilities),
            "min_confidence": min_confidence,
            "calibrated": calibrated,
            # the temperature each phenotype's confidences were computed with (1: uncalibrated)
            "temperatures": {
                key: float(model.temperatures_.get(key, 1.0)) if calibrated else 1.0 for key in probabilities
            },
            "majority_voting": majority_voting,
            "over_clustering": over_clustering,
            "resolution": resolution if majority_voting and over_clustering is None else None,
        },
        extra={"categories": categories},
    )
    return adata if copy else None
