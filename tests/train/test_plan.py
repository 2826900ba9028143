from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sctransformer.module import Tokenizer
from sctransformer.train import MaskedModelingPlan, mask_genes, mask_tokens, warmup_cosine

from ..module.test_module import make_module


def tokens_for(n_cells: int = 400, n_genes: int = 50, n_queries: int = 4):
    rng = np.random.default_rng(0)
    x = rng.poisson(1.0, size=(n_cells, n_genes)).astype(np.float32)
    return Tokenizer(n_genes, max_length=30, n_bins=4)(
        torch.as_tensor(x),
        torch.arange(n_genes),
        n_queries=n_queries,
        generator=torch.Generator().manual_seed(0),
    )


@pytest.mark.parametrize(("gene_p", "pheno_p"), [(0.15, 0.5), (0.4, 0.1)])
def test_mask_rates_match_the_requested_probabilities(gene_p, pheno_p):
    tokens = tokens_for()
    phenotypes = torch.zeros(400, 3, dtype=torch.long)
    phenotypes[:50, 1] = -1
    gen = torch.Generator().manual_seed(0)
    value_mask, phenotype_mask = mask_tokens(
        tokens, phenotypes, gene_mask_prob=gene_p, phenotype_mask_prob=pheno_p, generator=gen
    )
    eligible = tokens.is_context
    assert tokens.is_query.any()
    n = int(eligible.sum())
    rate = value_mask[eligible].float().mean().item()
    assert abs(rate - gene_p) < 4 * np.sqrt(gene_p * (1 - gene_p) / n)
    assert not value_mask[~eligible].any()  # padding and query tokens are never value targets
    assert phenotype_mask[:50, 1].all()  # unknown phenotypes are always masked
    known = phenotype_mask[:, [0, 2]].float()
    assert abs(known.mean().item() - pheno_p) < 4 * np.sqrt(pheno_p * (1 - pheno_p) / known.numel())


def test_masks_are_reproducible_with_a_seeded_generator():
    tokens = tokens_for(50)
    phenotypes = torch.zeros(50, 1, dtype=torch.long)
    a = mask_tokens(
        tokens,
        phenotypes,
        gene_mask_prob=0.2,
        phenotype_mask_prob=0.5,
        generator=torch.Generator().manual_seed(3),
    )
    b = mask_tokens(
        tokens,
        phenotypes,
        gene_mask_prob=0.2,
        phenotype_mask_prob=0.5,
        generator=torch.Generator().manual_seed(3),
    )
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_gene_identity_masks_avoid_hidden_values_and_keep_the_rate():
    tokens = tokens_for()
    gen = torch.Generator().manual_seed(0)
    value_mask, _ = mask_tokens(
        tokens,
        torch.zeros(400, 0, dtype=torch.long),
        gene_mask_prob=0.3,
        phenotype_mask_prob=0.0,
        generator=gen,
    )
    gene_mask = mask_genes(tokens, value_mask, 0.2, generator=gen)
    assert not (gene_mask & value_mask).any()  # no token loses both its identity and its value
    assert not gene_mask[~tokens.is_context].any()  # never padding or query tokens
    shown = tokens.is_context & ~value_mask
    rate = gene_mask[shown].float().mean().item()
    assert abs(rate - 0.2) < 4 * np.sqrt(0.2 * 0.8 / int(shown.sum()))


def test_warmup_then_cosine_decay():
    factors = [warmup_cosine(s, warmup_steps=10, total_steps=110) for s in range(111)]
    assert factors[0] == pytest.approx(0.1)
    assert factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0)
    assert factors[60] == pytest.approx(0.5)
    assert factors[110] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in itertools.pairwise(factors[10:]))


def test_a_head_that_scored_nothing_in_a_step_is_left_as_it_is_by_the_optimizer():
    """Its zero-weight term (every parameter in every distributed rank's loss) gives it a gradient of 0.

    The plan drops that gradient before the step: AdamW then moves the head neither by momentum nor
    by weight decay, as when the head was left out of the loss.
    """
    module = make_module(
        50,
        n_layers=1,
        max_length=30,
        label_smoothing=0.0,
        expression_queries=False,
        cell_expression_loss=False,
    )
    plan = MaskedModelingPlan(module, column_to_gene=np.arange(50), phenotype_keys=["a", "b"])
    optimizer = torch.optim.AdamW(module.parameters(), lr=0.1, weight_decay=0.1)
    tokens = tokens_for(8, n_queries=0)
    value_mask = tokens.is_context
    for labels_of_b in ([0, 1, 0, 1, 0, 1, 0, 1], [-1] * 8):  # phenotype b: labelled, then not
        targets = torch.stack([torch.zeros(8, dtype=torch.long), torch.tensor(labels_of_b)], 1)
        hidden = module.encode(tokens, torch.full_like(targets, -1), value_mask)
        mask = torch.ones_like(targets, dtype=torch.bool)
        optimizer.zero_grad()
        module.loss(hidden, tokens, value_mask, targets, mask, ["a", "b"]).total.backward()
        plan.on_before_optimizer_step(optimizer)
        before = [p.detach().clone() for p in module.parameters()]
        optimizer.step()
    params = list(module.parameters())
    moved = {id(p) for a, p in zip(before, params, strict=True) if not torch.equal(a, p)}
    assert all(p.grad is None for p in module.phenotype_heads[1].parameters())
    assert not moved & {id(p) for p in module.phenotype_heads[1].parameters()}
    assert {id(p) for p in module.phenotype_heads[0].parameters()} <= moved


@pytest.mark.parametrize(
    ("max_epochs", "max_steps", "total"),
    [
        (4, -1, 12),  # 3 steps per epoch
        (4, 7, 7),
        (2, 20, 6),
        (None, 20, 20),  # max_steps alone: Lightning trains as many epochs as the steps take
        (-1, 20, 20),
    ],
)
def test_the_learning_rate_schedule_spans_the_steps_that_end_the_run(max_epochs, max_steps, total):
    module = make_module(50, n_layers=1, max_length=30)
    plan = MaskedModelingPlan(module, column_to_gene=np.arange(50), phenotype_keys=[])
    plan.trainer = SimpleNamespace(
        datamodule=SimpleNamespace(batches_per_epoch=lambda world_size: 3),
        world_size=1,
        limit_train_batches=1.0,
        accumulate_grad_batches=1,
        max_epochs=max_epochs,
        max_steps=max_steps,
    )
    assert plan._run_steps() == total


def test_a_run_without_end_has_no_learning_rate_schedule():
    plan = MaskedModelingPlan(
        make_module(50, n_layers=1, max_length=30), column_to_gene=np.arange(50), phenotype_keys=[]
    )
    plan.trainer = SimpleNamespace(max_epochs=-1, max_steps=-1)
    with pytest.raises(ValueError, match="set max_epochs or max_steps"):
        plan._run_steps()
