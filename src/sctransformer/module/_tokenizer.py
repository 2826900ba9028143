"""Turn a sparse minibatch of counts into padded gene-token sequences, on the device."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from sctransformer._compat import quiet_sparse_tensors
from sctransformer._constants import TARGET_SUM

ValueEncoding = Literal["binned", "continuous"]
Binning = Literal["quantile", "fixed"]


@dataclass
class TokenizedCells:
    """Gene tokens of a minibatch, padded to the longest cell.

    Attributes
    ----------
    gene_ids
        ``(n_cells, length)`` vocabulary index of each gene token; ``0`` where padded.
    values
        ``(n_cells, length)`` log1p-normalised expression of each token; ``0`` where padded.
    bins
        ``(n_cells, length)`` expression bin in ``[0, n_bins)``; ``-1`` where padded or where the
        token is a sampled unexpressed gene.
    is_token
        ``(n_cells, length)`` ``True`` for real tokens, ``False`` for padding.
    is_unexpressed
        ``(n_cells, length)`` ``True`` for sampled unexpressed genes (training targets of the
        is-zero head only); all ``False`` unless sampling was asked for.
    n_expressed
        ``(n_cells,)`` number of expressed genes in the vocabulary, before truncation.
    all_genes, all_values
        Every expressed vocabulary gene of every cell (before truncation), cell after cell
        (``n_expressed`` entries each), and its log1p-normalised value: the whole profile, for
        the cell-profile token.
    """

    gene_ids: torch.Tensor
    values: torch.Tensor
    bins: torch.Tensor
    is_token: torch.Tensor
    is_unexpressed: torch.Tensor
    n_expressed: torch.Tensor
    all_genes: torch.Tensor | None = None
    all_values: torch.Tensor | None = None


def _as_csr(x: torch.Tensor) -> torch.Tensor:
    if x.layout == torch.sparse_csr:
        return x
    with quiet_sparse_tensors():
        if x.layout == torch.strided:
            return x.to_sparse_csr()
        # CSC or COO: go through dense only for this minibatch, never for the whole matrix
        return x.to_dense().to_sparse_csr()


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
        n_unexpressed: int = 0,
        generator: torch.Generator | None = None,
    ) -> TokenizedCells:
        """Tokenize a minibatch.

        Parameters
        ----------
        x
            ``(n_cells, n_columns)`` counts, sparse CSR (preferred) or dense.
        column_to_gene
            ``(n_columns,)`` vocabulary index of each column of ``x``; ``-1`` for columns whose
            gene is not in the vocabulary (they still count towards the library size).
        n_unexpressed
            Number of unexpressed vocabulary genes to append per cell as extra tokens (training
            targets of the is-zero head); ``0`` for none.
        generator
            Random generator for sampling unexpressed genes.
        """
        x = _as_csr(x)
        device = x.device
        n_cells = x.shape[0]
        val = x.values().float()
        row = torch.repeat_interleave(torch.arange(n_cells, device=device), x.crow_indices().diff())
        library = torch.zeros(n_cells, device=device).index_add_(0, row, val)
        gene = column_to_gene.to(device)[x.col_indices()]
        keep = (val > 0) & (gene >= 0)
        row, gene, val = row[keep], gene[keep], val[keep]
        n_expressed = torch.bincount(row, minlength=n_cells)

        # CSR rows are contiguous: lay each cell's expressed genes out in one row of a dense block,
        # padded with value -1 and an out-of-range gene id (both sort after every real entry)
        width = int(n_expressed.max()) if n_cells > 0 and row.numel() > 0 else 0
        slot = torch.arange(row.numel(), device=device) - (torch.cumsum(n_expressed, 0) - n_expressed)[row]
        block_genes = torch.full((n_cells, width), self.n_genes, dtype=torch.long, device=device)
        block_values = torch.full((n_cells, width), -1.0, device=device)
        block_genes[row, slot] = gene
        block_values[row, slot] = val
        # order each row by decreasing count / gene scale, ties by increasing gene: two stable
        # row-wise sorts (padding keeps key -1 and sorts last)
        block_genes, order = block_genes.sort(dim=1, stable=True)
        block_values = block_values.gather(1, order)
        scale = torch.cat([self.gene_scale, self.gene_scale.new_ones(1)])[block_genes]
        key = torch.where(block_values >= 0, block_values / scale, block_values)
        order = key.sort(dim=1, descending=True, stable=True).indices
        block_genes, block_values = block_genes.gather(1, order), block_values.gather(1, order)

        sampled = valid = None
        if n_unexpressed > 0:  # before truncation: every expressed gene is excluded
            sampled, valid = self._sample_unexpressed(row, gene, n_cells, n_unexpressed, generator, device)

        length = min(width, self.max_length)
        is_token = torch.arange(length, device=device) < n_expressed[:, None]
        counts = block_values[:, :length]
        gene_ids = block_genes[:, :length].masked_fill(~is_token, 0)
        values = torch.log1p(counts.clamp(min=0) / library.clamp(min=1)[:, None] * TARGET_SUM)
        values = values.masked_fill(~is_token, 0.0)
        descending = block_values.sort(dim=1, descending=True).values  # every expressed count
        bin_ids = self._bin(descending, counts, values, n_expressed).masked_fill(~is_token, -1)
        is_unexpressed = torch.zeros_like(is_token)
        if sampled is not None:
            gene_ids = torch.cat([gene_ids, sampled], 1)
            values = torch.cat([values, values.new_zeros(n_cells, n_unexpressed)], 1)
            bin_ids = torch.cat([bin_ids, bin_ids.new_full((n_cells, n_unexpressed), -1)], 1)
            is_token = torch.cat([is_token, valid], 1)
            is_unexpressed = torch.cat([is_unexpressed, valid], 1)
        all_values = torch.log1p(val / library.clamp(min=1)[row] * TARGET_SUM)
        return TokenizedCells(
            gene_ids, values, bin_ids, is_token, is_unexpressed, n_expressed, gene, all_values
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

    def _sample_unexpressed(
        self,
        row: torch.Tensor,
        gene: torch.Tensor,
        n_cells: int,
        n_sample: int,
        generator: torch.Generator | None,
        device: torch.device,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample ``n_sample`` distinct vocabulary genes per cell among those it does not express.

        ``row`` and ``gene`` list every expressed gene (before truncation). Cells expressing almost
        the whole vocabulary get fewer samples; ``valid`` marks the real ones.
        """
        expressed = torch.zeros(n_cells, self.n_genes, dtype=torch.bool, device=device)
        expressed[row, gene] = True
        scores = torch.rand(n_cells, self.n_genes, generator=generator, device=device)
        scores = scores.masked_fill(expressed, -1.0)
        k = min(n_sample, self.n_genes)
        top, sampled = scores.topk(k, dim=1)
        valid = top >= 0
        if k < n_sample:
            pad = n_sample - k
            sampled = torch.cat([sampled, sampled.new_zeros(n_cells, pad)], 1)
            valid = torch.cat([valid, valid.new_zeros(n_cells, pad)], 1)
        return sampled.masked_fill(~valid, 0), valid
