"""In-silico perturbation and condition-swap response prediction."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from sctransformer._keys import KEYS
from sctransformer.model import GeneTransformer
from sctransformer.model._expression import PerturbationMode

from ._utils import (
    check_distinct_keys,
    check_key_added,
    previous_run,
    record_run,
    refuse_backed_copy,
    suffixed_key,
)


def perturb(
    adata: AnnData,
    model: GeneTransformer,
    genes: Sequence[str] | str,
    *,
    mode: PerturbationMode = "delete",
    value: float | None = None,
    groupby: str | None = None,
    predict_expression: bool = True,
    n_folds: int = 4,
    n_top: int = 10,
    batch_size: int | None = None,
    store_cell_shifts: bool = False,
    key_added: str = KEYS.PERTURBATION,
    copy: bool = False,
) -> pd.DataFrame | AnnData:
    """In-silico deletion or over-expression of genes, one at a time (Geneformer-style).

    See :meth:`~sctransformer.GeneTransformer.perturb` for the method and the parameters.

    Parameters
    ----------
    adata
        AnnData holding counts in the model's layer.
    model
        Trained :class:`~sctransformer.GeneTransformer` (``expression_queries > 0`` for
        ``predict_expression``).
    genes
        Genes to perturb.
    mode
        ``"delete"`` (cells expressing the gene) or ``"overexpress"`` (every cell that expresses
        a vocabulary gene).
    value
        Over-expressed log1p-normalised value; default each cell's highest.
    groupby
        ``.obs`` column: report each group separately (without it, the table's ``group`` is
        ``"all"``).
    predict_expression
        Also report the genes whose predicted expression moves most.
    n_folds, n_top
        See :meth:`~sctransformer.GeneTransformer.perturb`.
    batch_size
        Cells per minibatch; default ``sctransformer.settings.batch_size``.
    store_cell_shifts
        Write each cell's embedding shift to ``.obsm["<key_added>_<gene>"]`` (``/`` in a gene
        name becomes ``_``: .h5ad keys cannot hold it). Genes whose keys would then be the same
        (``"A/B"`` and ``"A_B"``) raise a ``ValueError`` before anything is computed; perturb
        them in separate runs with different ``key_added``.
    key_added
        Where results go: a string without ``/``, neither empty nor blank (``ValueError``
        before anything is computed; .h5ad files cannot read such keys back), and not ``"sct"``,
        which holds the run records of every tool. The results of an earlier run with the same
        ``key_added``, its cell shifts included, are replaced.
    copy
        Return a modified copy instead of writing into ``adata`` (which is left untouched). As
        :meth:`anndata.AnnData.copy`, this refuses a backed AnnData (``ValueError``, before
        anything is computed): load it with ``adata.to_memory()``, or pass ``copy=False`` to write
        the results into the backed object's in-memory ``.uns`` and ``.obsm``.

    Returns
    -------
    The modified copy of ``adata`` if ``copy``, else the summary table (one row per gene and
    group, see :class:`~sctransformer.model.PerturbationResult`); written:

    ``.uns["<key_added>"]``
        ``{"summary": table, "expression_change": DataFrame (rows the vocabulary genes, columns
        the table's rows by position, ``"0"``, ``"1"``, ...), "mode": mode}``: genes as rows,
        because anndata writes each column under its own key, which cannot hold a ``/``.
    ``.obsm["<key_added>_<gene>"]``
        With ``store_cell_shifts``: perturbed minus original embedding (zero where not
        perturbed), for each gene perturbed in at least one cell.
        Those of an earlier run with the same ``key_added`` are removed.
    ``.uns["sct"][key_added]``
        The parameters of the run (``"params"``, ``"genes"`` as asked for, each once) and, in ``"cell_shift_keys"``, the ``.obsm``
        keys of the cell shifts it wrote (empty without ``store_cell_shifts``).
    """
    refuse_backed_copy(adata, copy)
    check_key_added(key_added)
    if key_added == KEYS.UNS:
        raise ValueError(
            f"key_added {KEYS.UNS!r} is where sctransformer records every tool's runs "
            f"(adata.uns[{KEYS.UNS!r}]); pass another name, such as the default {KEYS.PERTURBATION!r}"
        )
    genes = [genes] if isinstance(genes, str) else list(genes)
    if store_cell_shifts:  # before the run: genes whose .obsm keys would be the same
        check_distinct_keys(key_added, genes, "genes", ".obsm")
    result = model.perturb(
        adata,
        genes,
        mode=mode,
        value=value,
        groupby=groupby,
        predict_expression=predict_expression,
        n_folds=n_folds,
        n_top=n_top,
        batch_size=batch_size,
        return_cell_shifts=store_cell_shifts,
    )
    adata = adata.copy() if copy else adata
    for key in _previous_cell_shift_keys(adata, key_added):
        adata.obsm.pop(key, None)
    summary = result.summary
    # a copy: the rows of expression_change are matched to the summary's by position, so sorting the
    # returned table in place must not reorder the stored one
    stored: dict[str, Any] = {"summary": summary.copy(), "mode": mode}
    if result.expression_change is not None:
        stored["expression_change"] = (
            result.expression_change.reset_index(drop=True).set_axis(summary.index.astype(str), axis=0).T
        )
    adata.uns[key_added] = stored
    shift_keys = []
    for gene, shifts in result.cell_shifts.items():
        shift_keys.append(suffixed_key(key_added, gene))
        adata.obsm[shift_keys[-1]] = shifts
    record_run(
        adata,
        key_added,
        "perturb",
        model,
        {
            "genes": [str(gene) for gene in dict.fromkeys(genes)],
            "mode": mode,
            "value": value,
            "groupby": groupby,
            "n_folds": n_folds,
        },
        extra={"cell_shift_keys": shift_keys},
    )
    return adata if copy else summary


def _previous_cell_shift_keys(adata: AnnData, key_added: str) -> list[str]:
    """``.obsm`` keys of the cell shifts of the last :func:`perturb` run with ``key_added``.

    Records of versions that did not list them give the keys of their perturbed genes.
    """
    run = previous_run(adata, key_added, "perturb")
    if not run:
        return []
    if "cell_shift_keys" in run:
        keys = run["cell_shift_keys"]
    else:
        keys = [suffixed_key(key_added, gene) for gene in np.ravel(run.get("params", {}).get("genes", []))]
    return [str(key) for key in np.ravel(np.asarray(keys, dtype=object))]


def predict_response(
    adata: AnnData,
    model: GeneTransformer,
    set: dict[str, Any],  # the name users write: predict_response(adata, m, set={...})
    *,
    genes: Sequence[str] | None = None,
    n_folds: int = 4,
    refine_rounds: int = 0,
    batch_size: int | None = None,
) -> AnnData:
    """Predict how ``adata``'s cells would look with phenotype tokens swapped (e.g. ``{"condition": "stim"}``).

    See :meth:`~sctransformer.GeneTransformer.predict_response` for the method. ``adata`` is not
    modified.

    Parameters
    ----------
    adata
        The cells to transform (e.g. the control cells), counts in the model's layer.
    model
        Trained :class:`~sctransformer.GeneTransformer` with ``expression_queries > 0``.
    set
        ``{key: category}`` fed to every cell, e.g. ``{"condition": "stim"}``.
    genes
        Genes to predict; default the vocabulary genes among ``adata``'s columns.
    n_folds
        Folds of the vocabulary genes held out in turn (as
        :meth:`~sctransformer.GeneTransformer.get_normalized_expression`).
    refine_rounds
        Rounds of counterfactual refinement (each cell given its predicted profile and predicted
        again); ``0``: the plain swap.
    batch_size
        Cells per minibatch; default ``sctransformer.settings.batch_size``.

    Returns
    -------
    AnnData of the same cells and ``genes``: ``X`` the predicted expression after the swap,
    ``layers["sct_baseline"]`` the prediction with the cells' own phenotypes, in
    ``log1p(count / library * 1e4)``; ``.obs`` copied; ``uns["sct_response"]`` the swap.
    """
    return model.predict_response(
        adata, set, genes=genes, n_folds=n_folds, refine_rounds=refine_rounds, batch_size=batch_size
    )
