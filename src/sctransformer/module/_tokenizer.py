"""Turn a sparse minibatch of counts into padded gene-token sequences, on the device."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, get_args

import torch
from torch import nn

from sctransformer._compat import quiet_sparse_tensors
from sctransformer._constants import TARGET_SUM
from sctransformer.data._validation import check_choice, positive_int

ValueEncoding = Literal["binned", "continuous"]
Binning = Literal["quantile", "fixed"]

#: Smallest library a value is divided by: only a cell without counts (library 0, no tokens) reaches
#: it; float counts may sum below 1 and are still normalised by their own total.
LIBRARY_FLOOR: float = 1e-12


@dataclass
class TokenizedCells:
    """Gene tokens of a minibatch, padded to the longest cell.

    A cell's tokens are its *context* (the expressed genes the model reads), then optional *query*
    tokens: genes whose expression the model predicts without reading it. Queries attend to the
    context but no token attends to them, so adding or removing queries leaves the context's
    outputs unchanged.

    Attributes
    ----------
    gene_ids
        ``(n_cells, length)`` vocabulary index of each gene token; ``0`` where padded.
    values
        ``(n_cells, length)`` log1p-normalised expression of each token (for queries: the value
        to predict, ``0`` for unexpressed genes); ``0`` where padded.
    bins
        ``(n_cells, length)`` expression bin in ``[0, n_bins)``; ``-1`` where padded or where the
        token is an unexpressed gene.
    is_token
        ``(n_cells, length)`` ``True`` for real tokens, ``False`` for padding.
    is_unexpressed
        ``(n_cells, length)`` ``True`` for query tokens of sampled unexpressed genes.
    n_expressed
        ``(n_cells,)`` number of expressed vocabulary genes in the context before truncation to
        ``max_length`` (the entries of ``all_genes`` per cell).
    all_genes, all_values
        Every expressed vocabulary gene of the context of every cell (before truncation), cell
        after cell (``n_expressed`` entries each), and its log1p-normalised value: the whole
        profile, for the cell-profile token.
    is_query
        ``(n_cells, length)`` ``True`` for query tokens (held-out expressed genes and sampled
        unexpressed genes); default ``is_unexpressed``.
    held_share
        ``(n_cells,)`` share of the vocabulary held out of each cell's context (queries are
        drawn from it); fed to the query tokens. Default 0.
    n_held
        ``(n_cells, 2)`` number of held-out genes that the cell expresses and does not express
        (the pools the queries were drawn from); default ``None`` (no sampled queries).
    """

    gene_ids: torch.Tensor
    values: torch.Tensor
    bins: torch.Tensor
    is_token: torch.Tensor
    is_unexpressed: torch.Tensor
    n_expressed: torch.Tensor
    all_genes: torch.Tensor | None = None
    all_values: torch.Tensor | None = None
    is_query: torch.Tensor | None = None
    held_share: torch.Tensor | None = None
    n_held: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.is_query is None:
            self.is_query = self.is_unexpressed.clone()
        if self.held_share is None:
            self.held_share = torch.zeros(
                len(self.n_expressed), dtype=self.values.dtype, device=self.n_expressed.device
            )

    @property
    def is_context(self) -> torch.Tensor:
        """``(n_cells, length)`` tokens the cell's other tokens attend to (real, not queries)."""
        return self.is_token & ~self.is_query

    def profile_rows(self) -> torch.Tensor:
        """Cell index of each entry of ``all_genes``."""
        return torch.repeat_interleave(
            torch.arange(len(self.n_expressed), device=self.n_expressed.device), self.n_expressed
        )

    def select(self, rows: torch.Tensor) -> TokenizedCells:
        """The tokens of the cells ``rows`` (increasing indices)."""
        keep = torch.isin(self.profile_rows(), rows)
        return replace(
            self,
            gene_ids=self.gene_ids[rows],
            values=self.values[rows],
            bins=self.bins[rows],
            is_token=self.is_token[rows],
            is_unexpressed=self.is_unexpressed[rows],
            n_expressed=self.n_expressed[rows],
            all_genes=None if self.all_genes is None else self.all_genes[keep],
            all_values=None if self.all_values is None else self.all_values[keep],
            is_query=self.is_query[rows],
            held_share=self.held_share[rows],
            n_held=None if self.n_held is None else self.n_held[rows],
        )

    def without_gene(self, gene: int) -> TokenizedCells:
        """These cells with ``gene`` deleted: its context token becomes padding and its profile weight 0.

        The other tokens keep their values and bins (as measured in the unperturbed cell) and no
        gene takes the freed place; only the attention mask and the profile weights change.
        """
        hit = self.is_context & (self.gene_ids == gene)
        all_values = self.all_values
        if self.all_genes is not None and all_values is not None:
            all_values = all_values.masked_fill(self.all_genes == gene, 0.0)
        return replace(self, is_token=self.is_token & ~hit, all_values=all_values)

    def with_gene(self, gene: int, value: torch.Tensor, bin_id: torch.Tensor) -> TokenizedCells:
        """These cells with ``gene`` set to ``value`` (log1p-normalised) and ``bin_id``, per cell.

        Cells with the gene in their context get its token's value changed; the others get a
        context token appended (one extra column). The profile entry is changed or added.
        """
        n = len(self.n_expressed)
        present = self.is_context & (self.gene_ids == gene)
        has = present.any(1)
        values = torch.where(present, value[:, None].to(self.values.dtype), self.values)
        bins = torch.where(present, bin_id[:, None].to(self.bins.dtype), self.bins)
        column = torch.full((n, 1), gene, dtype=self.gene_ids.dtype, device=self.gene_ids.device)
        new = (~has)[:, None]
        out = replace(
            self,
            gene_ids=torch.cat([self.gene_ids, column], 1),
            values=torch.cat([values, value[:, None].to(values.dtype) * new], 1),
            bins=torch.cat([bins, torch.where(new, bin_id[:, None].to(bins.dtype), -1)], 1),
            is_token=torch.cat([self.is_token, new], 1),
            is_unexpressed=torch.cat([self.is_unexpressed, torch.zeros_like(new)], 1),
            is_query=torch.cat([self.is_query, torch.zeros_like(new)], 1),
        )
        if self.all_genes is None or self.all_values is None:
            return out
        rows = self.profile_rows()
        match = self.all_genes == gene
        all_values = torch.where(match, value.to(self.all_values.dtype)[rows], self.all_values)
        in_profile = torch.zeros(n, dtype=torch.bool, device=rows.device)
        in_profile[rows[match]] = True
        added = torch.nonzero(~in_profile).squeeze(1)
        rows = torch.cat([rows, added])
        order = torch.sort(rows, stable=True).indices
        out.all_genes = torch.cat([self.all_genes, torch.full_like(added, gene)])[order]
        out.all_values = torch.cat([all_values, value.to(all_values.dtype)[added]])[order]
        out.n_expressed = self.n_expressed + (~in_profile).long()
        return out


def _as_csr(x: torch.Tensor) -> torch.Tensor:
    if x.layout == torch.sparse_csr:
        return x
    with quiet_sparse_tensors():
        if x.layout == torch.strided:
            return x.to_sparse_csr()
        # CSC or COO: go through dense only for this minibatch, never for the whole matrix
        return x.to_dense().to_sparse_csr()


def _sum_duplicates(
    row: torch.Tensor, column: torch.Tensor, value: torch.Tensor, n_columns: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The entries of a CSR matrix in canonical form: one per (row, column), columns sorted in each row.

    A CSR matrix may hold several entries for the same (row, column), which scipy and torch read as
    their sum, and its columns need not be sorted within a row. A matrix whose entries are already
    strictly increasing in ``(row, column)`` (the usual case) is returned as it is, after one
    linear check; otherwise duplicates are summed (into a copy) and the entries sorted.
    """
    key = row.mul(n_columns).add_(column)
    if key.numel() < 2 or bool(key.diff().min() > 0):
        return row, column, value
    unique, inverse = torch.unique(key, sorted=True, return_inverse=True)
    summed = value.new_zeros(unique.numel()).index_add_(0, inverse, value)
    return torch.div(unique, n_columns, rounding_mode="floor"), unique % n_columns, summed


class Tokenizer(nn.Module):
    """Tokenizer of cells into expressed-gene sentences.

    A cell becomes the list of its expressed genes that are in the vocabulary, sorted by decreasing
    ``count / gene_scale`` (ties broken by increasing vocabulary index) and truncated to
    ``max_length``. With ``gene_scale`` all ones this is the order of the counts; with each gene's
    typical expression (Geneformer's rank-value encoding) the genes a cell expresses more than
    usual come first, so truncation drops ubiquitous genes before cell-specific ones. Its state
    (bin edges, gene scales) is held in buffers, so it is saved with the weights.

    Parameters
    ----------
    n_genes
        Vocabulary size.
    max_length
        Maximum number of gene tokens per cell; cells with more expressed genes keep the
        ``max_length`` most expressed.
    value_encoding
        ``"binned"`` gives each token an expression bin, ``"continuous"`` keeps the value.
    n_bins
        Number of expression bins.
    binning
        ``"quantile"``: bin ``floor(n_bins * n_lower / n_expressed)`` where ``n_lower`` counts the
        cell's expressed genes with strictly lower expression (per-cell quantiles; ties share a
        bin). ``"fixed"``: bins of the log1p-normalised value between fixed ``bin_edges``.
    bin_edges
        ``n_bins - 1`` increasing edges for ``binning="fixed"``; a value ``v`` goes to bin
        ``searchsorted(bin_edges, v, side="right")``.
    gene_scale
        ``(n_genes,)`` positive scale of each gene for the token order; default all ones.
        Bins do not depend on it.
    """

    def __init__(
        self,
        n_genes: int,
        *,
        max_length: int,
        value_encoding: ValueEncoding = "binned",
        n_bins: int = 16,
        binning: Binning = "quantile",
        bin_edges: torch.Tensor | None = None,
        gene_scale: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        positive_int(n_genes, "n_genes")
        positive_int(max_length, "max_length")
        check_choice(value_encoding, "value_encoding", get_args(ValueEncoding))
        check_choice(binning, "binning", get_args(Binning))
        if positive_int(n_bins, "n_bins") < 2:
            raise ValueError(f"n_bins must be at least 2, got {n_bins}")
        self.n_genes = n_genes
        self.max_length = max_length
        self.value_encoding = value_encoding
        self.n_bins = n_bins
        self.binning = binning
        if binning == "fixed":
            if bin_edges is None or bin_edges.numel() != n_bins - 1:
                raise ValueError(f"binning='fixed' needs {n_bins - 1} bin edges")
            edges = bin_edges.float()
        else:
            edges = torch.zeros(n_bins - 1)
        self.register_buffer("bin_edges", edges)
        scale = torch.ones(n_genes) if gene_scale is None else gene_scale.float()
        if scale.shape != (n_genes,) or not bool((scale > 0).all()):
            raise ValueError(f"gene_scale must hold {n_genes} positive values")
        self.register_buffer("gene_scale", scale)

    def forward(
        self,
        x: torch.Tensor,
        column_to_gene: torch.Tensor,
        *,
        n_queries: int = 0,
        held_out: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> TokenizedCells:
        """Tokenize a minibatch.

        Parameters
        ----------
        x
            ``(n_cells, n_columns)`` counts, sparse CSR (preferred) or dense. A CSR matrix need not
            be canonical: entries repeated for a (cell, column) are summed, as scipy does, and
            columns may come in any order within a row.
        column_to_gene
            ``(n_columns,)`` vocabulary index of each column of ``x``; ``-1`` for columns whose
            gene is not in the vocabulary (they still count towards the library size).
        n_queries
            With a positive number, each cell holds a random set of vocabulary genes out of its
            context (a share drawn uniformly in ``[0, 1.1)`` per cell and capped at 1, then each
            gene independently); up to ``n_queries`` of the held-out genes it expresses and up to
            ``n_queries`` of those it does not (among the genes ``x`` has columns for), chosen at
            random, become query tokens.
        held_out
            ``(n_genes,)`` or ``(n_cells, n_genes)`` boolean mask of vocabulary genes to leave out
            of the context (and of the profile); its share of the vocabulary is recorded as
            ``held_share``. With ``n_queries``, these genes join the random ones that queries are
            drawn from.
        generator
            Random generator for the sampled genes and held-out shares.

        Held-out genes still count towards the library size and the per-cell quantile bins, so
        the context's values and bins do not depend on what is held out.
        """
        x = _as_csr(x)
        device = x.device
        n_cells = x.shape[0]
        val = x.values().float()
        row = torch.repeat_interleave(torch.arange(n_cells, device=device), x.crow_indices().diff())
        library = torch.zeros(n_cells, dtype=val.dtype, device=device).index_add_(0, row, val)
        # duplicate entries of a (cell, column) are one count, their sum, as scipy reads them
        row, column, val = _sum_duplicates(row, x.col_indices(), val, x.shape[1])
        gene = column_to_gene.to(device)[column]
        keep = (val > 0) & (gene >= 0)
        row, gene, val = row[keep], gene[keep], val[keep]
        # one order of the entries (cell, then vocabulary gene) whatever the order of the columns:
        # the same cells give the same profile sums and random draws with their genes in any order
        order_key = row * self.n_genes + gene
        if order_key.numel() > 1 and not bool((order_key[1:] >= order_key[:-1]).all()):
            order = torch.argsort(order_key)
            row, gene, val = row[order], gene[order], val[order]
        n_all = torch.bincount(row, minlength=n_cells)

        held_share = torch.zeros(n_cells, dtype=val.dtype, device=device)
        if held_out is not None:
            held_out = held_out.to(device=device, dtype=torch.bool)
            if held_out.dim() == 1:
                held_out = held_out.expand(n_cells, -1)
        if n_queries > 0:
            # a share uniform in [0, 1.1), capped at 1: about 9% of the cells hold every gene out and
            # train the prediction from phenotype tokens alone, where generation starts
            # (random draws in float32 throughout: "-true" precisions change the default dtype)
            uniform = dict(generator=generator, dtype=val.dtype, device=device)
            share = (1.1 * torch.rand(n_cells, 1, **uniform)).clamp(max=1.0)
            drawn = torch.rand(n_cells, self.n_genes, **uniform) < share
            held_out = drawn if held_out is None else held_out | drawn
        if held_out is not None:
            held = held_out[row, gene]
            held_share = held_out.float().mean(1)
        else:
            held = torch.zeros_like(row, dtype=torch.bool)

        # every expressed count of each cell, descending (for the quantile bins)
        descending = self._rows(row, val, n_cells, -1.0).sort(dim=1, descending=True).values
        # the context: the cell's expressed genes that are not held out, in token order
        c_row, c_gene, c_val = row[~held], gene[~held], val[~held]
        n_expressed = torch.bincount(c_row, minlength=n_cells)
        block_genes, block_values = self._ordered(c_row, c_gene, c_val, n_cells)

        length = min(block_genes.shape[1], self.max_length)
        is_token = torch.arange(length, device=device) < n_expressed[:, None]
        counts = block_values[:, :length]
        gene_ids = block_genes[:, :length].masked_fill(~is_token, 0)
        values = self._normalise(counts, library).masked_fill(~is_token, 0.0)
        bin_ids = self._bin(descending, counts, values, n_all).masked_fill(~is_token, -1)
        is_query = torch.zeros_like(is_token)
        is_unexpressed = torch.zeros_like(is_token)

        parts = [(gene_ids, values, bin_ids, is_token, is_unexpressed)]
        n_held = None
        if n_queries > 0:
            # expressed queries: a random choice among the held-out genes the cell expresses
            h_row, h_gene, h_val = row[held], gene[held], val[held]
            score = self._rows(h_row, torch.rand(h_row.numel(), **uniform), n_cells, -1.0)
            k = min(n_queries, score.shape[1])
            top, pick = score.topk(k, dim=1)
            valid = top >= 0
            q_genes = self._rows(h_row, h_gene, n_cells, 0).gather(1, pick).masked_fill(~valid, 0)
            q_counts = self._rows(h_row, h_val, n_cells, -1.0).gather(1, pick)
            q_values = self._normalise(q_counts, library).masked_fill(~valid, 0.0)
            q_bins = self._bin(descending, q_counts, q_values, n_all).masked_fill(~valid, -1)
            parts.append((q_genes, q_values, q_bins, valid, torch.zeros_like(valid)))
            # unexpressed queries: a random choice among the held-out genes it does not express
            expressed = torch.zeros(n_cells, self.n_genes, dtype=torch.bool, device=device)
            expressed[row, gene] = True
            # ... among the genes the data measure: a gene without a column is unknown, not unexpressed
            genes_of_columns = column_to_gene.to(device)
            measured = torch.zeros(self.n_genes, dtype=torch.bool, device=device)
            measured[genes_of_columns[genes_of_columns >= 0]] = True
            pool = held_out & ~expressed & measured
            sampled, valid = self._sample_among(pool, n_queries, generator)
            parts.append(
                (
                    sampled,
                    torch.zeros_like(sampled, dtype=values.dtype),
                    torch.full_like(sampled, -1),
                    valid,
                    valid,
                )
            )
            n_held = torch.stack([torch.bincount(h_row, minlength=n_cells), pool.sum(1)], 1)
        if len(parts) > 1:
            is_query = torch.cat([is_query, *(p[3] for p in parts[1:])], 1)
            gene_ids, values, bin_ids, is_token, is_unexpressed = (
                torch.cat([p[i] for p in parts], 1) for i in range(5)
            )
        all_values = torch.log1p(c_val / library.clamp(min=LIBRARY_FLOOR)[c_row] * TARGET_SUM)
        return TokenizedCells(
            gene_ids,
            values,
            bin_ids,
            is_token,
            is_unexpressed,
            n_expressed,
            c_gene,
            all_values,
            is_query=is_query,
            held_share=held_share,
            n_held=n_held,
        )

    @staticmethod
    def _rows(row: torch.Tensor, entries: torch.Tensor, n_cells: int, fill: float) -> torch.Tensor:
        """Lay the entries of each cell (``row``, sorted) out in one row of a dense block padded with ``fill``."""
        n = torch.bincount(row, minlength=n_cells)
        width = int(n.max()) if row.numel() > 0 else 0
        slot = torch.arange(row.numel(), device=row.device) - (torch.cumsum(n, 0) - n)[row]
        block = torch.full((n_cells, width), fill, dtype=entries.dtype, device=row.device)
        block[row, slot] = entries
        return block

    def _ordered(
        self, row: torch.Tensor, gene: torch.Tensor, value: torch.Tensor, n_cells: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each cell's genes and values in token order, one row per cell, padded (gene ``n_genes``, value -1).

        The order is decreasing ``value / gene_scale``, ties by increasing gene: two stable row-wise
        sorts (padding keeps key -1 and sorts last).
        """
        block_genes = self._rows(row, gene, n_cells, self.n_genes)
        block_values = self._rows(row, value, n_cells, -1.0)
        block_genes, order = block_genes.sort(dim=1, stable=True)
        block_values = block_values.gather(1, order)
        scale = torch.cat([self.gene_scale, self.gene_scale.new_ones(1)])[block_genes]
        key = torch.where(block_values >= 0, block_values / scale, block_values)
        order = key.sort(dim=1, descending=True, stable=True).indices
        return block_genes.gather(1, order), block_values.gather(1, order)

    @staticmethod
    def _normalise(counts: torch.Tensor, library: torch.Tensor) -> torch.Tensor:
        """log1p of counts per ``TARGET_SUM`` of the library (padding, ``-1``, gives 0)."""
        return torch.log1p(counts.clamp(min=0) / library.clamp(min=LIBRARY_FLOOR)[:, None] * TARGET_SUM)

    def from_values(self, genes: torch.Tensor, values: torch.Tensor) -> TokenizedCells:
        """Tokenize cells given as log1p-normalised values of the vocabulary genes ``genes``.

        ``values`` is ``(n_cells, len(genes))``; positive entries are expressed. Tokens are
        ordered and truncated as in :meth:`forward`, up to rounding: with a ``gene_scale`` not all
        ones, two genes whose counts over scale tie exactly may come in either order here, as
        the order is read from ``expm1(value) / scale``. Per-cell quantile bins are taken among
        the cell's expressed values. Used to feed generated cells back to the model.
        """
        n_cells = values.shape[0]
        row, column = torch.nonzero(values > 0, as_tuple=True)
        gene, val = genes.to(values.device)[column], values[row, column].float()
        n_expressed = torch.bincount(row, minlength=n_cells)
        # ordered by expm1(value), which is proportional to the count within a cell, as forward orders
        block_genes, block_counts = self._ordered(row, gene, torch.expm1(val), n_cells)
        block_values = torch.where(block_counts >= 0, torch.log1p(block_counts), block_counts)
        length = min(block_genes.shape[1], self.max_length)
        is_token = torch.arange(length, device=values.device) < n_expressed[:, None]
        kept = block_values[:, :length]
        descending = block_values.sort(dim=1, descending=True).values
        bins = self._bin(descending, kept, kept.clamp(min=0), n_expressed).masked_fill(~is_token, -1)
        return TokenizedCells(
            block_genes[:, :length].masked_fill(~is_token, 0),
            kept.clamp(min=0).masked_fill(~is_token, 0.0),
            bins,
            is_token,
            torch.zeros_like(is_token),
            n_expressed,
            gene,
            val,
        )

    def _bin(
        self,
        block_values: torch.Tensor,
        counts: torch.Tensor,
        values: torch.Tensor,
        n_expressed: torch.Tensor,
    ) -> torch.Tensor:
        """Bins of the kept tokens; ``block_values`` holds every expressed value, sorted descending."""
        if self.binning == "fixed":
            return torch.bucketize(values, self.bin_edges, right=True)
        if counts.shape[1] == 0:
            return torch.zeros_like(counts, dtype=torch.long)
        # count the cell's expressed values strictly below each kept value: padding (-1) sorts
        # first in ascending order and is subtracted
        ascending = block_values.flip(1).contiguous()
        n_padding = (block_values.shape[1] - n_expressed)[:, None]
        n_lower = torch.searchsorted(ascending, counts.contiguous(), side="left") - n_padding
        return torch.div(n_lower * self.n_bins, n_expressed.clamp(min=1)[:, None], rounding_mode="floor")

    @staticmethod
    def _sample_among(
        pool: torch.Tensor, n_sample: int, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample up to ``n_sample`` distinct genes per cell among the ``True`` entries of ``pool``.

        Returns the genes ``(n_cells, n_sample)`` and which of them are real (cells with fewer
        eligible genes get fewer).
        """
        draws = torch.rand(pool.shape, generator=generator, dtype=torch.float32, device=pool.device)
        scores = draws.masked_fill(~pool, -1.0)
        k = min(n_sample, pool.shape[1])
        top, sampled = scores.topk(k, dim=1)
        valid = top >= 0
        if k < n_sample:
            pad = n_sample - k
            sampled = torch.cat([sampled, sampled.new_zeros(pool.shape[0], pad)], 1)
            valid = torch.cat([valid, valid.new_zeros(pool.shape[0], pad)], 1)
        return sampled.masked_fill(~valid, 0), valid
