from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from sctransformer.data import to_torch_csr
from sctransformer.module import GeneTransformerModule, SelfAttention


def make_module(
    n_genes: int = 20, phenotype_sizes: tuple[int, ...] = (3, 2), **overrides
) -> GeneTransformerModule:
    """A small module (seeded) with the given overrides of its settings."""
    kwargs = dict(
        d_model=16,
        n_layers=2,
        n_heads=2,
        d_ff=32,
        dropout=0.0,
        max_length=12,
        value_encoding="binned",
        n_bins=4,
        binning="quantile",
        bin_edges=None,
        label_smoothing=0.1,
        expression_queries=True,
        cell_expression_loss=True,
    )
    kwargs.update(overrides)
    torch.manual_seed(0)
    return GeneTransformerModule(n_genes, list(phenotype_sizes), **kwargs)


def counts(seed: int = 0, n_cells: int = 6) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    x = rng.poisson(2.0, size=(n_cells, 20)).astype(np.float32)
    x[rng.random(x.shape) > 0.5] = 0
    return to_torch_csr(sp.csr_matrix(x))


@pytest.mark.parametrize("value_encoding", ["binned", "continuous"])
def test_losses_are_finite_and_every_component_gets_gradient(value_encoding):
    module = make_module(value_encoding=value_encoding)
    gen = torch.Generator().manual_seed(1)
    tokens = module.tokenize(counts(), torch.arange(20), n_queries=3, generator=gen)
    value_mask = tokens.is_context
    targets = torch.tensor([[0, 1], [1, -1], [2, 0], [0, 1], [-1, 0], [1, 1]])
    hidden = module.encode(tokens, torch.full_like(targets, -1), value_mask)
    out = module.loss(
        hidden, tokens, value_mask, targets, torch.ones_like(targets, dtype=torch.bool), ["a", "b"]
    )
    assert set(out.components) == {
        "expression",
        "expression_from_cell",
        "query_expressed",
        "query_value",
        "phenotype_a",
        "phenotype_b",
    }
    assert torch.isfinite(out.total)
    assert out.counts["phenotype_a"] == 5 and out.counts["phenotype_b"] == 5  # unknown (-1) never scored
    out.total.backward()
    for name in (
        "expression_head",
        "cell_expression_head",
        "query_head",
        "phenotype_heads",
        "gene_embedding",
    ):
        grads = [p.grad for n, p in module.named_parameters() if n.startswith(name)]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads), name


def test_cell_embedding_does_not_depend_on_the_other_cells_in_the_batch():
    module = make_module().eval()
    x = counts(n_cells=8)
    with torch.no_grad():
        tokens = module.tokenize(x, torch.arange(20))
        full = module.pool(module.encode(tokens, torch.full((8, 2), -1)), tokens, "cls")
        for i in range(8):
            single = module.tokenize(
                to_torch_csr(sp.csr_matrix(x.to_dense()[i : i + 1].numpy())), torch.arange(20)
            )
            alone = module.pool(module.encode(single, torch.full((1, 2), -1)), single, "cls")
            torch.testing.assert_close(alone[0], full[i], atol=1e-5, rtol=1e-5)


def test_mean_pooling_ignores_padding_and_query_tokens():
    module = make_module().eval()
    gen = torch.Generator().manual_seed(0)
    tokens = module.tokenize(counts(), torch.arange(20), n_queries=2, generator=gen)
    assert (tokens.is_query & ~tokens.is_unexpressed).any()
    hidden = torch.randn(tokens.gene_ids.shape[0], module.n_prefix + tokens.gene_ids.shape[1], 16)
    pooled = module.pool(hidden, tokens, "mean")
    for i in range(hidden.shape[0]):
        keep = (tokens.is_token[i] & ~tokens.is_query[i]).numpy()
        expected = hidden[i, module.n_prefix :][keep].mean(0) if keep.any() else hidden[i, 0]
        torch.testing.assert_close(pooled[i], expected)


def test_a_cell_without_genes_is_embedded_from_special_tokens():
    module = make_module().eval()
    x = torch.zeros(2, 20)
    x[1, 3] = 5
    tokens = module.tokenize(x, torch.arange(20))
    hidden = module.encode(tokens, torch.full((2, 2), -1))
    assert torch.isfinite(hidden).all()
    assert torch.isfinite(module.pool(hidden, tokens, "mean")).all()


def test_attention_probabilities_match_sdpa_output():
    torch.manual_seed(0)
    attention = SelfAttention(16, 4).eval()
    x = torch.randn(3, 7, 16)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[0, 5:] = False
    probs = attention.attention_probabilities(x, mask)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, 4, 7))
    assert (probs[0, :, :, 5:] == 0).all()
    _, _, v = attention._heads(x)
    manual = (probs @ v).transpose(1, 2).reshape(3, 7, 16)
    torch.testing.assert_close(attention.out(manual), attention(x, mask), atol=1e-5, rtol=1e-5)


def test_phenotype_loss_is_zero_not_nan_when_every_class_has_weight_zero():
    from sctransformer.module import phenotype_loss

    logits = torch.randn(3, 2, requires_grad=True)
    loss = phenotype_loss(logits, torch.tensor([1, 1, 1]), weight=torch.tensor([1.0, 0.0]))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_class_weights_reweight_the_phenotype_loss():
    module = make_module()
    tokens = module.tokenize(counts(), torch.arange(20))
    targets = torch.tensor([[0, 1], [1, 0], [2, 0], [0, 1], [2, 0], [1, 1]])
    mask = torch.ones_like(targets, dtype=torch.bool)
    hidden = module.encode(tokens, torch.full_like(targets, -1))
    value_mask = torch.zeros_like(tokens.is_token)
    plain = module.loss(hidden, tokens, value_mask, targets, mask, ["a", "b"]).components["phenotype_a"]
    weights = [torch.tensor([1.0, 0.0, 0.0]), None]
    only_class_0 = module.loss(hidden, tokens, value_mask, targets, mask, ["a", "b"], weights).components[
        "phenotype_a"
    ]
    logits = module.phenotype_logits(hidden, tokens)[0]
    rows = targets[:, 0] == 0
    expected = torch.nn.functional.cross_entropy(logits[rows], targets[rows, 0])
    torch.testing.assert_close(only_class_0, expected)
    assert not torch.isclose(plain, only_class_0)


@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0])
def test_focal_loss_gradient_is_finite_for_a_certain_prediction(gamma):
    from sctransformer.module import phenotype_loss

    logits = torch.tensor([[20.0, 0.0], [0.0, 1.0]], requires_grad=True)  # p_t rounds to 1 in float32
    phenotype_loss(logits, torch.tensor([0, 0]), focal_gamma=gamma).backward()
    assert torch.isfinite(logits.grad).all()
    assert torch.all(logits.grad[0].abs() < 1e-6)  # a certain, right prediction teaches nothing


def test_a_minibatch_with_nothing_to_score_is_a_zero_loss_that_still_backpropagates():
    module = make_module(phenotype_sizes=(), expression_queries=False, cell_expression_loss=False)
    tokens = module.tokenize(counts(), torch.arange(20))
    none = torch.zeros((tokens.gene_ids.shape[0], 0), dtype=torch.long)
    hidden = module.encode(tokens, none)
    nothing = torch.zeros_like(tokens.is_context)  # no value hidden, no phenotype slot
    out = module.loss(hidden, tokens, nothing, none, none.bool(), [])
    assert not out.components and out.total.item() == 0.0
    out.total.backward()  # a step on such a minibatch must not crash training


def _every_head_module() -> GeneTransformerModule:
    return make_module(gene_prediction=True, batch_adversary=True, n_batches=2, align_dims=(5, 8))


def test_every_parameter_takes_part_in_the_loss_of_a_minibatch_with_nothing_for_its_head():
    """Distributed data parallel training needs a gradient for every parameter on every rank.

    In a minibatch with no hidden value, no query, no hidden gene, no labelled cell of phenotype
    ``b``, no batch and no second modality, each of those heads takes part in the loss with weight
    0: a gradient of exactly 0, and the total and every other gradient as without it.
    """
    module = _every_head_module()
    tokens = module.tokenize(counts(), torch.arange(20))  # no query tokens
    targets = torch.tensor([[0, -1], [1, -1], [2, -1], [0, -1], [1, -1], [2, -1]])
    nothing = torch.zeros_like(tokens.is_context)
    hidden = module.encode(tokens, torch.full_like(targets, -1), nothing)
    out = module.loss(
        hidden, tokens, nothing, targets, torch.ones_like(targets, dtype=torch.bool), ["a", "b"]
    )
    assert set(out.components) == {"phenotype_a"}
    assert out.total.item() == out.components["phenotype_a"].item()
    out.total.backward(retain_graph=True)
    assert [name for name, param in module.named_parameters() if param.grad is None] == []
    with_zeros = {name: param.grad.clone() for name, param in module.named_parameters()}

    module.zero_grad(set_to_none=True)
    out.components["phenotype_a"].backward()
    unscored = {
        id(param) for term, params in module.loss_heads().items() if term != "phenotype_0" for param in params
    }
    for name, param in module.named_parameters():
        if id(param) in unscored:
            assert param.grad is None and not with_zeros[name].any(), name
        elif param.grad is not None:
            assert torch.equal(with_zeros[name], param.grad), name


def test_loss_names_are_those_of_a_minibatch_that_scores_every_head():
    module = _every_head_module()
    gen = torch.Generator().manual_seed(1)
    tokens = module.tokenize(counts(), torch.arange(20), n_queries=3, generator=gen)
    value_mask = tokens.is_context & (torch.rand(tokens.is_context.shape, generator=gen) < 0.5)
    gene_mask = tokens.is_context & ~value_mask
    targets = torch.tensor([[0, 1], [1, -1], [2, 0], [0, 1], [-1, 0], [1, 1]])
    hidden = module.encode(tokens, torch.full_like(targets, -1), value_mask, gene_mask=gene_mask)
    out = module.loss(
        hidden,
        tokens,
        value_mask,
        targets,
        torch.ones_like(targets, dtype=torch.bool),
        ["a", "b"],
        batch_targets=torch.tensor([0, 1, 0, 1, 0, 1]),
        other=torch.randn(6, 5, generator=gen),
        gene_mask=gene_mask,
    )
    names = module.loss_names(["a", "b"])
    assert list(out.components) + list(out.metrics) == names
    assert set(out.counts) == set(names)
    heads = ["expression", "expression_from_cell", "query", "gene", "phenotype_0", "phenotype_1"]
    assert sorted(module.loss_heads()) == sorted([*heads, "batch_adversary", "alignment"])


def test_focal_loss_matches_a_naive_reference():
    from sctransformer.module import phenotype_loss

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 4, generator=gen)
    target = torch.randint(0, 4, (12,), generator=gen)
    weight = torch.tensor([1.0, 2.0, 0.5, 3.0])
    p = logits.softmax(-1).numpy()
    t = target.numpy()
    for gamma in (0.0, 2.0):
        per_cell = [-((1 - p[i, t[i]]) ** gamma) * np.log(p[i, t[i]]) for i in range(12)]
        w = [float(weight[t[i]]) for i in range(12)]
        expected_plain = np.mean(per_cell)
        expected_weighted = np.dot(per_cell, w) / np.sum(w)
        got = phenotype_loss(logits, target, focal_gamma=gamma)
        got_w = phenotype_loss(logits, target, weight=weight, focal_gamma=gamma)
        np.testing.assert_allclose(float(got), expected_plain, rtol=1e-5)
        np.testing.assert_allclose(float(got_w), expected_weighted, rtol=1e-5)
    torch.testing.assert_close(
        phenotype_loss(logits, target, weight=weight),
        torch.nn.functional.cross_entropy(logits, target, weight=weight),
    )


def test_profile_token_is_the_projection_of_the_whole_profile_less_hidden_values():
    module = make_module(cell_profile=True, max_length=4)  # truncation: most genes not tokens
    x = counts(seed=3)
    tokens = module.tokenize(x, torch.arange(20))
    value_mask = torch.zeros_like(tokens.is_token)
    value_mask[:, 1] = True  # hide each cell's second token
    dense = x.to_dense().numpy().astype(np.float64)
    weight = module.profile_embedding.weight.detach().numpy().astype(np.float64)
    with torch.no_grad():
        got = module.profile(tokens, value_mask).numpy()
    for i in range(dense.shape[0]):
        normalised = np.log1p(dense[i] / dense[i].sum() * 1e4)
        hidden_gene = int(tokens.gene_ids[i, 1]) if bool(tokens.is_token[i, 1]) else None
        total = np.zeros(weight.shape[1])
        for g in range(20):
            if dense[i, g] > 0 and g != hidden_gene:
                total += normalised[g] * weight[g]
        expected = (total - total.mean()) / np.sqrt(total.var() + 1e-5)  # layer norm at init
        np.testing.assert_allclose(got[i], expected, rtol=1e-4, atol=1e-4)


def test_profile_token_is_a_prefix_token_read_by_phenotype_heads():
    module = make_module(cell_profile=True)
    assert module.n_prefix == 1 + 2 + 1
    tokens = module.tokenize(counts(), torch.arange(20))
    targets = torch.tensor([[0, 1], [1, 0], [2, 0], [0, 1], [1, 0], [1, 1]])
    hidden = module.encode(tokens, torch.full_like(targets, -1))
    assert hidden.shape[1] == module.n_prefix + tokens.gene_ids.shape[1]
    mask = torch.ones_like(targets, dtype=torch.bool)
    out = module.loss(hidden, tokens, torch.zeros_like(tokens.is_token), targets, mask, ["a", "b"])
    out.total.backward()
    grad = module.profile_embedding.weight.grad
    assert grad is not None and float(grad.abs().sum()) > 0


def test_gene_prediction_logits_match_a_naive_loop_and_exclude_visible_genes():
    module = make_module(gene_prediction=True, cell_profile=True, expression_queries=False)
    with torch.no_grad():
        module.gene_bias.normal_()
    tokens = module.tokenize(counts(n_cells=5), torch.arange(20))
    gen = torch.Generator().manual_seed(3)
    gene_mask = (torch.rand(tokens.gene_ids.shape, generator=gen) < 0.3) & tokens.is_context
    assert gene_mask.any()
    no_phenotypes = torch.full((5, 2), -1)
    hidden = module.encode(tokens, no_phenotypes, gene_mask=gene_mask)
    logits = module.gene_logits(hidden, tokens, gene_mask)

    weight, bias = module.gene_embedding.weight.detach(), module.gene_bias.detach()
    expected = []
    for cell, slot in gene_mask.nonzero().tolist():
        out = module.gene_head(hidden[cell, module.n_prefix + slot]).detach()
        row = (weight @ out) / np.sqrt(weight.shape[1]) + bias
        for other in range(tokens.gene_ids.shape[1]):
            if tokens.is_context[cell, other] and not gene_mask[cell, other]:
                row[tokens.gene_ids[cell, other]] = -np.inf
        expected.append(row)
    torch.testing.assert_close(logits.detach(), torch.stack(expected))
    # the true gene is never excluded, and each cell's hidden genes stay candidates
    assert torch.isfinite(logits[torch.arange(len(logits)), tokens.gene_ids[gene_mask]]).all()

    out = module.loss(
        hidden,
        tokens,
        torch.zeros_like(gene_mask),
        no_phenotypes,
        torch.zeros((5, 2), dtype=torch.bool),
        ["a", "b"],
        gene_mask=gene_mask,
    )
    torch.testing.assert_close(
        out.components["gene"], torch.nn.functional.cross_entropy(logits, tokens.gene_ids[gene_mask])
    )
    out.total.backward()
    assert module.gene_mask.grad.abs().sum() > 0 and module.gene_embedding.weight.grad.abs().sum() > 0


def test_gene_mask_hides_the_identity_and_the_profile_value_but_keeps_the_value_bin():
    module = make_module(gene_prediction=True, cell_profile=True, expression_queries=False)
    tokens = module.tokenize(counts(n_cells=4), torch.arange(20))
    gene_mask = torch.zeros_like(tokens.is_context)
    gene_mask[:, 0] = tokens.is_context[:, 0]
    no_phenotypes = torch.full((4, 2), -1)
    x, _ = module.embed_tokens(tokens, no_phenotypes, gene_mask=gene_mask)
    # the hidden token: [GENE] mask + its own value bin, whatever its gene
    bins = module.bin_embedding(tokens.bins[:, 0])
    torch.testing.assert_close(x[:, module.n_prefix], module.gene_mask + bins)
    # its value leaves the [PROFILE] input, exactly as a hidden value does
    as_hidden_value, _ = module.embed_tokens(tokens, no_phenotypes, value_mask=gene_mask)
    torch.testing.assert_close(x[:, module.profile_index], as_hidden_value[:, module.profile_index])
    plain, _ = module.embed_tokens(tokens, no_phenotypes)
    assert not torch.allclose(x[:, module.profile_index], plain[:, module.profile_index])
    with pytest.raises(ValueError, match="gene_prediction"):
        make_module(expression_queries=False).embed_tokens(tokens, no_phenotypes, gene_mask=gene_mask)


@pytest.mark.parametrize("autocast", [False, True])
def test_profile_carries_no_trace_of_a_hidden_gene_even_under_bf16_autocast(autocast):
    from dataclasses import replace

    module = make_module(n_genes=40, gene_prediction=True, cell_profile=True, expression_queries=False)
    x = torch.zeros(1, 40)
    x[0, :6] = torch.tensor([5.0, 3.0, 2.0, 2.0, 1.0, 1.0])
    tokens = module.tokenize(to_torch_csr(sp.csr_matrix(x.numpy())), torch.arange(40))
    slot = 0
    gene = int(tokens.gene_ids[0, slot])
    absent = 30  # a gene the cell does not express
    swapped = replace(
        tokens,
        gene_ids=tokens.gene_ids.masked_fill(tokens.gene_ids == gene, absent),
        all_genes=tokens.all_genes.masked_fill(tokens.all_genes == gene, absent),
    )
    hidden = torch.zeros_like(tokens.is_context)
    hidden[0, slot] = True
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), torch.no_grad():
        a = module.profile(tokens, hidden)
        b = module.profile(swapped, hidden)
        c = module.profile(tokens, None)
    assert torch.equal(a, b)  # which gene was hidden cannot be read from the profile
    assert not torch.allclose(a, c)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"n_heads": 3}, "n_heads must divide d_model, got d_model=16, n_heads=3"),
        ({"n_heads": 0}, "n_heads must be a positive integer"),
        ({"max_length": 0}, "max_length must be a positive integer"),
        ({"n_bins": 1}, "n_bins must be at least 2"),
        ({"value_encoding": "log"}, r"value_encoding must be one of \['binned', 'continuous'\]"),
        ({"binning": "uniform"}, "binning must be one of"),
        ({"phenotype_input": "mean"}, "phenotype_input must be one of"),
        ({"label_smoothing": 2.0}, r"label_smoothing must be a number in \[0, 1\)"),
    ],
)
def test_the_public_module_refuses_settings_it_cannot_run_with(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_module(**overrides)


def test_self_attention_refuses_heads_that_do_not_divide_the_width():
    with pytest.raises(ValueError, match="n_heads must divide d_model, got d_model=15, n_heads=2"):
        SelfAttention(15, 2)
