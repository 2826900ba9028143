"""Gene-gene graphs from attention (``.varp``), gene embeddings (``.varm``) and gene modules."""

from __future__ import annotations

import warnings
from typing import Literal

import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp
import torch
from anndata import AnnData

from sctransformer._keys import KEYS
from sctransformer.data._validation import _looks_like_counts, positive_int
from sctransformer.model import GeneTransformer

from ._utils import (
    check_distinct_keys,
    check_key_added,
    forget_run,
    previous_run,
    record_run,
    recorded_runs,
    refuse_backed_copy,
    suffixed_key,
)

Normalize = Literal["coexpression", "none"]
Layers = Literal["first", "last", "all"] | int | list[int]
Heads = Literal["mean", "max"]
Score = Literal["attention", "co-attention"]

#: Row block of the final scoring pass, in bytes of one dense float64 block (bounds its memory).
_BLOCK_BYTES = 64 * 2**20


class AttentionAccumulator:
    """Running sum over cells of gene -> gene attention, and which genes each cell had as tokens.

    Holds one dense float32 ``n_genes x n_genes`` sum (``4 n_genes^2`` bytes: 1.6 GB for 20,000
    genes, independent of the number of cells) and a sparse cells x genes membership matrix
    (one entry per kept token). Nothing of size ``n_genes^2`` is made per minibatch.

    Parameters
    ----------
    n_genes
        Number of genes of the graph.
    normalize
        ``"coexpression"``: each cell's attention is multiplied by its number of gene tokens
        (``1`` = attention spread evenly over the gene tokens; spread evenly over the prefix
        tokens as well, it scores ``L / (L + n_prefix)``), summed, and later divided by the number of cells in which
        both genes are tokens: the mean attention enrichment where the pair can attend at all.
        ``"none"``: raw attention probabilities, later divided by the number of cells (absent
        pairs count as zero, which favours genes expressed in most cells).
    """

    def __init__(self, n_genes: int, normalize: Normalize = "coexpression") -> None:
        if normalize not in ("coexpression", "none"):
            raise ValueError(f"normalize must be 'coexpression' or 'none', got {normalize!r}")
        self.n_genes = n_genes
        self.normalize = normalize
        self.total = torch.zeros(n_genes * n_genes, dtype=torch.float32)
        self.n_cells = 0
        self._membership: list[sp.csr_matrix] = []

    def add(self, genes: torch.Tensor, attention: torch.Tensor) -> None:
        """Add a minibatch.

        Parameters
        ----------
        genes
            ``(n, length)`` graph index of each token's gene; ``-2`` for tokens of genes outside
            the graph (they count towards the cell's number of gene tokens), ``-1`` for padding.
        attention
            ``(n, length, length)`` attention of token ``i`` to token ``j``.
        """
        genes = genes.cpu()
        attention = attention.detach().float().cpu()
        n, length = genes.shape
        if self.normalize == "coexpression":
            n_tokens = (genes != -1).sum(1).to(attention.dtype)
            attention = attention * n_tokens[:, None, None]
        in_graph = genes >= 0
        pair = in_graph[:, :, None] & in_graph[:, None, :]
        pair &= ~torch.eye(length, dtype=torch.bool)[None]
        cell, row, col = pair.nonzero(as_tuple=True)
        flat = genes[cell, row] * self.n_genes + genes[cell, col]
        self.total.index_put_((flat,), attention[cell, row, col], accumulate=True)
        cells, slots = in_graph.nonzero(as_tuple=True)
        self._membership.append(
            sp.csr_matrix(
                (np.ones(len(cells), np.float32), (cells.numpy(), genes[cells, slots].numpy())),
                shape=(n, self.n_genes),
            )
        )
        self.n_cells += n

    def graph(self, top_k: int, *, min_cells: int = 10, symmetrize: bool = True) -> sp.csr_matrix:
        """The top-``top_k`` edges of each gene as a CSR ``n_genes x n_genes`` matrix.

        Parameters
        ----------
        top_k
            Edges kept per gene (its highest positive scores; fewer if it has fewer).
        min_cells
            Pairs that are tokens together in fewer cells get no edge (their mean is noise).
        symmetrize
            Score a pair by the mean of both directions, ``(s_ij + s_ji) / 2``, and keep an edge
            when it is among the top ``top_k`` of either gene, so the graph is symmetric;
            otherwise row ``i`` holds gene ``i``'s own top ``top_k`` targets.
        """
        n = self.n_genes
        total = self.total.view(n, n).numpy()
        membership = _stacked(self._membership, n)

        def score(start: int, stop: int) -> np.ndarray:
            together = np.asarray((membership[:, start:stop].T @ membership).todense(), dtype=np.float64)
            summed = total[start:stop].astype(np.float64)
            if symmetrize:
                summed = (summed + total[:, start:stop].T) / 2
            if self.normalize == "coexpression":
                block = np.divide(summed, together, out=np.zeros_like(summed), where=together > 0)
            else:
                block = summed / max(self.n_cells, 1)
            block[together < min_cells] = 0
            return block

        return _top_k_graph(score, n, top_k, symmetrize=symmetrize)


class CoAttentionAccumulator:
    """Each cell's ``[CLS]`` attention to its gene tokens, as a sparse cells x genes matrix.

    The graph scores a pair of genes by the Pearson correlation, over cells, of the attention the
    ``[CLS]`` token pays to each (``0`` in cells where a gene is not a token): genes the model
    reads together when it summarises a cell. Memory: one entry per kept token (no
    ``n_genes^2`` sum); the scoring works in row blocks.

    Parameters
    ----------
    n_genes
        Number of genes of the graph.
    """

    def __init__(self, n_genes: int) -> None:
        self.n_genes = n_genes
        self._rows: list[sp.csr_matrix] = []

    def add(self, genes: torch.Tensor, attention: torch.Tensor) -> None:
        """Add a minibatch.

        Parameters
        ----------
        genes
            ``(n, length)`` graph index of each token's gene; ``-2`` for genes outside the graph,
            ``-1`` for padding.
        attention
            ``(n, length)`` attention of the ``[CLS]`` token to each token.
        """
        genes = genes.cpu()
        attention = attention.detach().float().cpu()
        cells, slots = (genes >= 0).nonzero(as_tuple=True)
        self._rows.append(
            sp.csr_matrix(
                (attention[cells, slots].numpy(), (cells.numpy(), genes[cells, slots].numpy())),
                shape=(genes.shape[0], self.n_genes),
            )
        )

    def graph(self, top_k: int, *, min_cells: int = 10) -> sp.csr_matrix:
        """The top-``top_k`` edges of each gene (correlation > 0), symmetric, as CSR.

        Parameters
        ----------
        top_k
            Edges kept per gene; an edge is kept when it is among the top ``top_k`` of either gene.
        min_cells
            Pairs that are tokens together in fewer cells get no edge.
        """
        n = self.n_genes
        attention = _stacked(self._rows, n).astype(np.float64)
        membership = attention.copy()
        membership.data[:] = 1.0
        n_cells = max(attention.shape[0], 1)
        mean = np.asarray(attention.mean(0)).ravel()
        spread = np.sqrt(np.maximum(np.asarray(attention.multiply(attention).mean(0)).ravel() - mean**2, 0))

        def score(start: int, stop: int) -> np.ndarray:
            cross = np.asarray((attention[:, start:stop].T @ attention).todense()) / n_cells
            covariance = cross - mean[start:stop, None] * mean[None, :]
            scale = spread[start:stop, None] * spread[None, :]
            block = np.divide(covariance, scale, out=np.zeros_like(covariance), where=scale > 0)
            together = np.asarray((membership[:, start:stop].T @ membership).todense())
            block[together < min_cells] = 0
            return block

        return _top_k_graph(score, n, top_k, symmetrize=True)


def _stacked(rows: list[sp.csr_matrix], n_genes: int) -> sp.csc_matrix:
    """Minibatches of cells x genes rows as one CSC matrix (column slices are cheap)."""
    return sp.vstack(rows).tocsc() if rows else sp.csc_matrix((0, n_genes))


def _check_scorable(adata: AnnData, what: str, alternative: str = "") -> None:
    """Raise unless ``adata.X`` holds in-memory values that module scores can be computed from.

    Parameters
    ----------
    adata
        The AnnData whose ``.X`` is read.
    what
        The call that reads it, named in the messages.
    alternative
        A way to do without ``.X`` (e.g. ``"or skip the scores: ..."``), appended to the messages;
        empty where there is none.
    """
    tail = f"; {alternative}" if alternative else ""
    if adata.X is None:
        raise ValueError(
            f"{what} reads log-normalised expression from adata.X, which is empty; put it there "
            f"(e.g. adata.X = adata.layers[...]){tail}"
        )
    if getattr(adata, "isbacked", False):
        raise ValueError(
            f"{what} cannot read adata.X of a backed AnnData; load it first with "
            f"adata = adata.to_memory(){tail}"
        )
    if _looks_like_counts(adata.X):  # e.g. counts in X for label-free pre-training
        warnings.warn(
            f"adata.X looks like raw counts; {what} reads log-normalised expression from it (scores "
            "of counts weigh highly expressed genes and large cells most). Normalise first: "
            "sc.pp.normalize_total(adata); sc.pp.log1p(adata) (keep the counts in a layer)"
            f"{tail}",
            UserWarning,
            stacklevel=3,
        )


def _top_k_graph(score, n: int, top_k: int, *, symmetrize: bool) -> sp.csr_matrix:
    """Each gene's ``top_k`` highest positive scores as CSR, ``score(start, stop)`` giving row blocks.

    The blocks (``stop - start`` dense float64 rows) are sized to ``_BLOCK_BYTES``; the diagonal
    is left out. With ``symmetrize`` an edge is kept when it is among either gene's top ``top_k``.
    """
    block = max(1, _BLOCK_BYTES // (8 * max(n, 1)))
    rows, cols, vals = [], [], []
    k = min(positive_int(top_k, "top_k"), n - 1)
    for start in range(0, n, block):
        stop = min(start + block, n)
        scores = score(start, stop)
        scores[np.arange(stop - start), np.arange(start, stop)] = 0
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k > 0 else np.zeros((stop - start, 0), int)
        top_scores = np.take_along_axis(scores, top, 1)
        keep = top_scores > 0
        rows.append(np.repeat(np.arange(start, stop), keep.sum(1)))
        cols.append(top[keep])
        vals.append(top_scores[keep])
    graph = sp.csr_matrix(
        (np.concatenate(vals or [[]]), (np.concatenate(rows or [[]]), np.concatenate(cols or [[]]))),
        shape=(n, n),
        dtype=np.float32,
    )
    if symmetrize:
        graph = graph.maximum(graph.T).tocsr()
    graph.sort_indices()
    return graph


def _graph_genes(
    adata: AnnData, model: GeneTransformer, genes: str | list[str] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Columns of ``adata`` in the graph, and the vocabulary -> graph index map (``-2`` outside)."""
    column_to_gene = model._column_to_gene(adata)
    if genes is None:
        columns = np.flatnonzero(column_to_gene >= 0)
    else:
        names = [genes] if isinstance(genes, str) else list(genes)
        missing = [g for g in names if g not in adata.var_names]
        if missing:
            raise KeyError(f"genes not in adata.var_names: {missing[:10]}; pass names of adata's genes")
        requested = adata.var_names.isin(names)
        ambiguous = sorted(set(adata.var_names[requested][adata.var_names[requested].duplicated()]))
        if ambiguous:
            raise ValueError(
                f"genes named by more than one column of adata.var_names: {ambiguous[:10]}; "
                "make adata.var_names unique (adata.var_names_make_unique()) to choose among them"
            )
        columns = np.flatnonzero(requested)
        outside = columns[column_to_gene[columns] < 0]
        if len(outside):
            raise ValueError(
                f"genes not in the model's vocabulary: {list(adata.var_names[outside][:10])}; "
                "the model has never seen them"
            )
    if len(columns) < 2:
        raise ValueError("a gene graph needs at least 2 genes of adata in the model's vocabulary")
    vocabulary_to_graph = np.full(len(model.vocabulary_), -2, dtype=np.int64)
    vocabulary_to_graph[column_to_gene[columns]] = np.arange(len(columns))
    return columns, vocabulary_to_graph


def _accumulate(
    adata: AnnData,
    model: GeneTransformer,
    vocabulary_to_graph: np.ndarray,
    n_genes: int,
    *,
    layers: Layers,
    heads: Heads,
    normalize: Normalize,
    batch_size: int | None,
    score: Score = "attention",
) -> AttentionAccumulator | CoAttentionAccumulator:
    """Run every cell of ``adata`` through the model and add its attention (``score``)."""
    if score == "attention":  # gene token rows
        accumulator, rows = AttentionAccumulator(n_genes, normalize), "genes"
    else:  # the [CLS] row
        accumulator, rows = CoAttentionAccumulator(n_genes), "cls"
    lookup = torch.as_tensor(vocabulary_to_graph)
    for _, tokens, attention in model._gene_attention(
        adata, layers=layers, heads=heads, batch_size=batch_size, rows=rows
    ):
        genes = lookup[tokens.gene_ids.cpu()].masked_fill(~tokens.is_token.cpu(), -1)
        accumulator.add(genes, attention)
    return accumulator


def _module_score(light: AnnData, members: list[str], name: str, random_state: int) -> np.ndarray:
    """Each cell's :func:`scanpy.tl.score_genes` score for one module's ``members``.

    Control genes are other genes at the members' expression levels (25 bins). Where no other gene
    is at those levels (a module of nearly every gene), the bins are widened (2 bins) with a warning,
    and if there is still none the module's scores are NaN, with a warning.
    """
    ctrl_size = max(1, min(50, light.n_vars - len(members)))
    for fallback in ({}, {"ctrl_as_ref": False, "n_bins": 2}):
        try:
            sc.tl.score_genes(
                light, members, ctrl_size=ctrl_size, random_state=random_state, score_name=name, **fallback
            )
        except RuntimeError as error:  # scanpy: "No control genes found in any cut"
            if isinstance(error, NotImplementedError) or "control genes" not in str(error):
                raise
            continue
        if fallback:
            warnings.warn(
                f"module {name} ({len(members)} of {light.n_vars} genes): no other gene is expressed at its "
                "genes' levels, so its control genes were drawn from 2 wide expression bins; its score is "
                "less specific. A higher resolution gives smaller modules.",
                UserWarning,
                stacklevel=3,
            )
        return light.obs[name].to_numpy()
    warnings.warn(
        f"module {name} ({len(members)} of {light.n_vars} genes): no control genes outside it, so no score "
        "(NaN). A higher resolution gives smaller modules.",
        UserWarning,
        stacklevel=3,
    )
    return np.full(light.n_obs, np.nan)


def gene_graph(
    adata: AnnData,
    model: GeneTransformer,
    *,
    groupby: str | None = None,
    genes: list[str] | None = None,
    score: Score = "co-attention",
    layers: Layers | None = None,
    heads: Heads = "mean",
    normalize: Normalize = "coexpression",
    top_k: int = 20,
    min_cells: int = 10,
    min_group_size: int = 50,
    symmetrize: bool = True,
    batch_size: int | None = None,
    key_added: str = KEYS.GENE_GRAPH,
    copy: bool = False,
) -> AnnData | None:
    """Gene-gene graph from the model's attention among the genes that cells express.

    Each cell is a sentence of its expressed genes (at most ``max_length``); a forward pass gives,
    per layer and head, attention probabilities over the cell's tokens (softmax over all tokens,
    prefix tokens included; phenotype tokens masked). Heads are combined by ``heads``, the chosen
    ``layers`` averaged. Two readings (``score``):

    ``"co-attention"`` (default)
        The score of genes ``i`` and ``j`` is the Pearson correlation, over the cells, of the
        attention ``a_c(CLS -> i)`` and ``a_c(CLS -> j)`` that the ``[CLS]`` token (the cell
        summary, trained to predict the cell's masked values) pays to each (``0`` where a gene is
        not a token of the cell): genes the model reads together when it summarises a cell.
        Symmetric; an edge is kept when it is among either gene's ``top_k`` positive
        correlations; pairs that are tokens together in fewer than ``min_cells`` cells get none.
        ``normalize`` and ``symmetrize`` do not apply. Memory: one value per token, no
        ``n_genes^2`` sum.
    ``"attention"``
        Gene token -> gene token attention ``a_c(i -> j)``. With ``normalize="coexpression"``
        (default) the score of ``i -> j`` is

        ``s_ij = mean over cells c where both are tokens of  L_c * a_c(i -> j)``

        with ``L_c`` the cell's number of gene tokens, so ``1`` means "as much as attention spread
        evenly over the gene tokens" (evenly over every token, prefix included, scores
        ``L_c / (L_c + n_prefix)``, a little below 1) and how often two genes are expressed
        together does not enter the score (raw mean attention favours ubiquitous genes); pairs
        together in fewer than ``min_cells`` cells get no edge. Rows are not re-normalised. With
        ``symmetrize`` the pair's score is ``(s_ij + s_ji) / 2`` and an edge is kept when it is
        among either gene's ``top_k``. Memory: one dense float32 ``n_genes x n_genes`` sum.

    On four labelled data sets (``benchmarks/gene_graph.py``, ``docs/benchmarks.md``; small
    self-supervised models) co-attention of the first layer links marker genes of the same cell
    type 0.90-1.07 times as often as a Pearson co-expression graph of as many edges, and 3-27
    times as often as gene -> gene attention, which is near chance. **Most of that is not learned:**
    the same graph from the model's initial weights links 0.93-1.05 times as many, because the
    first layer's ``[CLS]`` attention to a gene is a function of the gene's own binned value
    (through the softmax over the cell's tokens), so its correlation over cells is a co-expression
    of those values. Read the graph as co-expression as the model encodes it, not as relations
    the model has discovered.

    Parameters
    ----------
    adata
        AnnData with counts in the model's layer (need not be set up).
    model
        Trained :class:`~sctransformer.GeneTransformer`.
    groupby
        Name of an ``.obs`` column: one graph per group, from that group's cells only, in
        ``.varp[f"{key_added}_{group}"]`` (``/`` in a group name becomes ``_``). Groups with fewer
        than ``min_group_size`` cells are skipped with a warning. Groups whose keys would be the
        same (``"A/B"`` and ``"A_B"``, or ``1`` and ``"1"`` in a column of mixed types) raise a
        ``ValueError`` before anything is computed.
    genes
        Genes of the graph (names in ``adata.var_names``); default every gene of ``adata`` in the
        model's vocabulary. With ``score="attention"`` memory is ``4 n_genes^2`` bytes (1.6 GB for
        20,000 genes): pass e.g. the highly variable genes for less. Other genes still take part in
        the attention.
    score
        ``"co-attention"`` (correlation over cells of the ``[CLS]`` token's attention) or
        ``"attention"`` (gene token -> gene token), see above.
    layers
        ``"first"``, ``"last"``, ``"all"``, a block index or a list of them (averaged). Default:
        ``"first"`` for co-attention, ``"last"`` for gene -> gene attention, the better of the two
        on the benchmark for each (co-attention of the last layer links 1-29% fewer same-type markers).
    heads
        ``"mean"`` or ``"max"`` over heads.
    normalize
        ``score="attention"`` only: ``"coexpression"`` or ``"none"`` (mean raw attention over all
        cells), see above.
    top_k
        Edges kept per gene; ``1 <= top_k < n_genes``.
    min_cells
        Minimum number of cells in which both genes are tokens for an edge (more than the cells
        is refused; a graph left without edges, e.g. of a group this small, warns).
    min_group_size
        Smallest group given its own graph with ``groupby``: a positive integer (``1`` gives
        every group a graph).
    symmetrize
        ``True`` or ``False``; ``score="attention"`` only: make the graph symmetric (see above).
    batch_size
        Cells per minibatch.
    key_added
        ``.varp`` key (prefix with ``groupby``): a string without ``/``, neither empty nor blank.
    copy
        Return a modified copy instead of writing into ``adata``.

    Returns
    -------
    ``adata`` (or its copy) if ``copy``, else ``None``; sets

    ``.varp[key_added]`` (or ``.varp[f"{key_added}_{group}"]`` per group)
        Sparse CSR ``n_vars x n_vars`` scores (rows of genes outside the graph are empty).
    ``.uns["sct"][key]``
        The parameters of the run, under the key of each graph written (with ``groupby``, also
        its ``group``), and ``"genes"``: the names of the graph's genes (:func:`sctransformer.pl.gene_graph`
        refuses others). A grouped run replaces the graphs of an earlier grouped run of the same
        ``key_added`` (a group now skipped loses its old graph); the ungrouped graph stays.
    """
    refuse_backed_copy(adata, copy)
    check_key_added(key_added)
    model._inference_adata(adata)  # checks the counts
    columns, vocabulary_to_graph = _graph_genes(adata, model, genes)
    n_genes = len(columns)
    if isinstance(top_k, bool) or not isinstance(top_k, int | np.integer) or not 1 <= top_k < n_genes:
        raise ValueError(f"top_k must be an integer in [1, {n_genes}) (the graph's genes), got {top_k!r}")
    min_cells = positive_int(min_cells, "min_cells")
    min_group_size = positive_int(min_group_size, "min_group_size")
    if not isinstance(symmetrize, bool | np.bool_):
        raise TypeError(f"symmetrize must be True or False, got {symmetrize!r}")
    if score not in ("attention", "co-attention"):
        raise ValueError(f"score must be 'attention' or 'co-attention', got {score!r}")
    if normalize not in ("coexpression", "none"):
        raise ValueError(f"normalize must be 'coexpression' or 'none', got {normalize!r}")
    if layers is None:
        layers = "first" if score == "co-attention" else "last"
    # layers and heads (GeneTransformer._gene_attention) are checked where they are used, before
    # the first forward pass
    if groupby is None:
        if min_cells > adata.n_obs:
            raise ValueError(
                f"min_cells={min_cells} is more than the {adata.n_obs} cells, so no pair of genes could get an "
                "edge; lower min_cells"
            )
        subsets = {key_added: (None, np.arange(adata.n_obs))}
    else:
        if not isinstance(groupby, str):
            raise TypeError(
                f"groupby must be the name of one column of adata.obs (a str), got {groupby!r}; "
                "for several columns, combine them into one first"
            )
        if groupby not in adata.obs:
            raise KeyError(f"groupby={groupby!r} is not a column of adata.obs")
        labels = adata.obs[groupby]
        if labels.isna().any():
            raise ValueError(f"adata.obs[{groupby!r}] has missing values; fill or drop those cells")
        groups = {}
        for group, idx in labels.groupby(labels, observed=True).indices.items():
            if len(idx) < min_group_size:
                warnings.warn(
                    f"group {group!r} of {groupby!r} has {len(idx)} cells (< min_group_size="
                    f"{min_group_size}); no graph for it",
                    UserWarning,
                    stacklevel=2,
                )
                continue
            groups[group] = idx
        if not groups:
            raise ValueError(f"no group of {groupby!r} has min_group_size={min_group_size} cells")
        check_distinct_keys(
            key_added,
            groups,
            f"groups of {groupby!r}",
            ".varp",
            fix=(
                "rename them (labels of different types, such as 1 and '1', are made one group by "
                f"adata.obs[{groupby!r}] = adata.obs[{groupby!r}].astype(str))"
            ),
        )
        subsets = {suffixed_key(key_added, group): (group, idx) for group, idx in groups.items()}

    graphs = {}  # .varp key -> graph, one per entry of subsets (checked distinct above)
    for key, (group, idx) in subsets.items():
        cells = adata if group is None else adata[idx]
        accumulator = _accumulate(
            cells,
            model,
            vocabulary_to_graph,
            n_genes,
            layers=layers,
            heads=heads,
            normalize=normalize,
            batch_size=batch_size,
            score=score,
        )
        options = {"symmetrize": symmetrize} if score == "attention" else {}  # co-attention: symmetric
        small = accumulator.graph(top_k, min_cells=min_cells, **options).tocoo()
        full = sp.csr_matrix(
            (small.data, (columns[small.row], columns[small.col])), shape=(adata.n_vars, adata.n_vars)
        )
        full.sort_indices()
        if full.nnz == 0:
            where = "" if group is None else f" of group {group!r} of {groupby!r} ({len(idx)} cells)"
            warnings.warn(
                f"the graph{where} has no edges: no pair of its genes scores above 0 with both genes tokens "
                f"together in at least min_cells={min_cells} cells; lower min_cells",
                UserWarning,
                stacklevel=2,
            )
        graphs[key] = full

    adata = adata.copy() if copy else adata
    if groupby is not None:  # the graphs of an earlier grouped run of key_added go: this run replaces them
        runs = dict(recorded_runs(adata))  # a copy: a view's .uns may share its parent's dict
        earlier = {k: previous_run(adata, k, "gene_graph").get("params", {}) for k in runs}
        stale = [
            k
            for k, params in earlier.items()
            if params.get("key_added") == key_added and params.get("groupby") is not None and k not in graphs
        ]
        for key in stale:  # its graph and record go; other tools' records of the key stay
            adata.varp.pop(key, None)
            forget_run(runs, key, "gene_graph")
        if stale:
            adata.uns[KEYS.UNS] = runs
    for key, graph in graphs.items():
        adata.varp[key] = graph
    params = {
        "key_added": key_added,
        "groupby": groupby,
        "n_genes": n_genes,
        "score": score,
        "layers": layers if isinstance(layers, str) else list(np.atleast_1d(layers).astype(int).tolist()),
        "heads": heads,
        "normalize": normalize if score == "attention" else None,
        "top_k": int(top_k),
        "min_cells": int(min_cells),
        "symmetrize": bool(symmetrize) if score == "attention" else True,
    }
    # the genes of the graph, by name (pl.gene_graph refuses others)
    covered = {"genes": [str(name) for name in adata.var_names[columns]]}
    for key, (group, _) in subsets.items():  # one record per graph, under its own key
        record_run(
            adata,
            key,
            "gene_graph",
            model,
            params | ({} if group is None else {"group": str(group)}),
            covered,
        )
    return adata if copy else None


def gene_embedding(
    adata: AnnData,
    model: GeneTransformer,
    *,
    kind: Literal["identity", "contextual"] = "identity",
    batch_size: int | None = None,
    key_added: str | None = None,
    copy: bool = False,
) -> AnnData | None:
    """Gene embeddings into ``.varm``.

    They relate genes of the same cell type only in a model trained to predict genes from the
    rest of the cell (``GeneTransformer(gene_prediction=0.15)``): on kang18, cosine similarity
    of contextual embeddings ranks same-type marker pairs with AUROC 0.81 with it and 0.67
    without (Pearson co-expression 0.88; see the benchmarks).

    Parameters
    ----------
    adata
        AnnData with the model's genes (any subset or order; need not be set up).
    model
        Trained :class:`~sctransformer.GeneTransformer`.
    kind
        ``"identity"``: the row of the model's gene-identity embedding table (no forward pass);
        ``"contextual"``: the final hidden state of the gene's token, averaged over the cells of
        ``adata`` in which it is a token.
    batch_size
        Cells per minibatch (``"contextual"``).
    key_added
        ``.varm`` key; default ``"sct_gene_embedding"`` or ``"sct_gene_embedding_contextual"``.
    copy
        Return a modified copy instead of writing into ``adata``.

    Returns
    -------
    ``adata`` (or its copy) if ``copy``, else ``None``; sets

    ``.varm[key_added]``
        Genes x ``d_model`` float32; rows of genes outside the vocabulary (or, contextual, never
        a token in these cells) are zero and listed in
    ``.var[f"{key_added}_defined"]``
        ``False`` for those rows.
    ``.uns["sct"][key_added]``
        The parameters of the run.
    """
    refuse_backed_copy(adata, copy)
    if kind not in ("identity", "contextual"):
        raise ValueError(f"kind must be 'identity' or 'contextual', got {kind!r}")
    if not isinstance(adata, AnnData):
        raise TypeError(f"adata must be an AnnData, got {type(adata).__name__}")
    if key_added is None:
        key_added = KEYS.GENE_EMBEDDING if kind == "identity" else f"{KEYS.GENE_EMBEDDING}_contextual"
    check_key_added(key_added)
    column_to_gene = model._column_to_gene(adata)
    known = column_to_gene >= 0
    d_model = model.hyperparameters_["d_model"]
    out = np.zeros((adata.n_vars, d_model), dtype=np.float32)
    if kind == "identity":
        table = model.module.gene_embedding.weight.detach().float().cpu().numpy()
        out[known] = table[column_to_gene[known]]
        defined = known
    else:
        n_vocab = len(model.vocabulary_)
        total = torch.zeros(n_vocab, d_model, dtype=torch.float64)
        count = torch.zeros(n_vocab, dtype=torch.float64)
        n_prefix = model.module.n_prefix
        for _, tokens, hidden in model._forward(model._inference_adata(adata), batch_size):
            keep = tokens.is_context.cpu()
            ids = tokens.gene_ids.cpu()[keep]
            total.index_add_(0, ids, hidden[:, n_prefix:].float().cpu()[keep].double())
            count.index_add_(0, ids, torch.ones(len(ids), dtype=torch.float64))
        mean = (total / count.clamp(min=1)[:, None]).float().numpy()
        seen = count.numpy() > 0
        defined = known & seen[np.where(known, column_to_gene, 0)]
        out[defined] = mean[column_to_gene[defined]]
    if not defined.all():
        warnings.warn(
            f"{int((~defined).sum())} genes have no {kind} embedding (outside the vocabulary"
            f"{'' if kind == 'identity' else ' or never a token in these cells'}); their rows are zero, "
            f"see .var[{key_added + '_defined'!r}]",
            UserWarning,
            stacklevel=2,
        )
    adata = adata.copy() if copy else adata
    adata.varm[key_added] = out
    adata.var[f"{key_added}_defined"] = defined
    record_run(adata, key_added, "gene_embedding", model, {"kind": kind})
    return adata if copy else None


def stored_graph(adata: AnnData, key: str) -> sp.csr_matrix:
    """The gene graph in ``adata.varp[key]`` as CSR; a clear error when there is none."""
    if key not in adata.varp:
        raise KeyError(f"no gene graph in adata.varp[{key!r}]; run sct.tl.gene_graph(adata, model) first")
    return sp.csr_matrix(adata.varp[key])


def gene_modules(
    adata: AnnData,
    *,
    key: str = KEYS.GENE_GRAPH,
    resolution: float = 1.0,
    min_size: int = 3,
    score: bool = True,
    key_added: str = KEYS.GENE_MODULE,
    random_state: int = 0,
    copy: bool = False,
) -> AnnData | None:
    """Gene modules: leiden communities of a gene graph, and each cell's score for each module.

    Parameters
    ----------
    adata
        AnnData with a gene graph in ``.varp[key]`` (:func:`gene_graph`).
    key
        ``.varp`` key of the graph.
    resolution
        Leiden resolution (higher: more, smaller modules).
    min_size
        Modules with fewer genes (and genes without edges) get no module (NaN); where no module
        has ``min_size`` genes, nothing is written and a ``ValueError`` says so.
    score
        Also score every cell for every module with :func:`scanpy.tl.score_genes` (on
        ``adata.X``, which should hold log-normalised expression for meaningful scores).
    key_added
        ``.var`` column of the module labels; the scores go to ``.obsm[f"{key_added}_scores"]``.
    random_state
        Leiden seed.
    copy
        Return a modified copy instead of writing into ``adata``.

    Returns
    -------
    ``adata`` (or its copy) if ``copy``, else ``None``; sets ``.var[key_added]`` (categorical),
    ``.obsm[f"{key_added}_scores"]`` (cells x modules DataFrame, with ``score``) and
    ``.uns["sct"][key_added]``.
    """
    refuse_backed_copy(adata, copy)
    check_key_added(key_added)
    graph = stored_graph(adata, key)
    if score:
        _check_scorable(
            adata,
            "sct.tl.gene_modules(score=True)",
            "or skip the scores: sct.tl.gene_modules(adata, score=False)",
        )
    if not resolution > 0:
        raise ValueError(f"resolution must be positive, got {resolution!r}")
    min_size = positive_int(min_size, "min_size")
    graph = graph.maximum(graph.T).tocsr()
    connected = np.asarray((graph != 0).sum(1)).ravel() > 0
    if connected.sum() < 2:
        raise ValueError(f"the graph in adata.varp[{key!r}] has fewer than 2 genes with edges")
    positions = pd.Index(np.arange(adata.n_vars).astype(str))  # var_names need not be unique (gene_key)
    genes = AnnData(
        obs=pd.DataFrame(index=positions[connected]),
        obsp={"connectivities": graph[connected][:, connected]},
    )
    sc.tl.leiden(
        genes,
        resolution=resolution,
        obsp="connectivities",
        flavor="igraph",
        n_iterations=-1,
        directed=False,
        random_state=random_state,
        key_added="module",
    )
    communities = genes.obs["module"].astype(str)
    sizes = communities.value_counts()
    big = sizes[sizes >= min_size].index
    # modules numbered by decreasing size
    names = {c: f"M{i}" for i, c in enumerate(sorted(big, key=lambda c: (-sizes[c], int(c))))}
    labels = np.full(adata.n_vars, np.nan, dtype=object)
    labels[connected] = communities.map(names).to_numpy()
    order = [names[c] for c in sorted(big, key=lambda c: (-sizes[c], int(c)))]
    if not order:  # an all-NaN column would replace the modules of an earlier run
        raise ValueError(
            f"no module of the graph in adata.varp[{key!r}] has min_size={min_size} genes (the largest has "
            f"{int(sizes.max())}); lower min_size or resolution"
        )
    module = pd.Categorical(labels, categories=order)

    scores = None
    if score and order:
        scores = pd.DataFrame(index=adata.obs_names)
        light = AnnData(  # X only: score_genes writes into it, never into adata; genes named by position
            X=adata.X,
            obs=pd.DataFrame(index=np.arange(adata.n_obs).astype(str)),
            var=pd.DataFrame(index=positions),
        )
        for name in order:
            scores[name] = _module_score(light, list(positions[module == name]), name, random_state)

    adata = adata.copy() if copy else adata
    adata.var[key_added] = module
    if scores is not None:
        adata.obsm[f"{key_added}_scores"] = scores
    else:  # scores of an earlier run would name other gene sets by the same module names
        adata.obsm.pop(f"{key_added}_scores", None)
    record_run(
        adata,
        key_added,
        "gene_modules",
        None,
        {
            "key": key,
            "resolution": float(resolution),
            "min_size": int(min_size),
            "random_state": None if random_state is None else int(random_state),
            "score": bool(score),
            "n_modules": len(order),
        },
    )
    return adata if copy else None
