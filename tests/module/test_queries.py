"""Query tokens, held-out genes and token edits (in-silico perturbation)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from sctransformer.data import to_torch_csr
from sctransformer.module import GeneTransformerModule, Tokenizer

from .test_module import make_module as base_module

N_GENES = 30


def counts(seed: int = 0, n_cells: int = 7) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.poisson(3.0, size=(n_cells, N_GENES)).astype(np.float32)
    x[rng.random(x.shape) > 0.6] = 0
    x[0] = 0  # a cell without genes
    return x


def make_module(**overrides) -> GeneTransformerModule:
    settings = dict(max_length=8, label_smoothing=0.0, cell_expression_loss=False, cell_profile=True)
    return base_module(N_GENES, (3,), **(settings | overrides)).eval()


def by_gene(tokens, i: int, mask) -> dict[int, tuple[float, int]]:
    keep = mask[i]
    return {
        int(g): (float(v), int(b))
        for g, v, b in zip(
            tokens.gene_ids[i][keep], tokens.values[i][keep], tokens.bins[i][keep], strict=True
        )
    }


def test_held_out_genes_leave_context_and_profile_but_not_values_or_bins():
    x = counts()
    tokenizer = Tokenizer(N_GENES, max_length=N_GENES, n_bins=4)
    full = tokenizer(torch.as_tensor(x), torch.arange(N_GENES))
    held = torch.zeros(N_GENES, dtype=torch.bool)
    held[::3] = True
    part = tokenizer(torch.as_tensor(x), torch.arange(N_GENES), held_out=held)
    for i in range(len(x)):
        expected = {g: vb for g, vb in by_gene(full, i, full.is_context).items() if not held[g]}
        assert by_gene(part, i, part.is_context) == expected  # same values and bins, held genes gone
    assert not held[part.all_genes].any()
    torch.testing.assert_close(part.held_share, torch.full((len(x),), 10 / N_GENES))
    assert torch.equal(
        part.n_expressed, torch.as_tensor([(x[i] > 0)[~held.numpy()].sum() for i in range(len(x))])
    )


def test_expressed_queries_are_held_out_genes_with_their_values():
    x = counts(1, n_cells=40)
    tokenizer = Tokenizer(N_GENES, max_length=6, n_bins=4)
    full = tokenizer(torch.as_tensor(x), torch.arange(N_GENES))
    gen = torch.Generator().manual_seed(0)
    out = tokenizer(torch.as_tensor(x), torch.arange(N_GENES), n_queries=3, generator=gen)
    expressed_queries = out.is_query & ~out.is_unexpressed
    assert expressed_queries.any() and (expressed_queries.sum(1) <= 3).all()
    library = x.sum(1)
    for i in range(len(x)):
        context = set(out.gene_ids[i][out.is_context[i]].tolist())
        for g, v in zip(
            out.gene_ids[i][expressed_queries[i]].tolist(),
            out.values[i][expressed_queries[i]].tolist(),
            strict=True,
        ):
            assert x[i, g] > 0 and g not in context
            assert v == pytest.approx(np.log1p(x[i, g] / library[i] * 1e4), rel=1e-5)
        for g in out.gene_ids[i][out.is_unexpressed[i]].tolist():
            assert x[i, g] == 0
        # the context's genes keep the values they have without hold-out
        reference = by_gene(full, i, torch.ones_like(full.is_token, dtype=torch.bool) & full.is_token)
        for g, (v, _) in by_gene(out, i, out.is_context).items():
            if g in reference:
                assert v == pytest.approx(reference[g][0])
    rows = torch.repeat_interleave(torch.arange(len(x)), out.n_expressed)
    for i in range(len(x)):
        queried = set(out.gene_ids[i][expressed_queries[i]].tolist())
        assert not queried & set(out.all_genes[rows == i].tolist())  # queried genes left the profile


def test_decoded_queries_equal_queries_inside_the_sequence_and_leave_the_context_alone():
    module = make_module()
    x = to_torch_csr(sp.csr_matrix(counts(2)))
    gen = torch.Generator().manual_seed(0)
    tokens = module.tokenize(x, torch.arange(N_GENES), n_queries=3, generator=gen)
    phenotypes = torch.full((tokens.gene_ids.shape[0], 1), -1)
    with torch.no_grad():
        hidden = module.encode(tokens, phenotypes)
        # the same cells without their query tokens
        context_only = torch.zeros_like(tokens.is_token)
        stripped = type(tokens)(
            **{**tokens.__dict__, "is_token": tokens.is_context, "is_query": context_only}
        )
        alone = module.encode(stripped, phenotypes)
        context = torch.cat(
            [torch.ones(len(phenotypes), module.n_prefix, dtype=torch.bool), tokens.is_context], 1
        )
        torch.testing.assert_close(hidden[context], alone[context], atol=1e-5, rtol=1e-5)
        _, cache, key_mask = module.encode_context(stripped, phenotypes)
        decoded = module.decode_queries(cache, key_mask, tokens.gene_ids, tokens.held_share)
        queries = tokens.is_query
        in_sequence = hidden[:, module.n_prefix :][queries]
        torch.testing.assert_close(decoded[queries], in_sequence, atol=1e-5, rtol=1e-5)
        shared = module.decode_queries(cache, key_mask, torch.arange(5), tokens.held_share)
        torch.testing.assert_close(
            shared[:, 2], module.decode_queries(cache, key_mask, torch.tensor([2]), tokens.held_share)[:, 0]
        )


def test_query_losses_train_the_query_head_and_correct_for_sampling_rates():
    module = make_module().train()
    x = to_torch_csr(sp.csr_matrix(counts(3, n_cells=30)))
    gen = torch.Generator().manual_seed(0)
    tokens = module.tokenize(x, torch.arange(N_GENES), n_queries=4, generator=gen)
    phenotypes = torch.full((30, 1), -1)
    hidden = module.encode(tokens, phenotypes)
    out = module.loss(hidden, tokens, torch.zeros_like(tokens.is_token), phenotypes, phenotypes >= 0, ["a"])
    assert {"query_expressed", "query_value"} <= set(out.components)
    out.total.backward()
    assert module.query_head[0].weight.grad.abs().sum() > 0


def test_the_sampling_correction_recovers_each_genes_expression_probability():
    """Genes expressed independently with probability p_g: a bias-only head trained on the
    queries' loss must learn p_g, although expressed and unexpressed genes are queried at
    different rates (and some cells hold out no gene of one kind)."""
    rng = np.random.default_rng(0)
    p_true = np.linspace(0.01, 0.25, N_GENES)  # sparse cells: often no held-out expressed gene
    module = make_module().train()
    for p in module.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        for p in [
            *module.query_head.parameters(),
            module.query_interaction.weight,
            *module.query_cell.parameters(),
        ]:
            p.zero_()
    module.query_bias.weight.requires_grad_(True)
    optimiser = torch.optim.Adam([module.query_bias.weight], lr=0.05)
    schedule = torch.optim.lr_scheduler.StepLR(optimiser, step_size=100, gamma=0.3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        x = (rng.random((64, N_GENES)) < p_true) * rng.poisson(3.0, (64, N_GENES)).clip(min=1)
        tokens = module.tokenize(
            torch.as_tensor(x, dtype=torch.float32), torch.arange(N_GENES), n_queries=3, generator=gen
        )
        hidden = torch.zeros(64, module.n_prefix + tokens.gene_ids.shape[1], 16)
        out = module.loss(
            hidden,
            tokens,
            torch.zeros_like(tokens.is_token),
            torch.full((64, 1), -1),
            torch.zeros(64, 1, dtype=torch.bool),
            ["a"],
        )
        optimiser.zero_grad()
        out.components["query_expressed"].backward()
        optimiser.step()
        schedule.step()
    error = torch.sigmoid(module.query_bias.weight[:, 0]).detach().numpy() - p_true
    assert abs(error.mean()) < 0.01 and np.abs(error).max() < 0.06, np.round(error, 3)


def test_decoded_queries_match_the_sequence_under_bf16_autocast():
    module = make_module()
    x = to_torch_csr(sp.csr_matrix(counts(2)))
    gen = torch.Generator().manual_seed(0)
    tokens = module.tokenize(x, torch.arange(N_GENES), n_queries=3, generator=gen)
    phenotypes = torch.full((tokens.gene_ids.shape[0], 1), -1)
    stripped = type(tokens)(
        **{**tokens.__dict__, "is_token": tokens.is_context, "is_query": torch.zeros_like(tokens.is_token)}
    )
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        in_sequence = module.encode(tokens, phenotypes)[:, module.n_prefix :][tokens.is_query]
        _, cache, key_mask = module.encode_context(stripped, phenotypes)
        decoded = module.decode_queries(cache, key_mask, tokens.gene_ids, tokens.held_share)[tokens.is_query]
    torch.testing.assert_close(decoded.float(), in_sequence.float(), atol=2e-2, rtol=2e-2)


def test_deleting_a_gene_edits_exactly_its_token_as_retokenising_without_it_does():
    x = counts(4, n_cells=12)
    tokenizer = Tokenizer(N_GENES, max_length=N_GENES, n_bins=4, binning="quantile")
    tokens = tokenizer(torch.as_tensor(x), torch.arange(N_GENES))
    gene = int(np.argmax((x > 0).sum(0)))
    edited = tokens.without_gene(gene)
    copy = x.copy()
    copy[:, gene] = 0
    again = tokenizer(torch.as_tensor(copy), torch.arange(N_GENES))
    for i in range(len(x)):
        before = by_gene(tokens, i, tokens.is_context)
        after = by_gene(edited, i, edited.is_context)
        assert set(after) == set(by_gene(again, i, again.is_context))  # the same genes as re-tokenising
        assert gene not in after and after == {g: vb for g, vb in before.items() if g != gene}
    changed = (edited.is_token != tokens.is_token).nonzero()
    assert (tokens.gene_ids[changed[:, 0], changed[:, 1]] == gene).all()
    assert int((x[:, gene] > 0).sum()) == len(changed)
    assert (edited.all_values[edited.all_genes == gene] == 0).all()
    assert torch.equal(
        edited.all_values[edited.all_genes != gene], tokens.all_values[tokens.all_genes != gene]
    )


def test_deleting_a_gene_removes_it_from_the_profile_token():
    module = make_module(max_length=3)  # most cells have genes beyond max_length
    x = counts(5, n_cells=10)
    gene = int(np.argmax((x > 0).sum(0)))
    copy = x.copy()
    copy[:, gene] = 0
    tokens = module.tokenize(torch.as_tensor(x), torch.arange(N_GENES))
    with torch.no_grad():
        edited = module.profile(tokens.without_gene(gene), None)
        # the profile of the re-tokenised copy, with the unperturbed values (library sizes)
        library = torch.as_tensor(x.sum(1))
        rows, cols = np.nonzero(copy)
        values = torch.log1p(torch.as_tensor(copy[rows, cols]) / library[rows] * 1e4)
        direct = torch.zeros(len(x), 16).index_add_(
            0, torch.as_tensor(rows), values[:, None] * module.profile_embedding.weight[cols]
        )
        torch.testing.assert_close(edited, module.profile_norm(direct), atol=1e-5, rtol=1e-5)


def test_setting_a_gene_changes_or_adds_its_token_and_profile_entry():
    x = counts(6, n_cells=9)
    tokenizer = Tokenizer(N_GENES, max_length=N_GENES, n_bins=4)
    tokens = tokenizer(torch.as_tensor(x), torch.arange(N_GENES))
    gene = int(np.argmin((x > 0).sum(0)))
    value = torch.full((9,), 7.5)
    edited = tokens.with_gene(gene, value, torch.full((9,), 3))
    rows = torch.repeat_interleave(torch.arange(9), edited.n_expressed)
    for i in range(9):
        after = by_gene(edited, i, edited.is_context)
        before = by_gene(tokens, i, tokens.is_context)
        assert after[gene] == (7.5, 3)
        assert {g: vb for g, vb in after.items() if g != gene} == {
            g: vb for g, vb in before.items() if g != gene
        }
        profile = dict(
            zip(edited.all_genes[rows == i].tolist(), edited.all_values[rows == i].tolist(), strict=True)
        )
        assert profile[gene] == 7.5 and len(profile) == len(after)


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("binning", ["quantile", "fixed"])
def test_tokens_from_values_match_tokens_from_counts(binning, scaled):
    x = counts(7, n_cells=8)
    edges = torch.tensor([1.0, 2.0, 3.0]) if binning == "fixed" else None
    # gene scales (gene_ranking="relative") reorder and truncate: both paths must rank by count / scale
    scale = torch.linspace(0.2, 40.0, N_GENES)[
        torch.randperm(N_GENES, generator=torch.Generator().manual_seed(0))
    ]
    tokenizer = Tokenizer(
        N_GENES,
        max_length=5,
        n_bins=4,
        binning=binning,
        bin_edges=edges,
        gene_scale=scale if scaled else None,
    )
    from_counts = tokenizer(torch.as_tensor(x), torch.arange(N_GENES))
    values = np.log1p(x / np.maximum(x.sum(1, keepdims=True), 1) * 1e4)
    from_values = tokenizer.from_values(torch.arange(N_GENES), torch.as_tensor(values, dtype=torch.float32))
    assert torch.equal(from_values.gene_ids, from_counts.gene_ids)
    assert torch.equal(from_values.bins, from_counts.bins)
    torch.testing.assert_close(from_values.values, from_counts.values)
    torch.testing.assert_close(from_values.all_values, from_counts.all_values)


def test_selecting_cells_gives_their_tokens_and_profiles():
    x = counts(8, n_cells=9)
    tokenizer = Tokenizer(N_GENES, max_length=4, n_bins=4)
    tokens = tokenizer(torch.as_tensor(x), torch.arange(N_GENES))
    rows = torch.tensor([1, 4, 5, 8])
    chosen = tokens.select(rows)
    alone = tokenizer(torch.as_tensor(x[rows.numpy()]), torch.arange(N_GENES))
    for i in range(len(rows)):
        assert by_gene(chosen, i, chosen.is_context) == by_gene(alone, i, alone.is_context)
    assert torch.equal(chosen.all_genes, alone.all_genes) and torch.equal(
        chosen.n_expressed, alone.n_expressed
    )
    torch.testing.assert_close(chosen.all_values, alone.all_values)
