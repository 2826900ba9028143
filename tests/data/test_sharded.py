"""Sharded .h5ad streaming: gene alignment, rank/worker partition, bad shards, and models trained from shards."""

from __future__ import annotations

import gc
import os
import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from scvi.dataloaders._data_splitting import validate_data_split
from torch.utils.data import DataLoader

import sctransformer as sct
from sctransformer.data import (
    ShardBatches,
    ShardBlockSampler,
    ShardedAnnData,
    ShardedDataModule,
    observed_categories,
    shard_buffer_order,
    split_blocks,
)
from sctransformer.data._splitting import check_order_settings

from ..conftest import QUIET, TINY


def _write(adata: ad.AnnData, path) -> str:
    adata.write_h5ad(path)
    return str(path)


@pytest.fixture
def cells():
    return sct.datasets.synthetic(n_cells=150, n_genes=40, n_cell_types=3, seed=3)


@pytest.fixture
def shards(cells, tmp_path):
    """Three shards of ``cells``: the last lacks 5 genes and has its genes in another order."""
    first = cells[:60].copy()
    second = cells[60:100].copy()
    third = cells[100:, ::-1][:, 5:].copy()
    return [_write(a, tmp_path / f"s{i}.h5ad") for i, a in enumerate([first, second, third])]


def _reference_rows(cells: ad.AnnData, genes: pd.Index) -> np.ndarray:
    """Counts of ``cells`` in the columns ``genes`` (numpy, the naive way)."""
    dense = cells.layers["counts"].toarray()
    columns = [list(cells.var_names).index(g) for g in genes]
    return dense[:, columns]


def test_rows_are_aligned_to_the_shared_genes_by_identifier(cells, shards):
    data = ShardedAnnData(shards, layer="counts", phenotype_keys=["cell_type"])
    assert data.shape == (150, 35)
    assert list(data.genes) == [g for g in cells.var_names if g in set(cells.var_names[::-1][5:])]
    got = sp.vstack([data.read_rows(i, 0, n) for i, n in enumerate(data.shard_sizes)]).toarray()
    np.testing.assert_array_equal(got[:, :-1], _reference_rows(cells, data.genes))
    # the last column sums each cell's genes outside the vocabulary; the third shard has none
    others = cells.layers["counts"].sum(1).A1 - got[:, :-1].sum(1)
    others[100:] = 0
    np.testing.assert_array_equal(got[:, -1], others)
    assert list(data.obs_names) == list(cells.obs_names)
    np.testing.assert_array_equal(
        data.phenotype_codes["cell_type"],
        pd.Categorical(cells.obs["cell_type"], categories=data.phenotype_categories["cell_type"]).codes,
    )


def test_numbers_stored_as_int_in_one_shard_and_float_in_another_are_one_category_each(cells, tmp_path):
    ints, floats = cells[:10].copy(), cells[10:20].copy()
    ints.obs["cluster"] = ints.obs["donor"] = np.array([1, 2] * 5, dtype=np.int64)
    floats.obs["cluster"] = np.array([np.nan, 2.0] + [1.0, 2.0] * 4)  # NaN: unknown
    floats.obs["donor"] = np.array([1.0, 2.0] * 5)
    paths = [_write(ints, tmp_path / "int.h5ad"), _write(floats, tmp_path / "float.h5ad")]
    data = ShardedAnnData(paths, layer="counts", phenotype_keys=["cluster"], batch_key="donor")
    # as for the same files concatenated in memory (int64 and float64 make float64)
    in_memory = ad.concat([ints, floats])
    assert data.phenotype_categories["cluster"] == observed_categories(in_memory.obs["cluster"])
    assert data.phenotype_categories["cluster"] == ["1.0", "2.0"]
    np.testing.assert_array_equal(data.phenotype_codes["cluster"], [0, 1] * 5 + [-1, 1] + [0, 1] * 4)
    assert data.batch_categories == observed_categories(in_memory.obs["donor"]) == ["1.0", "2.0"]
    np.testing.assert_array_equal(data.batch_codes, [0, 1] * 10)


def test_float32_labels_of_shards_are_named_as_in_memory(cells, tmp_path):
    first, second = cells[:10].copy(), cells[10:20].copy()
    for part in (first, second):
        part.obs["dose"] = np.array([0.1, 0.3] * 5, dtype=np.float32)
    paths = [_write(first, tmp_path / "a.h5ad"), _write(second, tmp_path / "b.h5ad")]
    data = ShardedAnnData(paths, layer="counts", phenotype_keys=["dose"])
    in_memory = ad.concat([first, second])
    assert data.phenotype_categories["dose"] == observed_categories(in_memory.obs["dose"]) == ["0.1", "0.3"]
    np.testing.assert_array_equal(data.phenotype_codes["dose"], [0, 1] * 10)


def test_one_phenotype_key_may_be_given_as_a_string(shards):
    data = ShardedAnnData(shards, layer="counts", phenotype_keys="cell_type")
    assert data.phenotype_keys == ["cell_type"]
    as_list = ShardedAnnData(shards, layer="counts", phenotype_keys=["cell_type"])
    assert data.phenotype_categories == as_list.phenotype_categories
    np.testing.assert_array_equal(data.phenotype_codes["cell_type"], as_list.phenotype_codes["cell_type"])


def test_outer_join_keeps_every_gene_and_reads_zeros_where_a_shard_lacks_it(cells, shards):
    data = ShardedAnnData(shards, layer="counts", join="outer")
    assert data.n_vars == 40
    third = data.read_rows(2, 0, 50).toarray()[:, :-1]
    expected = _reference_rows(cells[100:], data.genes)
    missing = ~data.genes.isin(cells.var_names[::-1][5:])
    expected[:, missing] = 0
    np.testing.assert_array_equal(third, expected)


def test_minibatches_and_random_samples_read_the_right_cells(cells, shards):
    data = ShardedAnnData(shards, layer="counts")
    reference = _reference_rows(cells, data.genes)
    indices = np.array([3, 59, 60, 61, 99, 100, 149])
    seen = []
    for positions, x in data.iter_minibatches(3, indices):
        np.testing.assert_array_equal(x.to_dense().numpy()[:, :-1], reference[positions])
        seen += positions.tolist()
    assert seen == indices.tolist()
    sample = data.sample(20, seed=0)
    rows = np.sort(np.random.default_rng(0).choice(150, size=20, replace=False))
    np.testing.assert_array_equal(sample.toarray()[:, :-1], reference[rows])


@pytest.mark.parametrize("shuffle_buffer", [None, 16])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_each_cell_is_seen_once_per_epoch_over_all_ranks_and_ranks_get_equal_batch_counts(
    world_size, shuffle_buffer
):
    blocks = split_blocks([37, 0, 64, 5], block_size=8)
    n_cells = 37 + 64 + 5
    orders = []
    for epoch in (0, 1):
        cells, lengths = [], []
        for rank in range(world_size):
            sampler = ShardBlockSampler(
                blocks, 10, seed=4, shuffle_buffer=shuffle_buffer, rank=rank, world_size=world_size
            )
            sampler.set_epoch(epoch)
            batches = list(sampler)
            lengths.append(len(batches))
            assert len(batches) == len(sampler)
            sizes = [sum(e - s for _, s, e in b) for b in batches]
            assert max(sizes) <= 10
            cells += [(shard, row) for b in batches for shard, s, e in b for row in range(s, e)]
        assert len(set(lengths)) == 1
        assert sorted(cells) == sorted({(int(sh), r) for sh, s, e in blocks for r in range(s, e)})
        assert len(cells) == n_cells
        orders.append(cells)
    assert orders[0] != orders[1]  # a new order each epoch


def _naive_shard_buffer_order(blocks: np.ndarray, buffer_cells: int, seed: int) -> list[tuple[int, int, int]]:
    """The documented order, with loops: shards in random order, blocks in row order, shuffled per buffer."""
    generator = torch.Generator().manual_seed(seed)
    shards = sorted({int(b[0]) for b in blocks})
    places = torch.randperm(len(shards), generator=generator).tolist()
    place = {shard: places[i] for i, shard in enumerate(shards)}
    sequence = sorted((tuple(int(v) for v in b) for b in blocks), key=lambda b: (place[b[0]], b[1]))
    windows, start = [], 0
    for _, a, b in sequence:
        windows.append(start // buffer_cells)
        start += b - a
    within = torch.randperm(len(sequence), generator=generator).tolist()
    return [sequence[i] for i in sorted(range(len(sequence)), key=lambda i: (windows[i], within[i]))]


@pytest.mark.parametrize("buffer_cells", [1, 10, 24, 1000])
def test_shard_buffer_order_equals_a_naive_reference(buffer_cells):
    blocks = split_blocks([37, 0, 64, 5, 12], block_size=8)
    blocks = blocks[np.random.default_rng(0).permutation(len(blocks))]  # any input order
    for seed in (0, 1):
        got = shard_buffer_order(blocks, buffer_cells, torch.Generator().manual_seed(seed))
        assert [tuple(int(v) for v in b) for b in got] == _naive_shard_buffer_order(
            blocks, buffer_cells, seed
        )
    assert len(shard_buffer_order(blocks[:0], 4, torch.Generator())) == 0


def test_shard_by_shard_minibatches_stay_in_one_buffer_and_ranks_read_their_own_shards():
    blocks = split_blocks([64, 64, 64, 64], block_size=4)  # buffers of 16 cells: 4 per shard
    shards_of_rank, first_shards = [], set()
    for rank in (0, 1):
        sampler = ShardBlockSampler(blocks, 8, seed=3, shuffle_buffer=16, rank=rank, world_size=2)
        for epoch in range(4):
            sampler.set_epoch(epoch)
            batches = list(sampler)
            for segments in batches:  # one shard, rows within one buffer
                assert len({shard for shard, _, _ in segments}) == 1
                assert min(a for _, a, _ in segments) // 16 == (max(b for _, _, b in segments) - 1) // 16
            if epoch == 0:
                shards_of_rank.append({shard for segments in batches for shard, _, _ in segments})
            first_shards.add(batches[0][0][0])
    assert len(shards_of_rank[0]) == len(shards_of_rank[1]) == 2
    assert shards_of_rank[0].isdisjoint(shards_of_rank[1])  # each rank reads its own shards
    assert len(first_shards) > 1  # the shard order changes with the epoch
    mixed = ShardBlockSampler(blocks, 8, seed=3)  # the default: all blocks shuffled together
    assert max(len({shard for shard, _, _ in segments}) for segments in mixed) > 1


@pytest.mark.parametrize(
    ("sizes", "world_size", "buffer"),
    [([50, 70, 30], 2, 20), ([64] * 4, 2, 48), ([60] * 6, 3, 16), ([37, 0, 64, 5], 3, 9)],
)
def test_ranks_reading_shard_by_shard_share_only_the_shards_at_the_ends_of_their_runs(
    sizes, world_size, buffer
):
    blocks = split_blocks(sizes, block_size=4)
    for epoch in range(3):
        runs = []
        for rank in range(world_size):
            sampler = ShardBlockSampler(
                blocks, 6, seed=1, shuffle_buffer=buffer, rank=rank, world_size=world_size
            )
            sampler.set_epoch(epoch)
            runs.append({shard for segments in sampler for shard, _, _ in segments})
        for a in range(world_size):
            for b in range(a + 1, world_size):
                assert len(runs[a] & runs[b]) <= (1 if b == a + 1 else 0), (epoch, runs)
        assert sum(len(run) for run in runs) <= sum(n > 0 for n in sizes) + world_size - 1


def test_a_run_resumed_with_another_shuffle_buffer_is_refused(cells, shards):
    blocks = split_blocks([64, 64], block_size=4)
    recorded = ShardBlockSampler(blocks, 8, seed=0, shuffle_buffer=32).order_settings()
    check_order_settings(recorded, ShardBlockSampler(blocks, 8, seed=0, shuffle_buffer=32).order_settings())
    with pytest.raises(
        ValueError,
        match=r"shuffle_buffer \(None: all blocks shuffled together\): 32 in the checkpoint, None now",
    ):
        check_order_settings(recorded, ShardBlockSampler(blocks, 8, seed=0).order_settings())
    # a checkpoint of a version before shuffle_buffer shuffled all blocks together
    older = {
        k: v
        for k, v in ShardBlockSampler(blocks, 8, seed=0).order_settings().items()
        if k != "shuffle_buffer"
    }
    check_order_settings(older, ShardBlockSampler(blocks, 8, seed=0).order_settings())
    with pytest.raises(ValueError, match=r"None in the checkpoint, 32 now"):
        check_order_settings(older, ShardBlockSampler(blocks, 8, seed=0, shuffle_buffer=32).order_settings())
    data = ShardedAnnData(shards, layer="counts")
    for bad in (0, -3, 2.5, "64", True):
        with pytest.raises(ValueError, match=r"^shuffle_buffer must be a positive integer"):
            ShardedDataModule(
                data, batch_size=8, train_size=0.9, validation_size=None, seed=0, shuffle_buffer=bad
            )
        with pytest.raises(ValueError, match=r"^shuffle_buffer must be a positive integer"):
            ShardBlockSampler(blocks, 8, seed=0, shuffle_buffer=bad)
    for buffer, batch_size in ((8, 8), (15, 16)):  # one block per buffer, or less than a minibatch
        with pytest.raises(ValueError, match="would leave minibatches unshuffled"):
            ShardedDataModule(
                data,
                batch_size=batch_size,
                train_size=0.9,
                validation_size=None,
                seed=0,
                shuffle_buffer=buffer,
            )


def test_shard_options_on_in_memory_data_are_refused_before_training(cells):
    sct.setup_anndata(cells, layer="counts")
    model = sct.GeneTransformer(cells, **TINY)
    for option in ({"shuffle_buffer": 64}, {"block_size": 4}):
        with pytest.raises(ValueError, match="apply to data streamed from shards"):
            model.train(max_epochs=1, accelerator="cpu", datasplitter_kwargs=option, **QUIET)
    assert model.history is None or len(model.history) == 0


def test_in_memory_options_on_shards_are_refused_by_name_before_training(shards):
    model = sct.GeneTransformer.from_shards(ShardedAnnData(shards, layer="counts"), **TINY)
    for option, message in [
        ({"drop_last": True}, r"\['drop_last'\] do not apply to data streamed from shards, which takes"),
        ({"pin_memory": True, "num_workers": 0}, r"\['pin_memory'\] do not apply"),
        ({"batch_size": 8}, r"\['batch_size'\] are set by train\(\) itself.*train\(batch_size=...\)"),
    ]:
        with pytest.raises(ValueError, match=message):
            model.train(max_epochs=1, accelerator="cpu", datasplitter_kwargs=option, **QUIET)
    assert not model.is_trained


def test_a_model_trains_on_shards_read_shard_by_shard(shards):
    data = ShardedAnnData(shards, layer="counts", phenotype_keys=["cell_type"])
    model = sct.GeneTransformer.from_shards(data, **TINY)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(
            max_epochs=2,
            batch_size=16,
            accelerator="cpu",
            datasplitter_kwargs={"shuffle_buffer": 32},
            **QUIET,
        )
    assert len(model.history["loss_train"]) == 2
    assert np.isfinite(model.history["loss_train"].to_numpy()).all()


def test_one_cell_minibatches_on_ranks_of_unequal_shares_are_never_empty(cells, tmp_path):
    # 30 cells on 4 ranks: shares of 7 and 8 cells; 8 one-cell minibatches each would leave the
    # ranks with 7 cells an empty minibatch, which cannot be read
    data = ShardedAnnData([_write(cells[:30].copy(), tmp_path / "s.h5ad")], layer="counts")
    blocks = split_blocks(data.shard_sizes, 8)
    seen = []
    for rank in range(4):
        sampler = ShardBlockSampler(blocks, 1, seed=0, rank=rank, world_size=4)
        batches = list(sampler)
        assert len(batches) == len(sampler) == 7  # equal counts on every rank
        for segments in batches:
            assert 1 <= ShardBatches(data)[segments]["X"].shape[0] <= 2
        seen += [row for b in batches for _, s, e in b for row in range(s, e)]
    assert sorted(seen) == list(range(30))  # every cell once


def test_skipping_batches_resumes_the_same_epoch_order():
    blocks = split_blocks([100], block_size=4)
    sampler = ShardBlockSampler(blocks, 8, seed=0)
    sampler.set_epoch(2)
    whole = list(sampler)
    sampler.skip_batches(5)
    assert list(sampler) == whole[5:]
    assert list(sampler) == whole  # the skip applies to one iteration only


def test_workers_read_the_same_minibatches_as_the_main_process(shards):
    data = ShardedAnnData(shards, layer="counts", phenotype_keys=["cell_type"])
    sampler = ShardBlockSampler(split_blocks(data.shard_sizes, 8), 16, seed=0)

    def batches(num_workers):
        loader = DataLoader(ShardBatches(data), sampler=sampler, batch_size=None, num_workers=num_workers)
        return [(b["X"].to_dense(), b["phenotype:cell_type"]) for b in loader]

    for (x0, y0), (x2, y2) in zip(batches(0), batches(2), strict=True):
        torch.testing.assert_close(x0, x2)
        torch.testing.assert_close(y0, y2)


def test_the_split_is_disjoint_and_covers_every_cell(shards):
    data = ShardedAnnData(shards, layer="counts")
    module = ShardedDataModule(data, batch_size=16, train_size=0.7, validation_size=0.2, seed=0, block_size=4)
    parts = [module.train_idx, module.val_idx, module.test_idx]
    assert sum(len(p) for p in parts) == 150
    assert len(np.unique(np.concatenate(parts))) == 150
    assert abs(len(module.val_idx) - 30) <= 4


@pytest.mark.parametrize(("train_size", "validation_size"), [(0.9, None), (0.6, 0.2)])
def test_shards_too_small_for_a_validation_block_are_split_by_cells_as_in_memory(
    cells, tmp_path, train_size, validation_size
):
    # two shards of 5 cells: 2 blocks of up to 8 cells, too few for scvi-tools' rule on blocks to
    # give validation (or test) a block; in memory, 10 cells give 9 + 1 (and 6 + 2 + 2)
    paths = [_write(cells[a:b].copy(), tmp_path / f"t{i}.h5ad") for i, (a, b) in enumerate([(0, 5), (5, 10)])]
    data = ShardedAnnData(paths, layer="counts", phenotype_keys=["cell_type"])
    module = ShardedDataModule(
        data, batch_size=4, train_size=train_size, validation_size=validation_size, seed=0
    )
    n_train, n_val = validate_data_split(10, train_size, validation_size)
    assert (module.n_train, module.n_val, len(module.test_idx)) == (n_train, n_val, 10 - n_train - n_val)
    parts = np.concatenate([module.train_idx, module.val_idx, module.test_idx])
    assert sorted(parts.tolist()) == list(range(10))  # disjoint, every cell once
    for blocks in (module.train_blocks, module.val_blocks, module.test_blocks):
        assert ((blocks[:, 1] < blocks[:, 2]) & (blocks[:, 2] <= data.shard_sizes[blocks[:, 0]])).all()
    validation = list(module.val_dataloader())  # the validation loader reads those cells
    expected = data.phenotype_codes["cell_type"][module.val_idx]
    np.testing.assert_array_equal(torch.cat([b["phenotype:cell_type"] for b in validation])[:, 0], expected)


def test_shards_of_enough_blocks_keep_the_split_by_blocks(shards):
    data = ShardedAnnData(shards, layer="counts")
    module = ShardedDataModule(data, batch_size=16, train_size=0.9, validation_size=None, seed=5)
    blocks = split_blocks(data.shard_sizes, 8)  # 8 + 5 + 7 blocks: 18 train, 2 validate
    order = np.random.default_rng(5).permutation(len(blocks))
    np.testing.assert_array_equal(module.val_blocks, blocks[np.sort(order[:2])])
    np.testing.assert_array_equal(module.train_blocks, blocks[np.sort(order[2:])])


def test_a_model_trained_on_small_shards_validates_and_calibrates(cells, tmp_path):
    paths = [_write(cells[a:b].copy(), tmp_path / f"t{i}.h5ad") for i, (a, b) in enumerate([(0, 5), (5, 10)])]
    model = sct.GeneTransformer.from_shards(
        ShardedAnnData(paths, layer="counts", phenotype_keys=["cell_type"]), **TINY
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(max_epochs=1, batch_size=4, **QUIET)
    assert len(model.validation_indices) == 1
    assert np.isfinite(model.history["loss_validation"].to_numpy()).all()
    assert "cell_type" in model.calibration_  # fitted on that validation cell


def test_a_model_trained_from_shards_embeds_them_as_it_embeds_the_same_cells_in_memory(
    cells, shards, tmp_path
):
    data = ShardedAnnData(shards, layer="counts", phenotype_keys=["cell_type"])
    model = sct.GeneTransformer.from_shards(data, **TINY)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(max_epochs=2, batch_size=16, **QUIET)
    assert model.is_trained_ and len(model.history["loss_train"]) == 2
    assert len(model.train_indices) + len(model.validation_indices) == 150
    from_shards = model.get_latent_representation(data, batch_size=7)
    # the same files in memory (a gene a shard lacks is a zero there, so library sizes agree)
    cells = ad.concat([ad.read_h5ad(p) for p in shards], join="outer")
    in_memory = model.get_latent_representation(cells, batch_size=50)
    np.testing.assert_allclose(from_shards, in_memory, rtol=1e-5, atol=1e-5)
    table = model.predict(data)
    assert list(table.index) == list(cells.obs_names)
    torch.testing.assert_close(
        torch.as_tensor(table["cell_type_confidence"].to_numpy()),
        torch.as_tensor(model.predict(cells)["cell_type_confidence"].to_numpy()),
    )
    assert "cell_type" in model.calibration_  # calibrated on the validation blocks of the shards
    model.save(tmp_path / "model")
    loaded = sct.GeneTransformer.load(tmp_path / "model")
    np.testing.assert_array_equal(loaded.get_latent_representation(data, batch_size=7), from_shards)


def test_another_models_inference_on_shards_keeps_genes_that_one_shard_lacks(cells, shards):
    sct.setup_anndata(cells, layer="counts")
    model = sct.GeneTransformer(cells, **TINY)  # knows all 40 genes; the third shard lacks 5
    data = ShardedAnnData(shards, layer="counts")  # an inner join: those 5 out of every shard
    assert len(data.genes) == 35
    in_memory = model.get_latent_representation(ad.concat([ad.read_h5ad(p) for p in shards], join="outer"))
    np.testing.assert_allclose(model.get_latent_representation(data), in_memory, rtol=1e-5, atol=1e-5)
    alone = model.get_latent_representation(ShardedAnnData(shards[:1], layer="counts"))
    np.testing.assert_allclose(alone, in_memory[:60], rtol=1e-5, atol=1e-5)  # whatever else is listed
    genes_before = list(data.genes)
    aligned = data.with_genes(cells.var_names)
    assert list(data.genes) == genes_before and len(aligned.genes) == 40  # data itself is unchanged
    np.testing.assert_array_equal(
        aligned.read_rows(2, 0, 5).toarray()[:, :-1],
        _reference_rows(cells[100:105], cells.var_names) * cells.var_names.isin(data.shard_genes[2]),
    )


def test_class_weights_of_a_sharded_model_count_its_training_cells(shards):
    data = ShardedAnnData(shards, layer="counts", phenotype_keys=["cell_type"])
    model = sct.GeneTransformer.from_shards(data, **TINY)
    train_idx = np.arange(0, 150, 2)
    (weights,) = model._class_weights(train_idx)
    counts = np.bincount(data.phenotype_codes["cell_type"][train_idx], minlength=3)
    np.testing.assert_allclose(weights.numpy(), counts.sum() / (3 * counts), rtol=1e-6)


# ------------------------------------------------------------------ bad input
def test_an_empty_shard_is_skipped_with_a_warning(cells, shards, tmp_path):
    empty = _write(cells[:0].copy(), tmp_path / "empty.h5ad")
    with pytest.warns(UserWarning, match="empty.h5ad has no cells"):
        data = ShardedAnnData([shards[0], empty], layer="counts")
    assert data.n_obs == 60 and len(data.paths) == 1


def test_an_unreadable_shard_is_named_before_anything_runs(shards, tmp_path):
    broken = tmp_path / "broken.h5ad"
    broken.write_text("not an h5ad file")
    with pytest.raises(ValueError, match=r"broken\.h5ad"):
        ShardedAnnData([shards[0], broken], layer="counts")
    with pytest.raises(ValueError, match=r"missing\.h5ad"):
        ShardedAnnData([tmp_path / "missing.h5ad"], layer="counts")


def test_a_shard_without_the_layer_or_with_normalised_values_is_named(cells, shards, tmp_path):
    with pytest.raises(KeyError, match="layer 'raw' not found"):
        ShardedAnnData(shards, layer="raw")
    normalised = cells[:30].copy()
    normalised.layers["counts"] = normalised.layers["counts"] * 0.5
    path = _write(normalised, tmp_path / "normalised.h5ad")
    with pytest.raises(ValueError, match=r"normalised\.h5ad.*non-integer"):
        ShardedAnnData([shards[0], path], layer="counts")


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (
            lambda x: x.astype(np.float64) * np.where(np.arange(x.shape[1]) == 0, 1e300, 1),
            "values too large for float32",
        ),
        (lambda x: x.astype(np.complex64), "complex numbers"),
        (lambda x: x - 1, "negative values"),
    ],
    ids=["beyond float32", "complex", "negative"],
)
@pytest.mark.parametrize("dense", [False, True])
def test_a_shard_is_checked_as_an_anndata_is(cells, tmp_path, corrupt, message, dense):
    bad = cells[:30].copy()
    values = corrupt(bad.layers["counts"].toarray())
    bad.layers["counts"] = values if dense else sp.csr_matrix(values)
    path = _write(bad, tmp_path / "bad.h5ad")
    with pytest.raises(ValueError, match=rf"bad\.h5ad: layer 'counts' \(rows 0:\d+\) holds {message}"):
        ShardedAnnData([path], layer="counts")


def test_dense_shards_of_any_byte_order_are_read_and_near_integers_are_named_exactly(cells, tmp_path):
    import h5py

    dense = cells[:30].copy()
    expected = dense.layers["counts"].toarray()
    dense.layers["counts"] = expected.astype(">f8")  # big-endian, as some writers store it
    path = _write(dense, tmp_path / "big_endian.h5ad")
    with h5py.File(path) as file:
        assert file["layers/counts"].dtype.byteorder == ">"
    data = ShardedAnnData([path], layer="counts")
    rows = data.read_rows(0, 0, 30)
    assert rows.dtype == np.float32
    np.testing.assert_array_equal(
        np.sort(rows.toarray(), axis=1)[:, -expected.shape[1] :], np.sort(expected, axis=1)
    )
    noisy = cells[:30].copy()
    values = noisy.layers["counts"].toarray().astype(np.float64)
    values[values > 0] += 1e-12
    noisy.layers["counts"] = values
    path = _write(noisy, tmp_path / "noisy.h5ad")
    with pytest.raises(ValueError, match=r"non-integer values \(e\.g\. \d+\.0000000000\d+\)"):
        ShardedAnnData([path], layer="counts")


def test_repeated_identifiers_in_a_shards_gene_key_get_the_fix_for_that_column(cells, tmp_path):
    shard = cells[:30].copy()
    shard.var["symbol"] = ["g0", "g0", *shard.var_names[2:]]
    path = _write(shard, tmp_path / "repeated.h5ad")
    with pytest.raises(
        ValueError, match=r"\.var\['symbol'\] are not unique.*~adata\.var\['symbol'\]\.duplicated\(\)"
    ):
        ShardedAnnData([path], layer="counts", gene_key="symbol")


def test_a_shard_failing_the_count_check_is_closed(cells, tmp_path):
    normalised = cells[:30].copy()
    normalised.layers["counts"] = normalised.layers["counts"] * 0.5
    path = Path(_write(normalised, tmp_path / "normalised.h5ad")).resolve()
    with pytest.raises(ValueError, match="non-integer") as caught:
        ShardedAnnData([path], layer="counts")
    gc.collect()
    assert caught.value.__traceback__ is not None  # as an interactive session keeps it
    still_open = {Path(os.fsdecode(f.name)).resolve() for f in h5py.h5f.get_obj_ids(types=h5py.h5f.OBJ_FILE)}
    assert path not in still_open


def test_a_column_major_layer_or_x_is_refused_with_the_fix(cells, tmp_path):
    csc = cells[:30].copy()
    csc.layers["counts"] = sp.csc_matrix(csc.layers["counts"])
    csc.X = sp.csc_matrix(csc.layers["counts"])
    path = _write(csc, tmp_path / "csc.h5ad")
    with pytest.raises(ValueError, match=r"layer 'counts' is stored column-major.*tocsr"):
        ShardedAnnData([path], layer="counts")
    with pytest.raises(ValueError, match=r"X is stored column-major.*tocsr"):
        ShardedAnnData([path])


def test_shards_without_shared_genes_or_batch_column_are_refused(cells, shards, tmp_path):
    renamed = cells[:30].copy()
    renamed.var_names = [f"other_{i}" for i in range(renamed.n_vars)]
    with pytest.raises(ValueError, match="share no gene"):
        ShardedAnnData([shards[0], _write(renamed, tmp_path / "renamed.h5ad")], layer="counts")
    no_batch = cells[:30].copy()
    del no_batch.obs["batch"]
    with pytest.raises(KeyError, match="no batch column 'batch'"):
        ShardedAnnData(
            [shards[0], _write(no_batch, tmp_path / "nobatch.h5ad")], layer="counts", batch_key="batch"
        )


def test_from_shards_rejects_unknown_hyperparameters_and_other_inputs(shards, cells):
    data = ShardedAnnData(shards, layer="counts")
    with pytest.raises(TypeError, match="d_modle"):
        sct.GeneTransformer.from_shards(data, d_modle=16)
    with pytest.raises(TypeError, match="ShardedAnnData"):
        sct.GeneTransformer.from_shards(cells)
    model = sct.GeneTransformer.from_shards(data, **TINY)
    with pytest.raises(ValueError, match="length_bucketing"):
        model.train(max_epochs=1, length_bucketing=True)


def test_at_most_max_open_shard_files_stay_open_and_reads_stay_right(cells, shards, monkeypatch):
    monkeypatch.setattr(ShardedAnnData, "MAX_OPEN", 2)
    data = ShardedAnnData(shards, layer="counts")
    reference = _reference_rows(cells, data.genes)
    blocks = split_blocks(data.shard_sizes, 8)
    for _ in range(2):  # round and round the three shards
        for shard, start, stop in blocks:
            got = data.read_rows(int(shard), int(start), int(stop)).toarray()[:, :-1]
            offset = data.offsets[shard]
            np.testing.assert_array_equal(got, reference[offset + start : offset + stop])
            assert len(data._handles) <= 2
    data.close()
    assert not data._handles


def test_a_damaged_chunk_or_an_unreadable_obs_column_is_an_error_naming_the_shard(cells, shards, tmp_path):
    damaged = tmp_path / "damaged.h5ad"
    cells[:50].copy().write_h5ad(damaged, compression="gzip")
    with h5py.File(damaged, "r") as file:
        chunk = file["layers/counts/data"].id.get_chunk_info(0)
    with open(damaged, "r+b") as raw:  # the first compressed chunk of the counts cannot be inflated
        raw.seek(chunk.byte_offset)
        raw.write(b"\xff" * min(64, chunk.size))
    with pytest.raises(ValueError, match=r"layer 'counts' \(rows 0:50\) of shard .*damaged\.h5ad") as caught:
        ShardedAnnData([shards[0], damaged], layer="counts")
    assert isinstance(caught.value.__cause__, OSError)  # chained, for the details

    odd = Path(_write(cells[:30].copy(), tmp_path / "odd.h5ad"))
    with h5py.File(odd, "r+") as file:  # an encoding this anndata cannot read
        del file["obs/cell_type"]
        file["obs/cell_type"] = np.zeros(30, dtype="f4")
        file["obs/cell_type"].attrs.update({"encoding-type": "foo-array", "encoding-version": "0.1.0"})
    with pytest.raises(ValueError, match=r"\.obs\['cell_type'\] of shard .*odd\.h5ad") as caught:
        ShardedAnnData([shards[0], odd], layer="counts", phenotype_keys=["cell_type"])
    assert caught.value.__cause__ is not None


def test_a_shard_listed_twice_is_refused(shards, tmp_path):
    again = os.path.join(os.path.dirname(shards[0]), ".", os.path.basename(shards[0]))
    with pytest.raises(ValueError, match=r"s0\.h5ad is listed twice"):
        ShardedAnnData([shards[0], shards[1], again], layer="counts")
    link = tmp_path / "link.h5ad"
    link.symlink_to(shards[1])
    with pytest.raises(ValueError, match=r"link\.h5ad is listed twice \(also as .*s1\.h5ad\)"):
        ShardedAnnData([shards[1], link], layer="counts")


def test_keys_that_are_not_strings_are_refused_before_any_shard_is_read(shards):
    for keys, message in (
        ({"phenotype_keys": [1]}, r"phenotype_keys must name by strings .*got \[1\]"),
        ({"batch_key": 0}, "batch_key must name by strings"),
        ({"gene_key": 2}, r"gene_key must name by strings .*adata\.var\.columns"),
    ):
        with pytest.raises(TypeError, match=message):
            ShardedAnnData(shards, layer="counts", **keys)


def test_shard_labels_that_look_like_missing_values_warn_as_in_memory(cells, tmp_path):
    first, second = cells[:60].copy(), cells[60:120].copy()
    first.obs["cell_type"] = first.obs["cell_type"].astype(object)
    first.obs.iloc[::4, first.obs.columns.get_loc("cell_type")] = np.nan  # NaN: unknown, as in memory
    second.obs["cell_type"] = second.obs["cell_type"].astype(str)
    second.obs.iloc[::4, second.obs.columns.get_loc("cell_type")] = "nan"  # what .astype(str) makes of NaN
    paths = [_write(a, tmp_path / f"m{i}.h5ad") for i, a in enumerate([first, second])]
    with pytest.warns(
        UserWarning, match=r"labels \['nan'\] that look like missing values.*rewrite the shards"
    ):
        data = ShardedAnnData(paths, layer="counts", phenotype_keys=["cell_type"])
    assert "nan" in data.phenotype_categories["cell_type"]  # kept as a class, as the warning says
    one = cells[:60].copy()
    one.obs["cell_type"] = "T cell"
    with pytest.warns(UserWarning, match="single category"):
        ShardedAnnData([_write(one, tmp_path / "one.h5ad")], layer="counts", phenotype_keys=["cell_type"])
    with warnings.catch_warnings():  # the fixture's shards: no warning
        warnings.simplefilter("error", UserWarning)
        ShardedAnnData([_write(cells, tmp_path / "all.h5ad")], layer="counts", phenotype_keys=["cell_type"])


def test_a_reopened_shard_reads_the_indptr_of_its_rows_only(cells, shards, monkeypatch):
    """Beyond MAX_OPEN shards each block reopens its file: it must not read the shard's whole indptr."""
    monkeypatch.setattr(ShardedAnnData, "MAX_OPEN", 1)
    data = ShardedAnnData(shards, layer="counts")
    blocks = split_blocks(data.shard_sizes, 8)
    blocks = blocks[np.lexsort((blocks[:, 0], blocks[:, 1]))]  # shards in turn: each block reopens its file
    read = []
    original = h5py.Dataset.__getitem__

    def counting(dataset, key):
        out = original(dataset, key)
        if dataset.name.endswith("/indptr"):
            read.append(np.size(out))
        return out

    monkeypatch.setattr(h5py.Dataset, "__getitem__", counting)
    reference = _reference_rows(cells, data.genes)
    for shard, start, stop in blocks:
        got = data.read_rows(int(shard), int(start), int(stop)).toarray()[:, :-1]
        offset = data.offsets[shard]
        np.testing.assert_array_equal(got, reference[offset + start : offset + stop])
    data.close()
    assert sum(read) <= sum(int(stop - start) + 1 for _, start, stop in blocks)  # not 61 or 41 per open


@pytest.mark.parametrize("n_missing", [1, 2])
def test_a_shard_with_missing_gene_identifiers_is_refused_as_in_memory(cells, tmp_path, n_missing):
    cells.var["symbol"] = cells.var_names.astype(object)
    cells.var.iloc[:n_missing, cells.var.columns.get_loc("symbol")] = np.nan  # not read as the gene "nan"
    with pytest.raises(ValueError, match="missing gene identifiers; fill or drop them"):
        sct.data.gene_identifiers(cells, "symbol")
    path = _write(cells, tmp_path / "missing.h5ad")
    with pytest.raises(ValueError, match=r"missing\.h5ad: \.var\['symbol'\] has missing gene identifiers"):
        ShardedAnnData([path], layer="counts", gene_key="symbol")


def test_a_data_module_refuses_the_state_of_a_checkpoint_of_other_cells_when_its_loader_is_made(
    cells, tmp_path
):
    # Lightning hands the data module its checkpointed state before it asks for the training loader,
    # also for a run with nothing left to train, whose loader state is never checked
    other = cells.copy()
    other.obs_names = [f"other_{name}" for name in cells.obs_names]  # as many cells, other ones
    paths = [_write(cells, tmp_path / "a.h5ad"), _write(other, tmp_path / "b.h5ad")]
    modules = [
        ShardedDataModule(
            ShardedAnnData([path], layer="counts"),
            batch_size=16,
            train_size=0.9,
            validation_size=None,
            seed=0,
        )
        for path in paths
    ]
    modules[0].train_dataloader()
    state = modules[0].state_dict()
    again = ShardedDataModule(
        ShardedAnnData([paths[0]], layer="counts"),
        batch_size=16,
        train_size=0.9,
        validation_size=None,
        seed=0,
    )
    again.load_state_dict(state)
    again.train_dataloader()  # the same cells: accepted
    modules[1].load_state_dict(state)
    with pytest.raises(ValueError, match=r"cannot resume from this checkpoint.*training cells' names"):
        modules[1].train_dataloader()


def test_a_shard_in_the_layout_before_anndata_0_7_is_named_with_the_rewrite_that_fixes_it(cells, tmp_path):
    path = tmp_path / "legacy.h5ad"
    with h5py.File(path, "w") as file:  # .obs/.var as compound datasets, as anndata < 0.7 wrote them
        file["X"] = cells.layers["counts"].toarray().astype(np.float32)
        file["obs"] = np.array([(n.encode(),) for n in cells.obs_names], dtype=[("index", "S16")])
        file["var"] = np.array([(n.encode(),) for n in cells.var_names], dtype=[("index", "S16")])
    with pytest.raises(
        ValueError, match=r"legacy\.h5ad from disk: it is in the \.h5ad layout of anndata before 0\.7"
    ):
        ShardedAnnData([path])
    with pytest.raises(ValueError, match=r"anndata\.read_h5ad\(.*legacy\.h5ad'\)\.write_h5ad"):
        ShardedAnnData([path])
    ad.read_h5ad(path).write_h5ad(tmp_path / "rewritten.h5ad")  # the rewrite the error proposes works
    assert ShardedAnnData([tmp_path / "rewritten.h5ad"]).n_obs == cells.n_obs


def _rewrite_as_anndata_0_7(path: str, group: str, key: str) -> None:
    """Store categorical column ``key`` of ``group`` as anndata 0.7 did: codes referring to ``__categories``."""
    with h5py.File(path, "r+") as file:
        frame = file[group]
        codes, names = frame[key]["codes"][()], frame[key]["categories"][()]
        del frame[key]
        stored = frame.require_group("__categories").create_dataset(key, data=names)
        frame.create_dataset(key, data=codes).attrs["categories"] = stored.ref
        frame.attrs["encoding-version"] = "0.1.0"


def test_a_gene_key_column_that_also_names_the_index_is_read(cells, tmp_path):
    part = cells[:50].copy()
    part.var["gene_ids"] = [f"ENS{name}" for name in part.var_names]
    part.var_names = part.var["gene_ids"]  # the index and the column share one dataset on disk
    data = ShardedAnnData([_write(part, tmp_path / "a.h5ad")], layer="counts", gene_key="gene_ids")
    assert list(data.genes) == list(part.var["gene_ids"])


def test_a_per_cell_integer_column_of_shards_is_refused_as_a_phenotype(cells, tmp_path):
    part = cells[:60].copy()
    part.obs["n_genes"] = np.arange(60) * 7
    path = _write(part, tmp_path / "a.h5ad")
    with pytest.raises(ValueError, match="'n_genes' looks like a count or an index"):
        ShardedAnnData([path], layer="counts", phenotype_keys=["n_genes"])
    assert ShardedAnnData([path], layer="counts", phenotype_keys=["cell_type"]).n_obs == 60
    labelled = cells[:100].copy()  # integer names, stored as categorical: labels, as in memory
    labelled.obs["clone"] = pd.Categorical(np.minimum(np.arange(100), 69) + 1000)
    paths = [
        _write(labelled[:50].copy(), tmp_path / "c0.h5ad"),
        _write(labelled[50:].copy(), tmp_path / "c1.h5ad"),
    ]
    assert (
        len(ShardedAnnData(paths, layer="counts", phenotype_keys=["clone"]).phenotype_categories["clone"])
        == 70
    )


def test_categorical_columns_of_anndata_0_7_files_are_read_as_names_not_codes(cells, tmp_path):
    first, second = cells[:60].copy(), cells[60:, 10:].copy()  # the second lacks the first 10 genes
    for part in (first, second):
        part.var["symbol"] = pd.Categorical([f"sym{name}" for name in part.var_names])
    paths = [_write(first, tmp_path / "a.h5ad"), _write(second, tmp_path / "b.h5ad")]
    for path in paths:
        _rewrite_as_anndata_0_7(path, "obs", "cell_type")
        _rewrite_as_anndata_0_7(path, "var", "symbol")
    assert ad.read_h5ad(paths[0]).obs["cell_type"].equals(first.obs["cell_type"])  # the layout anndata reads
    data = ShardedAnnData(paths, layer="counts", phenotype_keys="cell_type", gene_key="symbol")
    assert data.phenotype_categories["cell_type"] == sorted(cells.obs["cell_type"].unique())
    assert list(data.genes) == [f"sym{name}" for name in cells.var_names[10:]]
    np.testing.assert_array_equal(
        data.read_rows(1, 0, 5).toarray()[:, :-1], _reference_rows(second[:5], second.var_names)
    )
