"""Plots of in-silico perturbations and of predicted responses."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from anndata import AnnData
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from sctransformer._keys import KEYS
from sctransformer.data import category_codes, gene_identifiers, get_matrix
from sctransformer.data._validation import positive_int
from sctransformer.metrics._probes import mean_log1p_normalised
from sctransformer.model import PerturbationResult

from ._utils import finish, new_axes


def _perturbation_tables(
    data: PerturbationResult | pd.DataFrame | AnnData, key: str
) -> tuple[pd.DataFrame, pd.DataFrame | None, str]:
    """The summary, the expression-change table (in the summary's row order) and the mode."""
    if isinstance(data, PerturbationResult):
        change = None
        if data.expression_change is not None:
            change = data.expression_change.reset_index(drop=True)
        return data.summary.reset_index(drop=True), change, data.mode
    if isinstance(data, AnnData):
        if key not in data.uns or "summary" not in data.uns[key]:
            raise KeyError(
                f"adata.uns[{key!r}] holds no perturbation results; run sctransformer.tl.perturb first, or "
                "pass key= the key_added of the run that wrote them"
            )
        stored = data.uns[key]
        summary, change = stored["summary"], stored.get("expression_change")
        rows = [str(i) for i in range(len(summary))]
        if change is not None and list(map(str, change.index)) != rows:
            change = change.T  # stored with genes as rows (earlier versions: as columns)
        change = None if change is None else change.reset_index(drop=True)
        return summary.reset_index(drop=True), change, str(stored.get("mode", "perturbation"))
    if isinstance(data, pd.DataFrame) and {"perturbed", "embedding_shift"} <= set(data.columns):
        return data.reset_index(drop=True), None, "perturbation"
    raise TypeError(
        "data must be what sctransformer.tl.perturb returned (its table), the AnnData it wrote to, or a "
        "PerturbationResult"
    )


def perturbation(
    data: PerturbationResult | pd.DataFrame | AnnData,
    *,
    gene: str | None = None,
    group: str | None = None,
    n: int = 20,
    key: str = KEYS.PERTURBATION,
    ax: Axes | None = None,
    show: bool | None = None,
    return_fig: bool = False,
) -> Figure | Axes | None:
    """Ranked effects of in-silico perturbations.

    Without ``gene``: the perturbed genes (and groups) ranked by the mean shift of the cell
    embedding (``1 - cos``). With ``gene``: the ``n`` genes whose predicted expression that
    perturbation moves most, signed. These per-gene changes are kept in the AnnData
    :func:`sctransformer.tl.perturb` wrote to and in a
    :class:`~sctransformer.model.PerturbationResult`, from a run with ``predict_expression``; the
    table :func:`sctransformer.tl.perturb` returns holds only the summary (``most_changed`` as
    text), so it draws only the embedding shifts.

    Parameters
    ----------
    data
        The table :func:`sctransformer.tl.perturb` returned (without ``gene`` only), the AnnData
        it wrote to, or a :class:`~sctransformer.model.PerturbationResult`.
    gene
        A perturbed gene whose predicted expression changes to draw (``data`` the AnnData or the
        :class:`~sctransformer.model.PerturbationResult`).
    group
        With ``gene`` and a run with ``groupby``: the group; default the first.
    n
        Bars to draw.
    key
        ``.uns`` key of the results (AnnData input).
    ax, show, return_fig
        As in scanpy.
    """
    n = positive_int(n, "n")
    summary, change, mode = _perturbation_tables(data, key)
    if summary.empty:
        raise ValueError("the perturbation results are empty (no gene was perturbed)")
    if gene is None:
        table = summary.sort_values("embedding_shift", ascending=False).head(n)
        labels = [
            p if g == "all" else f"{p} ({g})" for p, g in zip(table["perturbed"], table["group"], strict=True)
        ]
        fig, ax = new_axes(ax, (5.0, 0.6 + 0.28 * len(table)))
        ax.barh(np.arange(len(table))[::-1], table["embedding_shift"], color="#4c72b0")
        ax.set_yticks(np.arange(len(table))[::-1], labels, fontsize=8)
        ax.set_xlabel("embedding shift (1 - cos)")
        ax.set_title(f"in-silico {mode}: embedding shift")
        return finish(fig, ax, show=show, return_fig=return_fig)
    if change is None and isinstance(data, pd.DataFrame):
        raise ValueError(
            "the table sctransformer.tl.perturb returns holds no per-gene expression changes; to draw them "
            "with gene=..., pass the AnnData it wrote to (or the PerturbationResult of "
            "GeneTransformer.perturb) of a run with predict_expression=True"
        )
    if change is None:
        raise ValueError("these results hold no expression changes; run perturb with predict_expression=True")
    rows = summary.index[summary["perturbed"] == gene]
    if len(rows) == 0:
        raise ValueError(
            f"{gene!r} was not perturbed; perturbed genes: {sorted(summary['perturbed'].unique())}"
        )
    if group is not None:
        rows = summary.index[(summary["perturbed"] == gene) & (summary["group"] == str(group))]
        if len(rows) == 0:
            groups = sorted(summary.loc[summary["perturbed"] == gene, "group"].unique())
            raise ValueError(f"no results for group {group!r} of {gene!r}; groups: {groups}")
    row = change.loc[rows[0]].drop(labels=[gene], errors="ignore")
    top = row.reindex(row.abs().sort_values(ascending=False).index[:n])
    fig, ax = new_axes(ax, (5.0, 0.6 + 0.28 * len(top)))
    colours = np.where(top.to_numpy() > 0, "#c44e52", "#4c72b0")
    ax.barh(np.arange(len(top))[::-1], top.to_numpy(), color=colours)
    ax.set_yticks(np.arange(len(top))[::-1], top.index, fontsize=8)
    ax.axvline(0, color="0.3", linewidth=0.8)
    ax.set_xlabel("mean predicted change (log1p)")
    where = summary.loc[rows[0], "group"]
    ax.set_title(f"{gene} perturbed" + ("" if where == "all" else f" ({where})"))
    return finish(fig, ax, show=show, return_fig=return_fig)


def response(
    predicted: AnnData,
    adata: AnnData,
    genes: Sequence[str] | None = None,
    *,
    layer: str | None = "counts",
    groupby: str | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    return_fig: bool = False,
) -> Figure | Axes | None:
    """Predicted against observed mean change of every gene after a phenotype swap.

    The predicted change is the mean of ``predicted.X`` minus the mean of its ``sct_baseline``
    layer (:func:`sctransformer.tl.predict_response`). The observed change is the mean
    log1p-normalised expression of ``adata``'s cells that have the swapped-in phenotype minus that
    of the swapped cells themselves (``predicted``'s cells, found in ``adata`` by name); with
    ``groupby``, only cells of the groups among ``predicted``'s cells count. A cell has the
    swapped-in phenotype where its label is that category as the model names categories
    (``sctransformer.data.category_codes``: a whole-number float ``1.0`` is ``"1"``, a
    datetime has its ISO name), as :func:`sctransformer.tl.predict_response` reads labels. Only
    the rows of those cells are read from ``layer``, in chunks, so ``adata`` may be backed.

    Parameters
    ----------
    predicted
        What :func:`sctransformer.tl.predict_response` returned.
    adata
        The observed cells, both conditions, with counts in ``layer``.
    genes
        Genes to label.
    layer
        Layer of ``adata`` with the counts (``None``: ``X``).
    groupby
        ``.obs`` column (e.g. the cell type) that restricts the observed cells to the swapped cells' groups.
    ax, show, return_fig
        As in scanpy.
    """
    swap = predicted.uns.get("sct_response", {}).get("set")
    if not swap or "sct_baseline" not in predicted.layers:
        raise ValueError("predicted must be the AnnData of sctransformer.tl.predict_response")
    missing = [k for k in swap if k not in adata.obs]
    if missing:
        raise KeyError(f"adata.obs lacks the swapped phenotype column(s) {missing}")
    source = adata.obs_names.isin(predicted.obs_names)
    if not source.any():
        raise ValueError("none of predicted's cells is in adata (matched by .obs_names)")
    target = np.ones(adata.n_obs, dtype=bool)
    for k, v in swap.items():  # v names the category as the model does (category_codes' rule)
        target &= category_codes(adata.obs[k].reset_index(drop=True), [str(v)]) == 0
    if groupby is not None:
        if groupby not in adata.obs or groupby not in predicted.obs:
            raise KeyError(f"groupby {groupby!r} must be a column of both adata.obs and predicted.obs")
        target &= adata.obs[groupby].isin(predicted.obs[groupby].unique()).to_numpy()
    if not target.any():
        raise ValueError(
            f"adata has no cells with {swap}" + ("" if groupby is None else f" in those {groupby} groups")
        )
    gene_key = predicted.uns["sct_response"].get("gene_key")
    where = "adata.var_names" if gene_key is None else f"adata.var[{gene_key!r}]"
    columns = gene_identifiers(adata, gene_key).get_indexer(predicted.var_names)
    if (columns < 0).any():
        missing = list(predicted.var_names[columns < 0][:10])
        raise ValueError(f"predicted's genes must all be in {where}; missing: {missing}")
    counts = get_matrix(adata, layer)  # only the target and source rows are read (backed: in chunks)
    observed = (
        mean_log1p_normalised(counts, np.flatnonzero(target))
        - mean_log1p_normalised(counts, np.flatnonzero(source))
    )[columns]
    predicted_change = np.asarray(predicted.X).mean(0) - np.asarray(predicted.layers["sct_baseline"]).mean(0)
    r = np.corrcoef(predicted_change, observed)[0, 1] if np.std(predicted_change) > 0 else float("nan")

    fig, ax = new_axes(ax, (4.6, 4.2))
    ax.scatter(predicted_change, observed, s=6, color="0.6", linewidths=0)
    lo = float(min(predicted_change.min(), observed.min()))
    hi = float(max(predicted_change.max(), observed.max()))
    ax.plot([lo, hi], [lo, hi], color="0.3", linewidth=0.8, linestyle="--")
    for g in genes or []:
        j = predicted.var_names.get_indexer([g])[0]
        if j < 0:
            raise ValueError(f"gene {g!r} is not among predicted's genes")
        ax.scatter(predicted_change[j], observed[j], s=18, color="#c44e52")
        ax.annotate(
            g, (predicted_change[j], observed[j]), fontsize=8, xytext=(3, 3), textcoords="offset points"
        )
    swap_text = ", ".join(f"{k}={v}" for k, v in swap.items())
    ax.set_xlabel("predicted change")
    ax.set_ylabel("observed change")
    ax.set_title(f"{swap_text}: Pearson r = {r:.2f}", fontsize=10)
    plt.setp(ax.spines.values(), linewidth=0.8)
    return finish(fig, ax, show=show, return_fig=return_fig)
