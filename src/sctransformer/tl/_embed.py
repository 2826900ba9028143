"""Cell embeddings into ``.obsm``."""

from __future__ import annotations

from typing import Literal

from anndata import AnnData

from sctransformer._keys import KEYS
from sctransformer.data import ShardedAnnData
from sctransformer.model import GeneTransformer
from sctransformer.module import Pooling

from ._utils import check_key_added, counts_of, record_run, refuse_backed_copy


def embed(
    adata: AnnData,
    model: GeneTransformer,
    *,
    key_added: str = KEYS.EMBEDDING,
    pooling: Pooling | None = None,
    batch_size: int | None = None,
    copy: bool = False,
    counts: ShardedAnnData | None = None,
    batch: str | None = None,
    space: Literal["cell", "aligned", "aligned_other"] = "cell",
) -> AnnData | None:
    """Embed cells with a trained model.

    Parameters
    ----------
    adata
        AnnData holding counts in the model's layer (need not be set up). Not a view of a backed
        AnnData, which the results cannot be written into (load the subset first with
        ``.to_memory()``).
    model
        Trained :class:`~sctransformer.GeneTransformer`.
    key_added
        ``.obsm`` key to write (without ``/``, which .h5ad cannot read back).
    pooling
        ``"profile"``, ``"cls"`` or ``"mean"``; default the model's
        (:meth:`~sctransformer.GeneTransformer.get_latent_representation`).
    batch_size
        Cells per minibatch.
    copy
        Return a modified copy instead of writing into ``adata``.
    counts
        Read the counts of ``adata``'s cells (the same cells, in order) from these files instead of
        from ``adata``, for data too large to load: ``adata`` then needs only its ``.obs`` (its
        cell names are checked against the shards', or against them made unique by
        ``obs_names_make_unique()``). With ``batch="own"`` each cell's batch is
        read from the shards, which must then be read with ``batch_key``.
    batch
        The ``[BATCH]`` token of models with one: ``None`` ("no batch"), a batch name, or
        ``"own"``, see :meth:`~sctransformer.GeneTransformer.get_latent_representation`.
    space
        ``"cell"``, or for a model aligned with a second modality ``"aligned"`` (the cells'
        transcriptome side in the shared space) or ``"aligned_other"`` (their second modality's
        side, from ``adata.obsm[align_obsm]``); write both under different ``key_added``.

    Returns
    -------
    ``adata`` (or its copy) if ``copy``, else ``None``; sets

    ``.obsm[key_added]``
        Cells x ``d_model`` embedding (cells x ``align_dim`` for the aligned spaces).
    ``.uns["sct"][key_added]``
        The parameters of the run.
    """
    refuse_backed_copy(adata, copy)
    check_key_added(key_added)
    if space != "cell":  # the aligned spaces project the default cell embedding
        embedding = model.get_latent_representation(
            adata if space == "aligned_other" else counts_of(adata, counts),
            pooling=pooling,
            batch_size=batch_size,
            batch=batch,
            space=space,
        )
    else:
        pooling = model.default_pooling if pooling is None else pooling
        embedding = model.get_latent_representation(
            counts_of(adata, counts), pooling=pooling, batch_size=batch_size, batch=batch
        )
    adata = adata.copy() if copy else adata
    adata.obsm[key_added] = embedding
    record_run(adata, key_added, "embed", model, {"pooling": pooling, "batch": batch, "space": space})
    return adata if copy else None
