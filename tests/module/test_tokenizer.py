from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sctransformer.data import to_torch_csr
from sctransformer.module import Tokenizer


def naive_tokenize(
    x: np.ndarray, column_to_gene: np.ndarray, *, max_length: int, n_bins: int, edges=None, scale=None
):
    """Per-cell numpy reference: expressed in-vocabulary genes, by decreasing count / scale then gene index."""
    cells = []
    for row in x:
        library = np.float32(row.sum())
        entries = [
            (int(column_to_gene[j]), np.float32(row[j]))
            for j in range(len(row))
            if row[j] > 0 and column_to_gene[j] >= 0
        ]
        entries.sort(key=lambda e: (-(e[1] / (1.0 if scale is None else np.float32(scale[e[0]]))), e[0]))
        n = len(entries)
        genes, values, bins = [], [], []
        for gene, count in entries[:max_length]:
            value = np.log1p(count / library * np.float32(1e4))
            if edges is None:
                n_lower = sum(1 for _, c in entries if c < count)
                b = (n_lower * n_bins) // n
            else:
                b = int(np.searchsorted(edges, value, side="right"))
            genes.append(gene)
            values.append(value)
            bins.append(b)
        cells.append((genes, values, bins, n))
    return cells


def check_against_naive(
    x: np.ndarray,
    column_to_gene: np.ndarray,
    *,
    max_length: int,
    n_bins: int,
    edges=None,
    scale=None,
    matrix: sp.csr_matrix | None = None,
) -> None:
    """Tokens of ``x`` (or of ``matrix``, which holds the same counts as stored) against the naive reference."""
    tokenizer = Tokenizer(
        int(column_to_gene.max()) + 1 if (column_to_gene >= 0).any() else 1,
        max_length=max_length,
        n_bins=n_bins,
        binning="quantile" if edges is None else "fixed",
        bin_edges=None if edges is None else torch.as_tensor(edges),
        gene_scale=None if scale is None else torch.as_tensor(scale),
    )
    out = tokenizer(
        to_torch_csr(sp.csr_matrix(x) if matrix is None else matrix), torch.as_tensor(column_to_gene)
    )
    reference = naive_tokenize(
        x, column_to_gene, max_length=max_length, n_bins=n_bins, edges=edges, scale=scale
    )
    for i, (genes, values, bins, n) in enumerate(reference):
        k = len(genes)
        assert out.n_expressed[i] == n
        assert out.is_token[i].sum() == k
        assert out.is_token[i, :k].all()
        assert out.gene_ids[i, :k].tolist() == genes
        np.testing.assert_allclose(out.values[i, :k].numpy(), values, rtol=1e-5)
        assert out.bins[i, :k].tolist() == bins
        assert (out.bins[i, k:] == -1).all()
    assert out.gene_ids.shape[1] == max((len(c[0]) for c in reference), default=0)


def random_counts(rng, n_cells: int, n_genes: int, density: float) -> np.ndarray:
    x = rng.poisson(3.0, size=(n_cells, n_genes)).astype(np.float32)
    x[rng.random((n_cells, n_genes)) > density] = 0
    return x


def non_canonical(x: np.ndarray, rng) -> sp.csr_matrix:
    """``x`` as a non-canonical CSR matrix: counts split into duplicate entries, explicit zeros, shuffled columns.

    scipy reads duplicates as their sum, so the matrix equals ``x``; it is built from its arrays
    directly (``csr_matrix((data, indices, indptr))`` keeps them as they are).
    """
    data, indices, indptr = [], [], [0]
    for row in x:
        entries = []
        for j in range(len(row)):
            count = int(row[j])
            if count > 0:
                cuts = np.sort(rng.integers(0, count + 1, size=rng.integers(0, 3)))
                parts = np.diff(np.concatenate([[0], cuts, [count]]))  # 1-3 parts, some may be 0
                entries += [(j, part) for part in parts]
            elif rng.random() < 0.2:
                entries += [(j, 0)] * int(rng.integers(1, 3))  # explicit zeros, repeated
        order = rng.permutation(len(entries))
        data += [entries[k][1] for k in order]
        indices += [entries[k][0] for k in order]
        indptr.append(len(data))
    m = sp.csr_matrix(
        (np.asarray(data, dtype=np.float32), np.asarray(indices, dtype=np.int32), np.asarray(indptr)),
        shape=x.shape,
    )
    np.testing.assert_array_equal(m.toarray(), x)  # the same counts, as scipy reads them
    return m


@pytest.mark.parametrize("max_length", [1, 5, 40])
def test_quantile_bins_tokens_and_truncation_match_naive(max_length):
    rng = np.random.default_rng(0)
    x = random_counts(rng, 12, 30, 0.4)
    x[3] = 0  # a cell with no counts
    x[5, :] = 0
    x[5, 7] = 4  # a cell with one gene
    column_to_gene = np.arange(30)
    column_to_gene[[2, 11]] = -1  # genes outside the vocabulary (still count in the library)
    check_against_naive(x, column_to_gene, max_length=max_length, n_bins=7)


@pytest.mark.parametrize("max_length", [3, 40])
def test_gene_scales_reorder_and_truncate_like_naive(max_length):
    rng = np.random.default_rng(2)
    x = random_counts(rng, 12, 30, 0.5)
    scale = rng.uniform(0.2, 5.0, size=30).astype(np.float32)
    scale[[4, 9]] = 1.0  # ties of count / scale are broken by gene index
    check_against_naive(x, np.arange(30), max_length=max_length, n_bins=5, scale=scale)


def test_gene_scales_keep_the_relatively_high_gene_when_truncating():
    x = np.array([[10.0, 3.0, 1.0]], dtype=np.float32)
    tokenizer = Tokenizer(3, max_length=2, n_bins=3, gene_scale=torch.tensor([100.0, 1.0, 0.5]))
    out = tokenizer(to_torch_csr(sp.csr_matrix(x)), torch.arange(3))
    # 10/100 = 0.1 < 3/1 = 3 < 1/0.5 = 2 ... order: gene 1 (3.0), gene 2 (2.0); gene 0 dropped
    assert out.gene_ids[0].tolist() == [1, 2]
    # bins are per-cell quantiles of the counts, whatever the order
    assert out.bins[0].tolist() == [1, 0]
    with pytest.raises(ValueError, match="positive"):
        Tokenizer(3, max_length=2, gene_scale=torch.tensor([1.0, 0.0, 1.0]))


def test_float_counts_summing_below_one_are_normalised_by_their_own_library():
    x = np.array([[0.3, 0.2, 0.0, 0.05], [0.0, 0.0, 0.0, 0.0], [2.0, 0.0, 1.0, 0.0]], dtype=np.float32)
    check_against_naive(x, np.arange(4), max_length=4, n_bins=3)


def test_fixed_bins_match_naive():
    rng = np.random.default_rng(1)
    x = random_counts(rng, 10, 25, 0.5)
    values = np.unique(np.log1p(x / x.sum(1, keepdims=True) * 1e4)[x > 0])
    edges = ((values[:-1] + values[1:]) / 2)[:: max(1, len(values) // 6)][:5].astype(np.float32)
    check_against_naive(x, np.arange(25), max_length=10, n_bins=len(edges) + 1, edges=edges)


def test_columns_map_to_vocabulary_rows():
    # columns in another order than the vocabulary: tokens carry vocabulary ids
    rng = np.random.default_rng(2)
    x = random_counts(rng, 6, 10, 0.6)
    permutation = rng.permutation(10)
    check_against_naive(x, permutation, max_length=10, n_bins=4)


def test_dense_and_sparse_input_agree():
    rng = np.random.default_rng(3)
    x = random_counts(rng, 5, 12, 0.5)
    tokenizer = Tokenizer(12, max_length=8, n_bins=4)
    a = tokenizer(to_torch_csr(sp.csr_matrix(x)), torch.arange(12))
    b = tokenizer(torch.as_tensor(x), torch.arange(12))
    c = tokenizer(
        torch.as_tensor(x).to_sparse_csc() if hasattr(torch.Tensor, "to_sparse_csc") else torch.as_tensor(x),
        torch.arange(12),
    )
    for other in (b, c):
        assert torch.equal(a.gene_ids, other.gene_ids)
        assert torch.equal(a.bins, other.bins)


def test_ties_are_broken_by_gene_index_and_share_a_bin():
    x = np.array([[2, 5, 2, 2, 0, 1]], dtype=np.float32)
    out = Tokenizer(6, max_length=3, n_bins=4)(torch.as_tensor(x), torch.arange(6))
    # sorted by count (5, then the three 2s by gene index 0, 2, 3), truncated to 3
    assert out.gene_ids[0].tolist() == [1, 0, 2]
    # 5 genes expressed; the 2s have one gene (the 1) below them: bin floor(4 * 1 / 5) = 0
    assert out.bins[0].tolist() == [(4 * 4) // 5, 0, 0]


def test_query_samples_are_distinct_held_out_and_of_the_right_kind():
    rng = np.random.default_rng(4)
    x = random_counts(rng, 8, 40, 0.3)
    gen = torch.Generator().manual_seed(0)
    out = Tokenizer(40, max_length=5, n_bins=4)(
        torch.as_tensor(x), torch.arange(40), n_queries=6, generator=gen
    )
    assert out.is_unexpressed[:, -6:].any() and not out.is_unexpressed[:, :-6].any()
    assert not out.is_query[:, : out.is_token.shape[1] - 12].any()
    for i in range(8):
        context = set(out.gene_ids[i][out.is_context[i]].tolist())
        unexpressed = out.gene_ids[i][out.is_unexpressed[i]].tolist()
        expressed = out.gene_ids[i][out.is_query[i] & ~out.is_unexpressed[i]].tolist()
        assert len(set(unexpressed)) == len(unexpressed) and all(x[i, g] == 0 for g in unexpressed)
        assert len(set(expressed)) == len(expressed) and all(x[i, g] > 0 for g in expressed)
        assert not context & set(expressed)
        # the pools the queries came from: the held-out genes, expressed and not
        assert out.n_held[i, 0] >= len(expressed) and out.n_held[i, 1] >= len(unexpressed)
        assert out.n_held[i].sum() == pytest.approx(out.held_share[i] * 40)
    assert (out.bins[out.is_unexpressed] == -1).all()


def test_genes_without_a_column_are_never_unexpressed_queries():
    """A query panel lacking vocabulary genes: those are unmeasured, not 'not expressed' targets."""
    rng = np.random.default_rng(5)
    x = random_counts(rng, 16, 30, 0.3)
    column_to_gene = torch.arange(30)
    column_to_gene[20:] = -1  # the data have columns for vocabulary genes 0-19 only (and 10 others)
    tokenizer = Tokenizer(40, max_length=8, n_bins=4)
    out = tokenizer(
        torch.as_tensor(x), column_to_gene, n_queries=8, generator=torch.Generator().manual_seed(0)
    )
    unexpressed = out.gene_ids[out.is_unexpressed]
    assert unexpressed.numel() > 0 and bool((unexpressed < 20).all())
    assert (out.n_held[:, 1] <= 20).all()


def test_query_sampling_with_few_held_out_genes():
    x = np.ones((1, 5), dtype=np.float32)
    x[0, 2] = 0
    held = torch.tensor([False, False, True, True, False])
    tokenizer = Tokenizer(5, max_length=5, n_bins=2)
    gen = torch.Generator().manual_seed(0)
    out = tokenizer(torch.as_tensor(x), torch.arange(5), n_queries=3, held_out=held, generator=gen)
    # gene 2 is the only unexpressed gene, gene 3 always held out, others maybe
    assert out.gene_ids[0][out.is_unexpressed[0]].tolist() == [2]
    assert 3 in out.gene_ids[0][out.is_query[0] & ~out.is_unexpressed[0]].tolist()
    assert out.n_held[0, 1] == 1


@settings(max_examples=40, deadline=None)
@given(
    n_cells=st.integers(1, 6),
    n_genes=st.integers(1, 15),
    density=st.floats(0.0, 1.0),
    scale=st.sampled_from([1, 1000, 10**6]),
    max_length=st.integers(1, 20),
    n_bins=st.integers(2, 9),
    seed=st.integers(0, 10_000),
)
def test_random_matrices_match_naive(n_cells, n_genes, density, scale, max_length, n_bins, seed):
    rng = np.random.default_rng(seed)
    x = (random_counts(rng, n_cells, n_genes, density) * scale).astype(np.float32)
    if seed % 3 == 0:
        x[x > 0] = 7  # all-equal values
    check_against_naive(x, np.arange(n_genes), max_length=max_length, n_bins=n_bins)


def test_duplicate_entries_of_a_gene_are_one_token_with_their_sum():
    # gene 2 holds 3 counts stored as two entries, 1 + 2: one token, with the value and bin of a 3
    m = sp.csr_matrix(
        (np.array([1.0, 2.0, 5.0], np.float32), np.array([2, 2, 4]), np.array([0, 3])), shape=(1, 6)
    )
    assert not m.has_canonical_format
    tokenizer = Tokenizer(6, max_length=8, n_bins=4)
    out = tokenizer(to_torch_csr(m), torch.arange(6))
    reference = tokenizer(torch.as_tensor(m.toarray()), torch.arange(6))
    assert out.gene_ids[out.is_token].tolist() == [4, 2]
    for name in ("gene_ids", "values", "bins", "is_token", "n_expressed", "all_genes", "all_values"):
        assert torch.equal(getattr(out, name), getattr(reference, name)), name


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("max_length", [3, 40])
def test_non_canonical_csr_matches_naive(seed, max_length):
    rng = np.random.default_rng(seed)
    x = random_counts(rng, 10, 25, 0.5)
    x[2] = 0  # a cell without counts
    column_to_gene = np.arange(25)
    column_to_gene[[1, 7]] = -1
    m = non_canonical(x, rng)
    assert not m.has_canonical_format and not m.has_sorted_indices
    check_against_naive(x, column_to_gene, max_length=max_length, n_bins=5, matrix=m)
    scale = rng.uniform(0.2, 5.0, size=25).astype(np.float32)
    check_against_naive(x, column_to_gene, max_length=max_length, n_bins=5, scale=scale, matrix=m)
    values = np.unique(np.log1p(x / np.maximum(x.sum(1, keepdims=True), 1) * 1e4)[x > 0])
    edges = ((values[:-1] + values[1:]) / 2)[:: max(1, len(values) // 6)][:5].astype(np.float32)
    check_against_naive(
        x, column_to_gene, max_length=max_length, n_bins=len(edges) + 1, edges=edges, matrix=m
    )


@pytest.mark.parametrize("duplicates", [True, False])
def test_non_canonical_csr_gives_the_tokens_of_the_canonical_matrix(duplicates):
    """Every output, sampled queries and held-out genes included, as for the canonical matrix."""
    rng = np.random.default_rng(5)
    x = random_counts(rng, 9, 30, 0.5)
    if duplicates:
        m = non_canonical(x, rng)
    else:  # sorted columns broken only
        m = sp.csr_matrix(x)
        for i in range(m.shape[0]):
            part = slice(m.indptr[i], m.indptr[i + 1])
            order = rng.permutation(m.indptr[i + 1] - m.indptr[i])
            m.indices[part], m.data[part] = m.indices[part][order], m.data[part][order]
        m.has_sorted_indices = False
    assert not m.has_sorted_indices
    tokenizer = Tokenizer(30, max_length=6, n_bins=4)
    held = torch.from_numpy(rng.random((9, 30)) < 0.2)
    stored = to_torch_csr(m)
    before = stored.values().clone(), stored.col_indices().clone()
    for kwargs in ({}, {"n_queries": 4, "held_out": held}):
        out = tokenizer(stored, torch.arange(30), generator=torch.Generator().manual_seed(0), **kwargs)
        ref = tokenizer(
            to_torch_csr(sp.csr_matrix(x)),
            torch.arange(30),
            generator=torch.Generator().manual_seed(0),
            **kwargs,
        )
        for name in (
            "gene_ids",
            "values",
            "bins",
            "is_token",
            "is_unexpressed",
            "n_expressed",
            "all_genes",
            "all_values",
            "is_query",
            "held_share",
            "n_held",
        ):
            a, b = getattr(out, name), getattr(ref, name)
            assert (a is None and b is None) or torch.equal(a, b), name
    # the input is read, never changed
    assert torch.equal(stored.values(), before[0]) and torch.equal(stored.col_indices(), before[1])


@settings(max_examples=25, deadline=None)
@given(
    n_cells=st.integers(1, 5),
    n_genes=st.integers(1, 12),
    density=st.floats(0.0, 1.0),
    max_length=st.integers(1, 15),
    n_bins=st.integers(2, 7),
    seed=st.integers(0, 10_000),
)
def test_random_non_canonical_matrices_match_naive(n_cells, n_genes, density, max_length, n_bins, seed):
    rng = np.random.default_rng(seed)
    x = random_counts(rng, n_cells, n_genes, density)
    check_against_naive(
        x, np.arange(n_genes), max_length=max_length, n_bins=n_bins, matrix=non_canonical(x, rng)
    )


@pytest.mark.parametrize("default_dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_tokens_do_not_depend_on_the_default_dtype(default_dtype):
    # Lightning's "-true" precisions set the default dtype while the model runs
    rng = np.random.default_rng(5)
    x = to_torch_csr(sp.csr_matrix(random_counts(rng, 8, 30, 0.4)))
    tokenizer = Tokenizer(30, max_length=10, n_bins=4)
    reference = tokenizer(x, torch.arange(30), n_queries=3, generator=torch.Generator().manual_seed(0))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default_dtype)
    try:
        out = tokenizer(x, torch.arange(30), n_queries=3, generator=torch.Generator().manual_seed(0))
    finally:
        torch.set_default_dtype(previous)
    for field in ("gene_ids", "values", "bins", "is_token", "is_query", "all_values", "held_share"):
        assert getattr(out, field).dtype == getattr(reference, field).dtype, field
    for field in ("gene_ids", "values", "bins", "all_genes", "all_values"):
        torch.testing.assert_close(getattr(out, field), getattr(reference, field), rtol=0, atol=0, msg=field)
