"""Phenotype predictions into ``.obs`` / ``.obsm``."""

from __future__ import annotations

import pandas as pd
from anndata import AnnData

from sctransformer._keys import KEYS, confidence_key, prediction_key
from sctransformer.model import GeneTransformer

from ._utils import record_run


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


def predict(
    adata: AnnData,
    model: GeneTransformer,
    *,
    phenotype: str | list[str] | None = None,
    key_added: str = KEYS.PREDICTION,
    batch_size: int | None = None,
    copy: bool = False,
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
    key_added
        Prefix of the written keys.
    batch_size
        Cells per minibatch.
    copy
        Return a modified copy instead of writing into ``adata``.

    Returns
    -------
    ``adata`` (or its copy) if ``copy``, else ``None``; sets, for each phenotype ``<key>``,

    ``.obs["<key_added>_<key>"]``
        Predicted label (categorical, with the model's categories).
    ``.obs["<key_added>_<key>_confidence"]``
        Probability of the predicted label.
    ``.obsm["<key_added>_<key>_probs"]``
        DataFrame of the probability of every category.
    ``.uns["<key_added>_<key>_colors"]``
        The colours of ``.uns["<key>_colors"]``, when the AnnData has them, so that true and
        predicted labels share colours in plots.
    ``.uns["sct"][key_added]``
        The parameters of the run.
    """
    table, probabilities = model.predict(
        adata, phenotype=phenotype, batch_size=batch_size, return_probabilities=True
    )
    adata = adata.copy() if copy else adata
    for key, probs in probabilities.items():
        adata.obs[prediction_key(key_added, key)] = table[key].array  # keeps the categories
        adata.obs[confidence_key(key_added, key)] = table[f"{key}_confidence"].to_numpy()
        adata.obsm[f"{prediction_key(key_added, key)}_probs"] = probs
        _reuse_colors(adata, key, prediction_key(key_added, key))
    record_run(adata, key_added, "predict", model, {"phenotypes": list(probabilities)})
    return adata if copy else None
