from __future__ import annotations

import json
import warnings
from unittest.mock import patch

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import sctransformer as sct

from ..conftest import QUIET, TINY, fingerprint


def train_quietly(model, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(**{"max_epochs": 2, "batch_size": 32, **QUIET, **kwargs})


def test_bare_form_pretrains_on_x_without_phenotypes(adata):
    adata.X = adata.layers["counts"].copy()
    sct.setup_anndata(adata)
    model = sct.GeneTransformer(adata, **TINY)
    train_quietly(model)
    assert model.is_trained
    history = model.history
    for name in ("loss", "expression", "expression_from_cell", "expression_accuracy"):
        for stage in ("train", "validation"):
            assert f"{name}_{stage}" in history, f"{name}_{stage}"
            assert np.isfinite(history[f"{name}_{stage}"].to_numpy()).all()
    assert not any(k.startswith("phenotype") for k in history)
    assert model.get_latent_representation().shape == (adata.n_obs, TINY["d_model"])
    with pytest.raises(ValueError, match="no phenotype keys"):
        model.predict()


def test_training_reduces_the_loss_and_learns_cell_types(adata):
    sct.setup_anndata(adata, layer="counts", phenotype_keys=["cell_type"])
    model = sct.GeneTransformer(adata, **TINY)
    train_quietly(model, max_epochs=40, lr=3e-3)
    loss = model.history["loss_train"].iloc[:, 0].to_numpy()
    assert loss[-1] < loss[0]
    predicted = model.predict()["cell_type"].astype(str).to_numpy()
    assert (predicted == adata.obs["cell_type"].astype(str).to_numpy()).mean() > 0.9


def test_max_steps_alone_trains_that_many_steps_over_the_whole_schedule(adata):
    """Not cut short by the default number of epochs (50 for 120 cells, here of 1 step each)."""
    sct.setup_anndata(adata, layer="counts")
    model = sct.GeneTransformer(adata, **TINY)
    train_quietly(model, max_epochs=None, max_steps=51, batch_size=128, train_size=1.0, calibrate=False)
    plan = model.trainer.lightning_module
    assert model.trainer.global_step == plan.total_steps == 51
    assert model.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # decayed


def test_external_indexing_sets_the_validation_cells_and_early_stopping_needs_some(adata):
    sct.setup_anndata(adata, layer="counts")
    model = sct.GeneTransformer(adata, **TINY)
    cells = np.arange(adata.n_obs)
    split = [cells[:100], cells[100:], cells[:0]]
    train_quietly(model, max_epochs=1, train_size=1.0, datasplitter_kwargs={"external_indexing": split})
    assert len(model.validation_indices) == 20
    assert np.isfinite(model.history["loss_validation"].to_numpy()).all()
    with pytest.raises(ValueError, match=r"early_stopping needs validation cells.*external_indexing"):
        train_quietly(
            model,
            max_epochs=1,
            early_stopping=True,
            datasplitter_kwargs={"external_indexing": [cells, cells[:0], cells[:0]]},
        )


def test_external_indexing_takes_boolean_masks_and_refuses_bad_sets_before_training(adata):
    sct.setup_anndata(adata, layer="counts")
    model = sct.GeneTransformer(adata, **TINY)
    n = adata.n_obs
    train = np.zeros(n, dtype=bool)
    train[:100] = True
    train_quietly(model, max_epochs=1, datasplitter_kwargs={"external_indexing": [train, ~train, []]})
    np.testing.assert_array_equal(np.sort(model.train_indices), np.arange(100))
    np.testing.assert_array_equal(np.sort(model.validation_indices), np.arange(100, n))
    train_quietly(
        model, max_epochs=1, datasplitter_kwargs={"external_indexing": [train, ~train]}
    )  # as scvi-tools
    np.testing.assert_array_equal(np.sort(model.validation_indices), np.arange(100, n))
    cells = np.arange(n)
    weights = {k: v.clone() for k, v in model.module.state_dict().items()}
    bad = [
        ([np.r_[cells[:99], -1], cells[100:110], cells[110:]], r"must lie in \[0, 120\).*negative positions"),
        ([cells[:100], cells[100:], np.array([n])], r"must lie in \[0, 120\)"),
        ([cells[:100].astype(float), cells[100:], []], "integer cell positions or a boolean mask"),
        ([np.r_[cells[:100], 5], cells[100:], []], r"training cells list cells more than once: \[5\]"),
        ([cells[:100], cells[90:], []], "training and validation cells overlap in 10 cells"),
        ([cells[:100], cells[100:110], []], "leaves 10 of 120 cells in none of its sets"),
        ([cells[:0], cells, []], "training cells are empty"),
        ([cells, [], [], []], r"must be \[train, validation, test\]"),
        (cells, r"must be \[train, validation, test\]"),
    ]
    for split, message in bad:
        with pytest.raises(ValueError, match=message):
            model.train(max_epochs=1, datasplitter_kwargs={"external_indexing": split}, **QUIET)
    for option, argument in [("batch_size", "batch_size"), ("seed", "seed"), ("lengths", "length_bucketing")]:
        with pytest.raises(
            ValueError, match=rf"\['{option}'\] are set by train\(\) itself.*train\({argument}="
        ):
            model.train(max_epochs=1, datasplitter_kwargs={option: 8}, **QUIET)
    for option in ("shuffle", "sampler", "batch_sampler", "distributed_sampler", "collate_fn"):
        with pytest.raises(
            ValueError, match=rf"\['{option}'\] are set by train\(\) itself.*{option}: no option"
        ):
            model.train(max_epochs=1, datasplitter_kwargs={option: None}, **QUIET)
    with pytest.raises(
        ValueError, match=r"\['num_worker'\] are options of neither.*did you mean 'num_workers'"
    ):
        model.train(max_epochs=1, datasplitter_kwargs={"num_worker": 1}, **QUIET)
    assert all(torch.equal(v, weights[k]) for k, v in model.module.state_dict().items())


def test_shuffle_set_split_false_splits_the_cells_in_their_order(adata):
    sct.setup_anndata(adata, layer="counts")
    model = sct.GeneTransformer(adata, **TINY)
    train_quietly(model, max_epochs=1, train_size=0.75, datasplitter_kwargs={"shuffle_set_split": False})
    train, validation = np.sort(model.train_indices), np.sort(model.validation_indices)
    assert len(train) == 90 and (np.diff(train) == 1).all()  # one run of consecutive cells
    np.testing.assert_array_equal(np.sort(np.r_[train, validation]), np.arange(adata.n_obs))


def test_bf16_mixed_precision_on_the_cpu_learns_cell_types_and_keeps_float32_weights(adata):
    sct.setup_anndata(adata, layer="counts", phenotype_keys=["cell_type"])
    model = sct.GeneTransformer(adata, **TINY)
    train_quietly(model, max_epochs=40, lr=3e-3, precision="bf16-mixed", accelerator="cpu")
    assert all(p.dtype == torch.float32 for p in model.module.parameters())
    loss = model.history["loss_train"].iloc[:, 0].to_numpy()
    assert np.isfinite(loss).all() and loss[-1] < loss[0]
    predicted = model.predict()["cell_type"].astype(str).to_numpy()
    assert (predicted == adata.obs["cell_type"].astype(str).to_numpy()).mean() > 0.9
    assert model.get_latent_representation().dtype == np.float32


@pytest.mark.parametrize("value_encoding", ["binned", "continuous"])
@pytest.mark.parametrize("precision", ["bf16-true", "64-true"])
def test_true_precisions_train_on_the_cpu_and_leave_a_usable_float32_model(adata, precision, value_encoding):
    sct.setup_anndata(adata, layer="counts", phenotype_keys=["cell_type"])
    model = sct.GeneTransformer(adata, **TINY, value_encoding=value_encoding)
    train_quietly(model, precision=precision, accelerator="cpu")
    tensors = [*model.module.parameters(), *model.module.buffers()]
    assert all(t.dtype == torch.float32 for t in tensors if t.is_floating_point())
    assert np.isfinite(model.history["loss_train"].to_numpy()).all()
    assert model.temperatures_  # calibrated after the run
    latent = model.get_latent_representation()
    assert latent.dtype == np.float32 and np.isfinite(latent).all()
    assert model.predict()["cell_type"].notna().all()
    train_quietly(model, max_epochs=1)  # a later default-precision run goes on from these weights
    assert all(p.dtype == torch.float32 for p in model.module.parameters())
    assert np.isfinite(model.get_latent_representation()).all()


def test_a_bf16_true_run_leaves_frozen_weights_and_buffers_exactly_as_they_were(adata):
    sct.setup_anndata(adata, layer="counts", phenotype_keys=["cell_type"])
    model = sct.GeneTransformer(adata, **TINY, binning="fixed")
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    for buffer in ("tokenizer.gene_scale", "tokenizer.bin_edges"):  # bf16 would round them
        assert not torch.equal(before[buffer].bfloat16().float(), before[buffer])
    train_quietly(model, precision="bf16-true", accelerator="cpu", freeze="backbone")
    after = model.module.state_dict()
    frozen = {id(p) for p in model._frozen_parameters("backbone")}
    names = [n for n, p in model.module.named_parameters() if id(p) in frozen]
    assert "blocks.0.attention.qkv.weight" in names
    for name in [*names, "tokenizer.gene_scale", "tokenizer.bin_edges"]:
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=0, msg=name)
    head = "phenotype_heads.0.3.weight"  # trained, in bf16: changed
    assert not torch.equal(after[head], before[head])


def test_a_failed_training_run_leaves_the_weights_their_dtype_and_the_calibration_as_they_were(adata):
    import lightning.pytorch as pl

    sct.setup_anndata(adata, layer="counts", phenotype_keys=["cell_type"])
    model = sct.GeneTransformer(adata, **TINY)
    train_quietly(model)
    temperatures, calibration = dict(model.temperatures_), dict(model.calibration_)
    assert temperatures and calibration
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    cast = []

    class FailAtTheFirstStep(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            cast.append(next(module.module.parameters()).dtype)
            raise RuntimeError("interrupted")

    # "64-true" casts the weights to float64 (exactly reversible), then the run fails
    with pytest.raises(RuntimeError, match="interrupted"):
        train_quietly(model, precision="64-true", accelerator="cpu", callbacks=[FailAtTheFirstStep()])
    assert cast == [torch.float64]
    after = model.module.state_dict()
    for key, value in before.items():
        assert after[key].dtype == value.dtype and torch.equal(after[key], value), key
    assert model.temperatures_ == temperatures and model.calibration_ == calibration
    # an unsupported precision is refused before anything is touched
    with pytest.raises(ValueError, match=r"precision must be one of .*'bf16-true'.*16-mixed"):
        model.train(max_epochs=1, precision="16-true", **QUIET)
    assert all(torch.equal(model.module.state_dict()[k], v) for k, v in before.items())
    assert model.temperatures_ == temperatures

    class FailAfterTwoSteps(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.global_step == 2:
                raise RuntimeError("interrupted")

    # after an optimizer step the weights the temperatures were fitted to are gone: none kept
    with pytest.raises(RuntimeError, match="interrupted"):
        train_quietly(model, callbacks=[FailAfterTwoSteps()])
    assert not all(torch.equal(model.module.state_dict()[k], v) for k, v in before.items())
    assert model.temperatures_ == {} and model.calibration_ == {}


@pytest.mark.parametrize(
    "kwargs",
    [{"batch_correction": "token"}, {"value_encoding": "continuous", "gene_prediction": 0.15}],
)
def test_freeze_embeddings_keeps_every_documented_embedding_bit_identical(adata, kwargs):
    # the docstring: "the gene, value, profile (with its layer norm) and batch embeddings"
    documented = (
        "gene_embedding",
        "gene_mask",
        "bin_embedding",
        "value_mlp",
        "value_mask",
        "profile_embedding",
        "profile_norm",
        "batch_embedding",
    )
    sct.setup_anndata(adata, layer="counts", phenotype_keys=["cell_type"], batch_key="batch")
    model = sct.GeneTransformer(adata, **TINY, **kwargs)
    before = {k: v.detach().clone() for k, v in model.module.named_parameters()}
    train_quietly(model, freeze="embeddings")
    after = dict(model.module.named_parameters())
    frozen = [k for k in before if k.split(".")[0] in documented]
    assert {k.split(".")[0] for k in frozen} >= {"gene_embedding", "profile_embedding", "profile_norm"}
    for key in frozen:
        assert torch.equal(before[key], after[key]), key
    assert any(not torch.equal(before[k], after[k]) for k in before if k not in frozen)
    assert all(p.requires_grad for p in model.module.parameters())


def test_same_seed_gives_same_weights_with_workers_and_deterministic_kernels(adata):
    sct.setup_anndata(adata, layer="counts", phenotype_keys=["cell_type"])
    states = []
    variants = [{}, {}, {"datasplitter_kwargs": {"num_workers": 2}}, {"deterministic": True}]
    for variant in variants:
        model = sct.GeneTransformer(adata, **TINY, seed=3)
        train_quietly(model, seed=5, **variant)
        states.append(model.module.state_dict())
    for state, variant in zip(states[1:], variants[1:], strict=True):
        for key in states[0]:
            torch.testing.assert_close(state[key], states[0][key], rtol=0, atol=0, msg=f"{key} {variant}")
    other = sct.GeneTransformer(adata, **TINY, seed=4)
    assert not torch.equal(other.module.gene_embedding.weight, states[0]["gene_embedding.weight"])


def test_embedding_does_not_depend_on_batch_size_or_order(trained):
    model, data = trained
    reference = model.get_latent_representation(data, batch_size=64)
    for batch_size in (1, 7, 1000):
        np.testing.assert_allclose(
            model.get_latent_representation(data, batch_size=batch_size), reference, atol=1e-5
        )
    order = np.random.default_rng(0).permutation(data.n_obs)
    shuffled = model.get_latent_representation(data[order].copy(), batch_size=13)
    np.testing.assert_allclose(shuffled, reference[order], atol=1e-5)
    mean = model.get_latent_representation(data, pooling="mean", batch_size=5)
    np.testing.assert_allclose(
        mean, model.get_latent_representation(data, pooling="mean", batch_size=150), atol=1e-5
    )


def test_the_same_cells_with_their_genes_in_another_order_give_identical_outputs(trained):
    model, data = trained
    columns = np.random.default_rng(2).permutation(data.n_vars)
    permuted = data[:, columns].copy()
    np.testing.assert_array_equal(
        model.get_latent_representation(permuted), model.get_latent_representation(data)
    )
    np.testing.assert_array_equal(
        model.predict(permuted, return_probabilities=True)[1]["cell_type"],
        model.predict(data, return_probabilities=True)[1]["cell_type"],
    )


def test_embedding_and_prediction_do_not_modify_adata_and_accept_views(trained):
    model, data = trained
    before = fingerprint(data)
    model.get_latent_representation(data)
    model.predict(data)
    assert fingerprint(data) == before
    view = data[10:20]
    np.testing.assert_allclose(
        model.get_latent_representation(view), model.get_latent_representation(data)[10:20], atol=1e-5
    )


def test_outputs_of_an_untrained_model_come_with_a_warning_and_a_trained_models_without(trained, adata):
    sct.setup_anndata(adata, layer="counts", phenotype_keys=["cell_type"])
    untrained = sct.GeneTransformer(adata, **TINY)
    for output in (untrained.get_latent_representation, untrained.predict):
        with pytest.warns(UserWarning, match=r"not been trained.*call model\.train\(\) first"):
            output()
    model, data = trained
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model.get_latent_representation(data)
        model.predict(data)


def test_predictions_do_not_use_the_labels(trained):
    model, data = trained
    relabelled = data.copy()
    relabelled.obs["cell_type"] = "type_0"
    a = model.predict(data)
    b = model.predict(relabelled)
    pd.testing.assert_frame_equal(a, b)
    assert ((a["cell_type_confidence"] > 0) & (a["cell_type_confidence"] <= 1)).all()


def test_save_load_round_trip_gives_identical_embedding(trained, tmp_path):
    model, data = trained
    model.save(tmp_path / "m")
    state = json.loads((tmp_path / "m" / "model.json").read_text())
    assert state["vocabulary"] == list(data.var_names)
    assert state["phenotype_categories"] == {"cell_type": ["type_0", "type_1", "type_2"]}
    assert not list(tmp_path.glob("**/*.pt")) and not list(tmp_path.glob("**/*.pkl"))
    loaded = sct.GeneTransformer.load(tmp_path / "m")
    np.testing.assert_array_equal(
        loaded.get_latent_representation(data), model.get_latent_representation(data)
    )
    pd.testing.assert_frame_equal(loaded.predict(data), model.predict(data))
    assert set(loaded.history) == set(model.history)
    np.testing.assert_array_equal(loaded.test_indices, model.test_indices)


def test_save_replaces_a_saved_model_only_with_overwrite_and_never_other_files(trained, tmp_path):
    model, _ = trained
    target = tmp_path / "m"
    model.save(target)
    with pytest.raises(ValueError, match="overwrite=True"):
        model.save(target)
    model.save(target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == ["model.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind
    # a directory of the user's own files is never replaced, even with overwrite=True
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="does not hold a saved sctransformer model"):
        model.save(mine, overwrite=True)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("swap", ["exchange", "two renames"])
def test_a_save_that_fails_to_rename_into_place_leaves_the_old_model(trained, tmp_path, monkeypatch, swap):
    from pathlib import Path

    from sctransformer.model import _save_load

    model, _ = trained
    target = tmp_path / "m"
    model.save(target)
    before = (target / "model.safetensors").read_bytes()
    real_rename = Path.rename

    def failing_rename(self, destination):
        if ".saving-" in self.name:  # moving the new model into place
            raise OSError("disk full")
        return real_rename(self, destination)

    def failing_exchange(a, b):
        raise OSError("disk full")

    if swap == "exchange":
        monkeypatch.setattr(_save_load, "_exchange", failing_exchange)
    else:
        monkeypatch.setattr(_save_load, "_exchange", lambda a, b: False)
        monkeypatch.setattr(Path, "rename", failing_rename)
    with pytest.raises(OSError, match="disk full"):
        model.save(target, overwrite=True)
    monkeypatch.undo()
    assert (target / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # nothing retired or staged left


def test_load_aligns_genes_of_a_query_by_identifier(trained, tmp_path, caplog):
    model, data = trained
    model.save(tmp_path / "m")
    # the query has the genes in another order, one gene missing and one the model never saw
    permutation = np.random.default_rng(1).permutation(data.n_vars)
    order = permutation[1:]
    query = data[:, order].copy()
    query.var_names = [*query.var_names[:-1], "NEW_GENE"]
    query.obs = query.obs.drop(columns=[c for c in query.obs if c.startswith("_scvi")])
    with caplog.at_level("INFO", logger="sctransformer"):
        loaded = sct.GeneTransformer.load(tmp_path / "m", adata=query)
    assert "58 / 59 genes in vocabulary" in caplog.text
    c2g = loaded._column_to_gene(query)
    np.testing.assert_array_equal(c2g[:-1], data.var_names.get_indexer(query.var_names[:-1]))
    assert c2g[-1] == -1
    # a cell's tokens name the same genes whatever the column order of the AnnData
    from sctransformer.data import to_torch_csr
    from sctransformer.module import Tokenizer

    untruncated = Tokenizer(data.n_vars, max_length=10_000)
    in_query = untruncated(to_torch_csr(query.layers["counts"][:5]), torch.as_tensor(c2g))
    in_data = untruncated(to_torch_csr(data.layers["counts"][:5]), torch.arange(data.n_vars))
    missing = {int(permutation[0]), int(order[-1])}  # left out, and renamed to NEW_GENE
    for i in range(5):
        expected = set(in_data.gene_ids[i][in_data.is_token[i]].tolist()) - missing
        assert set(in_query.gene_ids[i][in_query.is_token[i]].tolist()) == expected
    assert loaded.predict()["cell_type"].notna().all()


def test_fixed_bins_and_continuous_values_train(adata):
    sct.setup_anndata(adata, layer="counts", phenotype_keys=["cell_type"])
    for kwargs in ({"binning": "fixed"}, {"value_encoding": "continuous"}, {"expression_queries": 5}):
        model = sct.GeneTransformer(adata, **{**TINY, **kwargs})
        train_quietly(model, max_epochs=1)
        assert np.isfinite(model.history["loss_train"].to_numpy()).all()
    edges = sct.GeneTransformer(adata, **{**TINY, "binning": "fixed"}).module.tokenizer.bin_edges
    assert edges.shape == (TINY["n_bins"] - 1,) and (edges.diff() >= 0).all() and edges[0] > 0


def test_cells_without_counts_train_and_embed_from_special_tokens(adata):
    x = adata.layers["counts"].tolil()
    x[:3] = 0
    adata.layers["counts"] = x.tocsr()
    with pytest.warns(UserWarning, match="3 cells have no counts"):
        sct.setup_anndata(adata, layer="counts", phenotype_keys=["cell_type"])
    model = sct.GeneTransformer(adata, **TINY)
    train_quietly(model, max_epochs=1)
    for pooling in ("cls", "mean", "profile"):
        embedding = model.get_latent_representation(pooling=pooling)
        assert np.isfinite(embedding).all()
    # an empty cell's embedding is the same whatever its (absent) genes' order: all three are equal
    np.testing.assert_allclose(embedding[0], embedding[1], atol=1e-6)
    assert model.predict()["cell_type_confidence"].between(0, 1).all()


def test_backed_anndata_embeds_and_predicts_like_in_memory(adata, tmp_path):
    adata.X = adata.layers.pop("counts")  # counts in X: the part a backed file keeps on disk
    adata.write_h5ad(tmp_path / "cells.h5ad")
    sct.setup_anndata(adata, phenotype_keys=["cell_type"])
    model = sct.GeneTransformer(adata, **TINY)
    backed = ad.read_h5ad(tmp_path / "cells.h5ad", backed="r")
    assert not isinstance(backed.X, np.ndarray | sp.spmatrix)  # read in chunks, never whole
    np.testing.assert_array_equal(
        model.get_latent_representation(backed, batch_size=16), model.get_latent_representation(adata)
    )
    pd.testing.assert_frame_equal(model.predict(backed), model.predict(adata))
    assert backed.isbacked


def test_csr_csc_and_dense_counts_embed_identically(trained):
    model, data = trained
    reference = model.get_latent_representation(data)
    for name, convert in (
        ("CSC", lambda x: sp.csc_matrix(x)),
        ("dense", lambda x: x.toarray()),
        ("dense float32", lambda x: x.toarray().astype(np.float32)),
    ):
        other = data.copy()
        other.layers["counts"] = convert(data.layers["counts"])
        np.testing.assert_array_equal(model.get_latent_representation(other), reference, err_msg=name)
    # backed counts: test_backed_anndata_embeds_and_predicts_like_in_memory


def test_default_embedding_is_the_profile_token_output(trained, adata):
    model, data = trained
    assert model.default_pooling == "profile"
    embedding = model.get_latent_representation(data)
    for idx, _, hidden in model._forward(data, 64):
        np.testing.assert_array_equal(embedding[idx], hidden[:, model.module.n_prefix - 1].numpy())
    assert not np.allclose(embedding, model.get_latent_representation(data, pooling="cls"))
    sct.setup_anndata(adata, layer="counts")
    plain = sct.GeneTransformer(adata, **TINY, cell_profile=False)
    assert plain.default_pooling == "cls"
    with pytest.raises(ValueError, match="cell_profile=True"):
        plain.get_latent_representation(pooling="profile")


def test_a_loaded_model_trains_in_training_mode_and_is_left_in_eval_mode(adata, tmp_path):
    import lightning.pytorch as pl

    sct.setup_anndata(adata, layer="counts", phenotype_keys=["cell_type"])
    model = sct.GeneTransformer(adata, **(TINY | {"dropout": 0.1}))
    model.save(tmp_path / "m")
    loaded = sct.GeneTransformer.load(tmp_path / "m", adata=adata)
    assert not loaded.module.training
    modes = []

    class Mode(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            modes.append(all(m.training for m in module.module.modules()))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded.train(max_epochs=1, batch_size=64, callbacks=[Mode()], **QUIET)
    assert modes and all(modes)  # dropout is on while fine-tuning
    assert not loaded.module.training


def test_masked_gene_prediction_learns_which_genes_go_together_and_survives_save_load(adata, tmp_path):
    sct.setup_anndata(adata, layer="counts")
    with pytest.raises(ValueError, match="gene_prediction must be a share in"):
        sct.GeneTransformer(adata, **TINY, gene_prediction=1.0)
    model = sct.GeneTransformer(adata, **TINY, gene_prediction=0.3)
    train_quietly(model, max_epochs=30, lr=3e-3)
    gene_loss = model.history["gene_train"].iloc[:, 0].to_numpy()
    accuracy = model.history["gene_accuracy_validation"].iloc[-1, 0]
    # uniform guessing among the genes not visible in the cell: about 1 / (n_vars - visible genes)
    expressed = (adata.layers["counts"] > 0).sum(1).mean()
    chance = 1 / (adata.n_vars - 0.7 * min(expressed, TINY["max_length"]))
    # (seed 0: loss 4.1 -> 3.2 against log(1 / chance) = 3.6; accuracy 0.10 against chance 0.027)
    assert gene_loss[-1] < -np.log(chance) and accuracy > 2.5 * chance, (gene_loss[[0, -1]], accuracy, chance)
    model.save(tmp_path / "m")
    loaded = sct.GeneTransformer.load(tmp_path / "m", adata=adata)
    assert loaded.hyperparameters_["gene_prediction"] == 0.3 and loaded.module.gene_prediction
    for name, value in model.module.state_dict().items():
        assert torch.equal(value, loaded.module.state_dict()[name]), name
    # switched off for one run (e.g. fine-tuning on labels only), and refused where there is no head
    train_quietly(loaded, max_epochs=1, gene_prediction=0)  # scvi-tools appends the run to the history
    assert len(loaded.history["expression_train"]) == 31 and len(loaded.history["gene_train"]) == 30
    with pytest.raises(ValueError, match="gene_prediction must be a share in"):
        loaded.train(max_epochs=1, gene_prediction=-0.1)
    plain = sct.GeneTransformer(adata, **TINY)
    with pytest.raises(ValueError, match="no gene-prediction head"):
        plain.train(max_epochs=1, gene_prediction=0.2)


def test_inference_on_the_models_own_anndata_checks_its_counts_as_on_a_passed_one(adata):
    sct.setup_anndata(adata)  # counts in X
    adata.X = adata.layers["counts"].copy()
    model = sct.GeneTransformer(adata, **TINY)
    model.get_latent_representation()
    adata.X = adata.X.astype(np.float32) / 3  # normalised in place after training
    with pytest.raises(ValueError, match="non-integer values"):
        model.get_latent_representation()


def test_load_sets_up_again_an_anndata_registered_without_the_models_phenotypes(trained, tmp_path):
    model, data = trained
    model.save(tmp_path / "m")
    query = data.copy()
    sct.setup_anndata(query, layer="counts")  # e.g. set up for another model, labels left out
    with pytest.warns(UserWarning, match="not registered"):
        loaded = sct.GeneTransformer.load(tmp_path / "m", adata=query)
    assert any(key.startswith("phenotype") for key in loaded.adata_manager.data_registry)


def test_load_onto_cells_set_up_with_phenotypes_the_model_lacks_says_so(adata, tmp_path):
    sct.setup_anndata(adata, layer="counts")  # pre-trained without labels
    model = sct.GeneTransformer(adata, **TINY)
    model.save(tmp_path / "m")
    labelled = adata.copy()
    sct.setup_anndata(labelled, layer="counts", phenotype_keys=["cell_type"])
    with pytest.warns(
        UserWarning, match=r"phenotype_keys \['cell_type'\], which the model has no tokens .*load_query_data"
    ):
        loaded = sct.GeneTransformer.load(tmp_path / "m", adata=labelled)
    assert loaded.phenotype_categories_ == {}
    assert sct.GeneTransformer(labelled, **TINY).phenotype_categories_  # its registration is kept
    with warnings.catch_warnings():  # the model's own setup loads without that warning
        warnings.simplefilter("error")
        sct.GeneTransformer.load(tmp_path / "m", adata=adata)


def test_a_phenotype_column_removed_after_setup_is_refused_before_training(adata):
    sct.setup_anndata(adata, layer="counts", phenotype_keys=["cell_type"])
    model = sct.GeneTransformer(adata, **TINY)
    del adata.obs["cell_type"]
    with pytest.raises(ValueError, match=r"obs\['cell_type'\] was removed since setup_anndata"):
        model.train(max_epochs=1, **QUIET)


def test_hyper_parameters_and_seeds_are_checked_and_numpy_numbers_accepted(adata):
    sct.setup_anndata(adata, layer="counts", phenotype_keys=["cell_type"])
    for bad, message in (
        ({"phenotype_input": "mean"}, "phenotype_input must be"),
        ({"cell_expression_loss": "False"}, "cell_expression_loss must be True or False"),
        ({"cell_profile": 1}, "cell_profile must be True or False"),
        ({"seed": -1}, "seed must be an integer"),
    ):
        with pytest.raises((ValueError, TypeError), match=message):
            sct.GeneTransformer(adata, **TINY | bad)
    model = sct.GeneTransformer(adata, **TINY, gene_prediction=np.float32(0.1))
    train_quietly(model, max_epochs=1, seed=np.int64(3), focal_gamma=np.float32(2.0))
    assert model.train_settings_["seed"] == 3
    with pytest.raises(ValueError, match="seed must be an integer"):
        model.train(max_epochs=1, seed=2.5, **QUIET)
    with pytest.raises(ValueError, match="n_bins must be a positive integer"):
        model.calibrate(n_bins=0)


def test_phenotype_mask_prob_may_be_1_and_0_warns_that_no_head_is_trained(adata):
    sct.setup_anndata(adata, layer="counts", phenotype_keys=["cell_type"])
    model = sct.GeneTransformer(adata, **TINY)
    train_quietly(model, max_epochs=1, phenotype_mask_prob=1.0)
    assert "phenotype_cell_type_train" in model.history
    with pytest.warns(UserWarning, match="phenotype heads are not trained"):
        model.train(max_epochs=1, phenotype_mask_prob=0.0, **QUIET)
    with pytest.raises(ValueError, match=r"phenotype_mask_prob must be in \[0, 1\]"):
        model.train(max_epochs=1, phenotype_mask_prob=1.5, **QUIET)


def test_training_with_no_loss_term_to_score_is_refused_before_it_starts(adata):
    sct.setup_anndata(adata, layer="counts", phenotype_keys=["cell_type"])
    model = sct.GeneTransformer(adata, **TINY)
    with pytest.raises(
        ValueError, match=r"gene_mask_prob=0 with phenotype_mask_prob=0, .*leaves nothing to learn"
    ):
        model.train(max_epochs=1, gene_mask_prob=0.0, phenotype_mask_prob=0.0, **QUIET)
    assert not model.is_trained
    train_quietly(model, max_epochs=1, gene_mask_prob=0.0, phenotype_mask_prob=0.5)  # the phenotypes only
    assert model.history["loss_train"].iloc[-1, 0] > 0
    queried = sct.GeneTransformer(adata, **TINY, expression_queries=4)  # queries score held-out genes
    train_quietly(queried, max_epochs=1, gene_mask_prob=0.0, phenotype_mask_prob=0.0)
    assert queried.history["query_value_train"].iloc[-1, 0] > 0
    for option in ({"max_steps": 0}, {"limit_train_batches": 0}, {"limit_train_batches": 0.0}):
        with pytest.raises(ValueError, match="leaves no training step"):
            model.train(max_epochs=1, **option, **QUIET)
    unlabelled = adata.copy()
    sct.setup_anndata(unlabelled, layer="counts")
    with pytest.raises(ValueError, match="gene_mask_prob=0 with no phenotype keys"):
        sct.GeneTransformer(unlabelled, **TINY).train(max_epochs=1, gene_mask_prob=0.0, **QUIET)


def test_early_stopping_options_are_checked_before_training(adata):
    sct.setup_anndata(adata, layer="counts", phenotype_keys=["cell_type"])
    model = sct.GeneTransformer(adata, **TINY)
    for option, value, message in (
        ("patience", "x", r"early_stopping_patience must be an integer >= 1 \(epochs\), got 'x'"),
        ("patience", 0, "early_stopping_patience must be an integer >= 1"),
        ("warmup_epochs", -1, "early_stopping_warmup_epochs must be an integer >= 0"),
        ("min_delta", float("nan"), "early_stopping_min_delta must be a finite number >= 0"),
        ("mode", "up", "early_stopping_mode must be 'min' or 'max'"),
        (
            "monitor",
            "loss_valid",
            r"'loss_valid' is not a metric this run logs; did you mean 'loss_validation'\?",
        ),
    ):
        with (
            patch.object(type(model), "_train_runner_cls", side_effect=AssertionError("trained")),
            pytest.raises(ValueError, match=message),
        ):
            model.train(max_epochs=3, early_stopping=True, **{f"early_stopping_{option}": value}, **QUIET)
    with pytest.warns(
        UserWarning, match=r"\['early_stopping_patience'\] are ignored without early_stopping=True"
    ):
        model.train(max_epochs=1, early_stopping_patience=3, **QUIET)
    train_quietly(
        model, max_epochs=1, early_stopping=True, early_stopping_monitor="phenotype_cell_type_validation"
    )

    import lightning.pytorch as pl

    class Score(pl.Callback):
        def on_validation_epoch_end(self, trainer, pl_module):
            pl_module.log("my_score", float(trainer.current_epoch))

    # a metric the user's own callback logs may be monitored
    train_quietly(
        model,
        max_epochs=2,
        early_stopping=True,
        early_stopping_monitor="my_score",
        early_stopping_mode="max",
        callbacks=[Score()],
    )


def test_training_leaves_the_users_global_random_state_as_it_was(adata):
    import random

    sct.setup_anndata(adata, layer="counts")
    model = sct.GeneTransformer(adata, **TINY)
    np.random.seed(123)  # noqa: NPY002 (the global state under test)
    torch.manual_seed(123)
    random.seed(123)
    train_quietly(model, max_epochs=1, seed=7)
    draws = (np.random.rand(), torch.rand(1).item(), random.random())  # noqa: NPY002
    np.random.seed(123)  # noqa: NPY002
    torch.manual_seed(123)
    random.seed(123)
    assert draws == (np.random.rand(), torch.rand(1).item(), random.random())  # noqa: NPY002


def test_load_query_data_refuses_a_bad_accelerator_before_touching_the_query(trained, tmp_path):
    model, data = trained
    model.save(tmp_path / "m")
    query = data.copy()
    for key in [k for k in query.obs if k.startswith("_")]:
        del query.obs[key]
    query.uns.clear()
    before = fingerprint(query)
    with pytest.raises(ValueError, match="accelerator must be"):
        sct.GeneTransformer.load_query_data(query, tmp_path / "m", accelerator="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="finds no CUDA device"):
            sct.GeneTransformer.load_query_data(query, tmp_path / "m", accelerator="cuda")
    assert fingerprint(query) == before and not query.uns


def test_setup_and_creation_refuse_what_would_fail_or_mislead_later(adata):
    # a scipy sparse array (not matrix): a clear error at setup, not a dtype error inside scvi-tools
    arrays = adata.copy()
    arrays.layers["counts"] = sp.csr_array(arrays.layers["counts"])
    with pytest.raises(TypeError, match=r"scipy sparse array.*csr_matrix"):
        sct.setup_anndata(arrays, layer="counts")
    # phenotype keys as a pandas Index (e.g. a slice of obs.columns)
    sct.setup_anndata(adata, layer="counts", phenotype_keys=adata.obs.columns[:1], batch_key="batch")
    assert sct.GeneTransformer(adata, **TINY).phenotype_categories_.keys() == {adata.obs.columns[0]}
    # counts normalised in place after setup: refused before gene scales are read from them
    normalised = adata.copy()
    sct.setup_anndata(normalised, layer="counts")
    normalised.layers["counts"] = normalised.layers["counts"].astype(np.float32) / 3
    with pytest.raises(ValueError, match=r"non-integer values \(e\.g\. .*\).*np\.round"):
        sct.GeneTransformer(normalised, **TINY)
    # a batch column with an unused category has one batch: nothing for batch correction to do
    one = adata.copy()
    one.obs["batch"] = pd.Categorical(["b0"] * one.n_obs, categories=["b0", "b1"])
    sct.setup_anndata(one, layer="counts", batch_key="batch")
    with pytest.raises(ValueError, match="needs at least 2 batches, and the data have 1 batch"):
        sct.GeneTransformer(one, **TINY, batch_correction="adversarial")


def test_training_refuses_counts_normalised_in_place_after_the_model_was_made(adata):
    sct.setup_anndata(adata, layer="counts")
    model = sct.GeneTransformer(adata, **TINY)
    adata.layers["counts"] = adata.layers["counts"].astype(np.float32) / 3
    with pytest.raises(ValueError, match="non-integer values"):
        model.train(max_epochs=1, **QUIET)


def test_a_batch_column_of_mixed_value_types_is_refused_with_the_fix(adata):
    adata.obs["batch"] = pd.Series(["a", 1] * (adata.n_obs // 2), index=adata.obs_names, dtype=object)
    with pytest.raises(ValueError, match=r"mixes strings and other values.*astype\(str\)"):
        sct.setup_anndata(adata, layer="counts", batch_key="batch")
    adata.obs["batch"] = adata.obs["batch"].astype(str)
    sct.setup_anndata(adata, layer="counts", batch_key="batch")  # the fix works


def test_a_load_that_fails_leaves_the_anndata_untouched(adata, tmp_path):
    sct.setup_anndata(adata, layer="counts", phenotype_keys=["cell_type"], batch_key="batch")
    sct.GeneTransformer(adata, **TINY).save(tmp_path / "m")
    state = json.loads((tmp_path / "m" / "model.json").read_text())
    state["phenotype_categories"]["cell_type"].append("type_9")  # no longer fits the weights
    (tmp_path / "m" / "model.json").write_text(json.dumps(state))

    def fresh():
        return sct.datasets.synthetic(n_cells=40, n_genes=60, n_cell_types=3, n_markers=8, seed=3)

    own = fresh()  # set up by the user otherwise (no batch key): keeps that setup
    sct.setup_anndata(own, layer="counts", phenotype_keys=["cell_type"])
    for cells, load in (
        (fresh(), lambda a: sct.GeneTransformer.load(tmp_path / "m", adata=a)),
        (fresh(), lambda a: sct.GeneTransformer.load_query_data(a, tmp_path / "m")),
        (own, lambda a: sct.GeneTransformer.load(tmp_path / "m", adata=a)),
    ):
        before, uns = fingerprint(cells), dict(cells.uns)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(ValueError, match="do not fit the saved hyper-parameters"):
                load(cells)
        assert fingerprint(cells) == before and dict(cells.uns) == uns
    assert sct.GeneTransformer._registered_manager(own).registry["setup_args"]["batch_key"] is None


def test_setting_up_a_copy_leaves_the_original_set_up(adata, tmp_path):
    sct.setup_anndata(adata, layer="counts", phenotype_keys=["cell_type"])
    sct.GeneTransformer(adata, **TINY).save(tmp_path / "m")
    for set_up in (
        lambda a: sct.setup_anndata(a, layer="counts"),
        lambda a: sct.GeneTransformer.load(tmp_path / "m", adata=a),
        lambda a: sct.GeneTransformer.load_query_data(a, tmp_path / "m"),
    ):
        copy = adata[:30].copy()  # inherits the original's scvi-tools id in .uns
        set_up(copy)
        assert copy.uns["_scvi_uuid"] != adata.uns["_scvi_uuid"]
        # both stay set up (was: "The provided AnnData object does not match ... Did you make a copy?")
        assert sct.GeneTransformer(adata, **TINY).adata is adata
        assert sct.GeneTransformer(copy, **TINY).adata is copy


def test_device_and_attaching_cells_follow_scvi_tools_or_say_how(trained, tmp_path):
    model, data = trained
    assert model.device == "cpu"
    model.save(tmp_path / "m")
    loaded = sct.GeneTransformer.load(tmp_path / "m")
    assert loaded.device == "cpu" and loaded.adata is None
    with pytest.raises(ValueError, match=r"GeneTransformer\.load\(dir, adata=\.\.\.\)"):
        loaded.adata = data.copy()
    assert loaded.adata is None


def test_scvi_tools_helpers_work_or_say_what_to_call_on_saved_models(trained, tmp_path, capsys):
    model, data = trained
    model.save(tmp_path / "m")
    loaded = sct.GeneTransformer.load(tmp_path / "m")  # no cells attached
    np.testing.assert_array_equal(loaded.get_var_names(), model.vocabulary_.genes)
    np.testing.assert_array_equal(model.get_var_names(), data.var_names)  # as scvi-tools, with cells
    sct.GeneTransformer.view_setup_args(tmp_path / "m")
    assert "layer: 'counts'" in capsys.readouterr().out
    with pytest.raises(NotImplementedError, match=r"view_setup_args\(dir\)"):
        sct.GeneTransformer.load_registry(tmp_path / "m")
    with pytest.raises(NotImplementedError, match="need no conversion"):
        sct.GeneTransformer.convert_legacy_save(tmp_path / "m", tmp_path / "converted")
    assert not (tmp_path / "converted").exists()


def test_view_anndata_setup_prints_the_registry(adata, capsys):
    sct.setup_anndata(adata, layer="counts", phenotype_keys=["cell_type"])
    m = sct.GeneTransformer(adata, **TINY)
    m.view_anndata_setup()
    out = capsys.readouterr().out
    assert "phenotype_keys" in out and "Data Registry" in out


def test_bad_split_options_are_refused_before_the_counts_are_read(adata, monkeypatch):
    sct.setup_anndata(adata, layer="counts")
    model = sct.GeneTransformer(adata, **TINY)

    def read_counts(*args, **kwargs):
        raise AssertionError("the counts were read before the options were checked")

    monkeypatch.setattr("sctransformer.model._gene_transformer.check_counts", read_counts)
    for options, message in (
        ({"validation_size": 1.5}, "validation_size must be in"),
        ({"validation_size": 0.5, "train_size": 0.8}, "train_size \\+ validation_size <= 1"),
        ({"validation_size": float("nan")}, "validation_size"),
        ({"datasplitter_kwargs": {"shuffle_set_splt": False}}, "shuffle_set_split"),
    ):
        with pytest.raises(ValueError, match=message):
            model.train(max_epochs=1, **QUIET, **options)
