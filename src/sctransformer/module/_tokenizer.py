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
    """

    gene_ids: torch.Tensor
    values: torch.Tensor
    bins: torch.Tensor
    is_token: torch.Tensor
    is_unexpressed: torch.Tensor
    n_expressed: torch.Tensor


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
    expression (ties broken by increasing vocabulary index) and truncated to ``max_length``. Its
    state (bin edges) is held in buffers, so it is saved with the weights.

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
        crow = x.crow_indices()
        col = x.col_indices()
        val = x.values().float()
        row = torch.repeat_interleave(torch.arange(n_cells, device=device), crow.diff())

        library = torch.zeros(n_cells, device=device).index_add_(0, row, val)
        gene = column_to_gene.to(device)[col]
        keep = (val > 0) & (gene >= 0)
        row, gene, val = row[keep], gene[keep], val[keep]

        # sort by (row ascending, value descending, gene ascending) with three stable sorts
        order = torch.argsort(gene, stable=True)
        order = order[torch.argsort(val[order], descending=True, stable=True)]
        order = order[torch.argsort(row[order], stable=True)]
        row, gene, val = row[order], gene[order], val[order]

        n_expressed = torch.bincount(row, minlength=n_cells)
        start = torch.cumsum(n_expressed, 0) - n_expressed
        position = torch.arange(row.numel(), device=device)
        rank = position - start[row]

        normalised = torch.log1p(val / library[row] * TARGET_SUM)
        bins = self._bin(row, val, normalised, position, rank, n_expressed)

        sampled = valid = None
        if n_unexpressed > 0:  # before truncation: every expressed gene is excluded
            sampled, valid = self._sample_unexpressed(row, gene, n_cells, n_unexpressed, generator, device)
        kept = rank < self.max_length
        row, gene, normalised, bins, rank = (t[kept] for t in (row, gene, normalised, bins, rank))
        n_tokens = torch.clamp(n_expressed, max=self.max_length)
        length = int(n_tokens.max()) if n_cells > 0 else 0
        length_total = length + n_unexpressed

        gene_ids = torch.zeros(n_cells, length_total, dtype=torch.long, device=device)
        values = torch.zeros(n_cells, length_total, device=device)
        bin_ids = torch.full((n_cells, length_total), -1, dtype=torch.long, device=device)
        is_token = torch.zeros(n_cells, length_total, dtype=torch.bool, device=device)
        gene_ids[row, rank] = gene
        values[row, rank] = normalised
        bin_ids[row, rank] = bins
        is_token[row, rank] = True
        is_unexpressed = torch.zeros_like(is_token)

        if sampled is not None:
            gene_ids[:, length:] = sampled
            is_token[:, length:] = valid
            is_unexpressed[:, length:] = valid
        return TokenizedCells(gene_ids, values, bin_ids, is_token, is_unexpressed, n_expressed)

    def _bin(
        self,
        row: torch.Tensor,
        val: torch.Tensor,
        normalised: torch.Tensor,
        position: torch.Tensor,
        rank: torch.Tensor,
        n_expressed: torch.Tensor,
    ) -> torch.Tensor:
        if self.binning == "fixed":
            return torch.bucketize(normalised, self.bin_edges, right=True)
        if val.numel() == 0:
            return torch.zeros(0, dtype=torch.long, device=val.device)
        # entries are sorted by row then decreasing value: a run of equal values is one group
        new_group = torch.ones_like(row, dtype=torch.bool)
        new_group[1:] = (row[1:] != row[:-1]) | (val[1:] != val[:-1])
        group = torch.cumsum(new_group.long(), 0) - 1
        last_in_group = torch.zeros(int(group[-1]) + 1, dtype=torch.long, device=val.device)
        last_in_group.scatter_reduce_(0, group, position, reduce="amax", include_self=False)
        last_rank = rank + (last_in_group[group] - position)
        n_lower = n_expressed[row] - last_rank - 1
        return torch.div(n_lower * self.n_bins, n_expressed[row], rounding_mode="floor")

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
