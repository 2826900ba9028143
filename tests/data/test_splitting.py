from __future__ import annotations

import warnings
from types import SimpleNamespace

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader

import sctransformer as sct
from sctransformer.data import (
    EpochBatchSampler,
    EpochSeededRandomSampler,
    LengthBucketedSampler,
    expressed_per_cell,
    make_resumable,
    rank_batch_sizes,
)

from ..conftest import QUIET, TINY


def padding(order: list[int], lengths: np.ndarray, batch_size: int) -> int:
    """Padded token slots when consecutive runs of batch_size items are padded to their longest."""
    total = 0
    for start in range(0, len(order), batch_size):
        batch = lengths[order[start : start + batch_size]]
        total += int(batch.max() * len(batch) - batch.sum())
    return total


def test_length_buckets_visit_every_item_once_and_cut_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 300, size=1003)
    batch_size = 16
    sampler = LengthBucketedSampler(lengths, batch_size, seed=7, pool_batches=10)
    random = EpochSeededRandomSampler(len(lengths), seed=7)
    orders = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        random.set_epoch(epoch)
        order = list(sampler)
        assert sorted(order) == list(range(len(lengths)))  # a permutation: nothing skipped or repeated
        assert order == list(sampler)  # a function of (seed, epoch) alone
        assert padding(order, lengths, batch_size) < 0.2 * padding(list(random), lengths, batch_size)
        orders.append(order)
    assert orders[0] != orders[1]
    # the one partial batch comes last, so a BatchSampler of the same size cuts the sorted batches
    batches = list(torch.utils.data.BatchSampler(orders[0], batch_size, drop_last=False))
    assert all(len(b) == batch_size for b in batches[:-1]) and len(batches[-1]) == len(lengths) % batch_size


def test_the_training_loader_takes_the_loader_options_of_datasplitter_kwargs(adata):
    import lightning.pytorch as pl

    seen = {}

    class Spy(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            loader = trainer.train_dataloader
            seen.update(
                timeout=loader.timeout, prefetch_factor=loader.prefetch_factor, init=loader.worker_init_fn
            )

    def init(worker_id: int) -> None:  # a worker_init_fn of the user's
        return None

    sct.setup_anndata(adata, layer="counts")
    model = sct.GeneTransformer(adata, **TINY)
    options = {"num_workers": 1, "prefetch_factor": 3, "timeout": 120, "worker_init_fn": init}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(max_epochs=1, datasplitter_kwargs=options, callbacks=[Spy()], **QUIET)
    assert seen == {"timeout": 120, "prefetch_factor": 3, "init": init}


def test_expressed_per_cell_counts_non_zeros_of_sparse_dense_and_explicit_zeros():
    x = sp.random(50, 30, density=0.3, format="csr", random_state=0, dtype=np.float32)
    x.data[:5] = 0  # explicit zeros are not expressed
    adata = sct.datasets.synthetic(50, 30, n_markers=5)
    adata.X = x
    expected = (x.toarray() != 0).sum(1)
    np.testing.assert_array_equal(expressed_per_cell(adata, layer=None, chunk_size=7), expected)
    assert x.nnz == (x.data != 0).sum() + 5  # the user's matrix keeps its explicit zeros
    adata.X = x.toarray()
    np.testing.assert_array_equal(expressed_per_cell(adata, layer=None, chunk_size=7), expected)
    columns = np.array([0, 3, 4, 17, 29])
    for matrix in (x, x.toarray()):
        adata.X = matrix
        np.testing.assert_array_equal(
            expressed_per_cell(adata, layer=None, columns=columns, chunk_size=7),
            (x.toarray()[:, columns] != 0).sum(1),
        )


def test_length_buckets_count_only_the_genes_of_the_vocabulary(adata, tmp_path):
    sct.setup_anndata(adata, layer="counts")
    sct.GeneTransformer(adata, **TINY).save(tmp_path / "m")
    extra = sp.random(adata.n_obs, 40, density=0.5, format="csr", random_state=1, dtype=np.float32)
    extra.data = np.ceil(extra.data * 5)
    counts = sp.hstack([adata.layers["counts"], extra]).tocsr()
    names = [*adata.var_names, *(f"unknown_{i}" for i in range(40))]
    query = ad.AnnData(counts, obs=adata.obs.copy(), var=pd.DataFrame(index=names), layers={"counts": counts})
    model = sct.GeneTransformer.load(tmp_path / "m", adata=query)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(max_epochs=1, batch_size=16, length_bucketing=True, **QUIET)
    tokens = np.minimum((adata.layers["counts"] != 0).sum(1).A1, TINY["max_length"])
    np.testing.assert_array_equal(model.trainer.datamodule.lengths, tokens)


def test_training_with_length_buckets_is_seeded_and_learns(adata):
    sct.setup_anndata(adata, layer="counts", phenotype_keys=["cell_type"])
    states = []
    for _ in range(2):
        model = sct.GeneTransformer(adata, **TINY, seed=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.train(max_epochs=2, batch_size=16, length_bucketing=True, seed=3, **QUIET)
        states.append(model.module.state_dict())
    for key in states[0]:
        torch.testing.assert_close(states[0][key], states[1][key], rtol=0, atol=0)
    assert model.train_settings_["length_bucketing"] is True
    assert np.isfinite(model.history["loss_train"].to_numpy()).all()


@pytest.mark.parametrize(
    ("n", "batch_size", "world_size"), [(96, 16, 2), (97, 16, 2), (33, 16, 2), (100, 7, 3), (5, 4, 1)]
)
def test_ranks_share_out_every_item_once_in_equal_numbers_of_minibatches(n, batch_size, world_size):
    seen, counts = [], set()
    for rank in range(world_size):
        sampler = EpochBatchSampler(
            EpochSeededRandomSampler(n, seed=1), batch_size, rank=rank, world_size=world_size
        )
        sampler.set_epoch(3)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        assert all(0 < len(b) <= batch_size for b in batches)
        counts.add(len(batches))
        seen += [i for b in batches for i in b]
    assert len(counts) == 1  # DDP waits forever if one rank has a minibatch more
    assert sorted(seen) == list(range(n))
    if world_size == 1:  # one process: full minibatches in the epoch's order, the partial one last
        order = EpochSeededRandomSampler(n, seed=1)
        order.set_epoch(3)
        assert seen == list(order)


def test_rank_batch_sizes_keep_full_minibatches_where_ranks_agree_and_drop_last_drops():
    assert rank_batch_sizes(96, 16, 0, 2) == (0, [16, 16, 16])
    assert rank_batch_sizes(96, 16, 1, 2) == (48, [16, 16, 16])
    # 97 cells: 48 and 49; plain cuts would give 3 and 4 minibatches, so both cut into 4 near-equal ones
    assert rank_batch_sizes(97, 16, 0, 2) == (0, [12, 12, 12, 12])
    assert rank_batch_sizes(97, 16, 1, 2) == (48, [13, 12, 12, 12])
    assert rank_batch_sizes(97, 16, 1, 2, drop_last=True) == (48, [16, 16, 16])


def test_fewer_items_than_ranks_is_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="cannot be shared out between 4"):
        rank_batch_sizes(3, 32, 0, 4)
    # 47 cells on 3 ranks with drop_last: a share of 15 holds no full minibatch of 16
    with pytest.raises(ValueError, match="at least batch_size=16 training cells"):
        rank_batch_sizes(47, 16, 0, 3, drop_last=True)


@pytest.mark.parametrize(("world_size", "drop_last"), [(1, False), (2, False), (3, False), (3, True)])
def test_every_rank_gets_length_bucketed_minibatches_of_its_own_share(world_size, drop_last):
    lengths = np.random.default_rng(0).integers(1, 257, size=1000)
    batch_size = 16

    def padded_share(batches: list[list[int]]) -> float:
        slots = sum(len(b) * lengths[b].max() for b in batches)
        return 1 - sum(lengths[b].sum() for b in batches) / slots

    seen, counts = [], set()
    for rank in range(world_size):
        place = {"rank": rank, "world_size": world_size, "drop_last": drop_last}
        bucketed = EpochBatchSampler(LengthBucketedSampler(lengths, batch_size, seed=0), batch_size, **place)
        random = EpochBatchSampler(EpochSeededRandomSampler(len(lengths), seed=0), batch_size, **place)
        batches = list(bucketed)
        assert [len(b) for b in batches] == [len(b) for b in random]  # the same cut, other items
        assert padded_share(batches) < 0.1 < 0.4 < padded_share(list(random))
        counts.add(len(batches))
        seen += [i for b in batches for i in b]
    assert len(counts) == 1 and len(seen) == len(set(seen))
    assert len(seen) == len(lengths) or drop_last


def test_drop_last_with_length_buckets_leaves_out_random_cells_not_the_longest():
    lengths = np.random.default_rng(1).integers(1, 300, size=200)  # 200 = 12 minibatches of 16 + 8
    sampler = EpochBatchSampler(LengthBucketedSampler(lengths, 16, seed=0), 16, drop_last=True)
    dropped = np.zeros(len(lengths))
    n_epochs = 100
    for epoch in range(n_epochs):
        sampler.set_epoch(epoch)
        seen = np.zeros(len(lengths), dtype=bool)
        seen[[i for b in sampler for i in b]] = True
        dropped += ~seen
    longest = lengths >= np.quantile(lengths, 0.8)
    overall = dropped.mean() / n_epochs
    assert overall == pytest.approx(8 / 200)
    assert dropped[longest].mean() / n_epochs < 1.5 * overall  # the old order dropped only the longest


def test_one_item_minibatches_on_ranks_of_unequal_shares_are_never_empty():
    # 30 items on 4 ranks: shares of 7 and 8; 8 one-item minibatches each would leave the ranks
    # with 7 items an empty minibatch, so every rank cuts 7 and one minibatch of a rank of 8 has 2
    assert rank_batch_sizes(30, 1, 0, 4) == (0, [1] * 7)
    assert rank_batch_sizes(30, 1, 1, 4) == (7, [2] + [1] * 6)
    seen, counts = [], set()
    for rank in range(4):
        sampler = EpochBatchSampler(EpochSeededRandomSampler(30, seed=0), 1, rank=rank, world_size=4)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        assert all(1 <= len(b) <= 2 for b in batches)
        counts.add(len(batches))
        seen += [i for b in batches for i in b]
    assert counts == {7}
    assert sorted(seen) == list(range(30))


def _resumable_loader(
    n: int, batch_size: int, seed: int, **names: list[str]
) -> tuple[DataLoader, EpochBatchSampler]:
    """A training loader as the data splitter makes it, with a stand-in trainer 2 minibatches into epoch 0."""
    sampler = EpochBatchSampler(EpochSeededRandomSampler(n, seed=seed), batch_size)
    loader = DataLoader(range(n), sampler=sampler, batch_size=None)
    progress = SimpleNamespace(current=SimpleNamespace(processed=2))
    trainer = SimpleNamespace(
        current_epoch=0, fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress))
    )
    make_resumable(loader, SimpleNamespace(trainer=trainer), sampler, items=np.arange(n), **names)
    return loader, sampler


def test_a_loader_state_records_what_cuts_the_minibatches_and_refuses_other_settings():
    state = _resumable_loader(90, 32, seed=2)[0].state_dict()
    assert state["epoch"] == 0 and state["batches"] == 2
    assert (state["seed"], state["cells"], state["batch_size"], state["batches_per_epoch"]) == (2, 90, 32, 3)
    loader, sampler = _resumable_loader(90, 32, seed=2)
    loader.load_state_dict(state)  # the same settings: the epoch goes on after its first 2 minibatches
    whole = sampler.batches()
    assert list(sampler) == whole[2:]
    for other, named in [
        ((90, 16, 2), "batch_size: 32 in the checkpoint, 16 now"),
        ((90, 32, 3), "seed: 2 in the checkpoint, 3 now"),
        ((100, 32, 2), "number of training cells: 90 in the checkpoint, 100 now"),
    ]:
        loader, sampler = _resumable_loader(*other)
        with pytest.raises(ValueError, match="cannot resume from this checkpoint") as error:
            loader.load_state_dict(state)
        assert named in str(error.value)
        assert "same arguments" in str(error.value) and "resume=False" in str(error.value)
        assert sampler.skip == 0


def test_a_loader_state_of_an_older_checkpoint_without_settings_still_resumes():
    loader, sampler = _resumable_loader(90, 16, seed=3)
    loader.load_state_dict({"epoch": 0, "batches": 2})  # the position alone: nothing to check
    assert list(sampler) == sampler.batches()[2:]


def test_a_loader_state_of_other_cells_or_genes_of_the_same_number_is_refused():
    cells, genes = [f"cell_{i}" for i in range(90)], [f"gene_{i}" for i in range(30)]
    state = _resumable_loader(90, 32, seed=2, cell_names=cells, genes=genes)[0].state_dict()
    loader, sampler = _resumable_loader(90, 32, seed=2, cell_names=cells, genes=genes)
    loader.load_state_dict(state)  # the same cells and genes: the epoch goes on
    assert list(sampler) == sampler.batches()[2:]
    # the same genes in another column order: matched by identifier, the same data
    loader, sampler = _resumable_loader(90, 32, seed=2, cell_names=cells, genes=genes[::-1])
    loader.load_state_dict(state)
    assert list(sampler) == sampler.batches()[2:]
    for other, named in [
        ({"cell_names": [f"other_{i}" for i in range(90)], "genes": genes}, "training cells' names"),
        ({"cell_names": cells[::-1], "genes": genes}, "training cells' names"),  # the same, reordered
        ({"cell_names": cells, "genes": [f"ENSG{i}" for i in range(30)]}, "checksum of the data's genes"),
    ]:
        loader, sampler = _resumable_loader(90, 32, seed=2, **other)
        with pytest.raises(ValueError, match="cannot resume from this checkpoint") as error:
            loader.load_state_dict(state)
        assert named in str(error.value) and sampler.skip == 0
    # a checkpoint written before the names were recorded resumes as it did
    older = {k: v for k, v in state.items() if k not in ("cell_names_checksum", "genes_checksum")}
    loader, sampler = _resumable_loader(90, 32, seed=2, cell_names=cells[::-1], genes=genes)
    loader.load_state_dict(older)
    assert list(sampler) == sampler.batches()[2:]
