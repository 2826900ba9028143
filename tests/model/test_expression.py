"""Expression of any gene: imputation, condition swaps, in-silico perturbation, generation."""

from __future__ import annotations

import dataclasses
import warnings
from unittest import mock

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import sctransformer as sct
from sctransformer.data import to_torch_csr

from ..conftest import QUIET, TINY, fingerprint


@pytest.fixture(scope="module")
def querying():
    """A tiny model with query tokens, trained on synthetic cells with type and condition tokens."""
    data = sct.datasets.synthetic(n_cells=160, n_genes=40, n_cell_types=3, n_markers=6, seed=3)
    data.obs["condition"] = np.where(np.arange(data.n_obs) % 2 == 0, "ctrl", "stim")
    sct.setup_anndata(data, layer="counts", phenotype_keys=["cell_type", "condition"])
    model = sct.GeneTransformer(data, **TINY, expression_queries=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(max_epochs=2, batch_size=32, **QUIET)
    return model, data


def naive_expected(model, data, cells, n_folds: int) -> np.ndarray:
    """Expected values cell by cell, gene by gene: the cell without the gene's fold, with the gene
    appended as a query token inside the sequence (not through the key/value cache)."""
    module = model.module
    folds = model._gene_folds(n_folds)
    c2g = torch.as_tensor(model._column_to_gene(data))
    codes = model._phenotype_inputs(data, data.n_obs, {})
    out = np.zeros((len(cells), data.n_vars))
    with torch.no_grad():
        for i, cell in enumerate(cells):
            x = to_torch_csr(data.layers["counts"][cell : cell + 1])
            phen = torch.as_tensor(codes[cell : cell + 1])
            for j in range(data.n_vars):
                gene = int(c2g[j])
                t = module.tokenize(x, c2g, held_out=folds == folds[gene])
                one, no = torch.ones(1, 1, dtype=torch.bool), torch.zeros(1, 1, dtype=torch.bool)
                t = dataclasses.replace(
                    t,
                    gene_ids=torch.cat([t.gene_ids, torch.tensor([[gene]])], 1),
                    values=torch.cat([t.values, torch.zeros(1, 1)], 1),
                    bins=torch.cat([t.bins, torch.full((1, 1), -1)], 1),
                    is_token=torch.cat([t.is_token, one], 1),
                    is_unexpressed=torch.cat([t.is_unexpressed, no], 1),
                    is_query=torch.cat([t.is_query, one], 1),
                )
                hidden = module.encode(t, phen)
                cell_embedding = module.cell_embedding(hidden, t)
                logit, mean, _ = module.query_outputs(hidden[:, -1], torch.tensor([gene]), cell_embedding)
                out[i, j] = float(torch.sigmoid(logit) * mean.clamp(min=0))
    return out


def test_imputation_is_finite_for_every_gene_and_matches_a_cell_by_cell_reference(querying):
    model, data = querying
    before = fingerprint(data)
    imputed = model.get_normalized_expression(data, batch_size=50)
    assert imputed.shape == (data.n_obs, data.n_vars) and np.isfinite(imputed).all()
    assert (imputed >= 0).all()
    assert fingerprint(data) == before
    cells = [0, 7, 101]
    np.testing.assert_allclose(imputed[cells], naive_expected(model, data, cells, 4), rtol=1e-4, atol=1e-5)
    # one fold: every gene from the phenotype tokens alone, the same for cells with the same tokens
    alone = model.get_normalized_expression(data, n_folds=1)
    same = (data.obs["cell_type"] == data.obs["cell_type"].iloc[0]) & (
        data.obs["condition"] == data.obs["condition"].iloc[0]
    )
    np.testing.assert_allclose(
        alone[same.to_numpy()], np.broadcast_to(alone[0], alone[same.to_numpy()].shape), atol=1e-5
    )


def test_imputation_of_chosen_genes_and_a_phenotype_swap(querying):
    model, data = querying
    genes = ["gene_3", "gene_0"]
    chosen = model.get_normalized_expression(data, genes=genes)
    everything = model.get_normalized_expression(data)
    np.testing.assert_allclose(chosen, everything[:, [3, 0]], rtol=1e-5, atol=1e-6)
    swapped = model.get_normalized_expression(data, genes=genes, phenotypes={"condition": "stim"})
    stim = (data.obs["condition"] == "stim").to_numpy()
    np.testing.assert_allclose(swapped[stim], chosen[stim], rtol=1e-5, atol=1e-6)  # already stim: unchanged
    assert not np.allclose(swapped[~stim], chosen[~stim])


def test_predict_response_returns_the_swapped_prediction_and_the_baseline(querying):
    model, data = querying
    controls = data[data.obs["condition"] == "ctrl"]
    before = fingerprint(controls)
    out = sct.tl.predict_response(controls, model, {"condition": "stim"})
    assert fingerprint(controls) == before
    assert out.shape == controls.shape and list(out.obs_names) == list(controls.obs_names)
    assert out.uns["sct_response"]["set"] == {"condition": "stim"}
    np.testing.assert_allclose(
        out.X, model.get_normalized_expression(controls, phenotypes={"condition": "stim"}), rtol=1e-5
    )
    np.testing.assert_allclose(
        out.layers["sct_baseline"], model.get_normalized_expression(controls), rtol=1e-5
    )
    with pytest.raises(ValueError, match=r"never saw; known values: \['ctrl', 'stim'\]"):
        model.predict_response(controls, {"condition": "lps"})
    with pytest.raises(ValueError, match="not a phenotype of the model"):
        model.predict_response(controls, {"donor": "a"})
    one = model.predict_response(controls, {"condition": "stim"}, genes="gene_3")  # one gene, as a string
    assert list(one.var_names) == ["gene_3"]
    np.testing.assert_allclose(one.X[:, 0], out[:, "gene_3"].X[:, 0], rtol=1e-5, atol=1e-6)


def test_a_phenotype_value_is_matched_as_the_cells_labels_are(tmp_path):
    data = sct.datasets.synthetic(n_cells=60, n_genes=40, seed=2)
    data.obs["dose"] = np.where(np.arange(60) % 2, 10, 0)  # integers: categories "0" and "10"
    sct.setup_anndata(data, layer="counts", phenotype_keys=["dose"])
    model = sct.GeneTransformer(data, d_model=8, n_heads=2, n_layers=1, max_length=16, expression_queries=4)
    expected = model._check_phenotype_values({"dose": "10"}, "set")
    for value in (10, np.int64(10), 10.0, np.float32(10.0)):
        assert model._check_phenotype_values({"dose": value}, "set") == expected == {"dose": 1}
    with pytest.raises(ValueError, match="never saw"):
        model._check_phenotype_values({"dose": 10.5}, "set")
    response = model.predict_response(data[:5], {"dose": 10.0}, genes=["gene_1"])
    assert response.uns["sct_response"]["set"] == {"dose": "10"}  # the category used, as named


def test_refined_response_feeds_each_prediction_back_as_the_cells_input(querying):
    model, data = querying
    controls = data[data.obs["condition"] == "ctrl"][:20].copy()
    out = model.predict_response(controls, {"condition": "stim"}, refine_rounds=1, batch_size=8)
    assert out.uns["sct_response"]["refine_rounds"] == 1

    # reference: every gene by folds; then the genes expressed or predicted likely, at their predicted
    # values, as pseudo-counts with the cell's library (its rest in a column outside the vocabulary);
    # then every gene by folds again
    counts = controls.layers["counts"].toarray()
    column_to_gene = torch.as_tensor(model._column_to_gene(controls))
    every = torch.arange(len(model.vocabulary_))
    no_batch = torch.full((controls.n_obs,), -1)
    folds = model._gene_folds(4)
    for overrides, refined in (({"condition": "stim"}, out.X), ({}, out.layers["sct_baseline"])):
        codes = model._phenotype_inputs(
            controls, controls.n_obs, model._check_phenotype_values(overrides, "set")
        )
        codes = torch.as_tensor(codes)
        with model._inference():
            x = to_torch_csr(sp.csr_matrix(counts))
            p, mean = (
                t.numpy() for t in model._fold_outputs(x, column_to_gene, codes, no_batch, every, folds)
            )
            expressed = np.zeros_like(p, dtype=bool)
            expressed[:, column_to_gene.numpy()] = counts > 0
            values = np.where(expressed | (p > 0.5), mean, 0.0)
            library = counts.sum(1, keepdims=True)
            pseudo = np.expm1(values) * library / 1e4
            rest = library - pseudo.sum(1, keepdims=True)
            assert (rest > 0).all()  # the predicted profile leaves part of the library to other genes
            x = to_torch_csr(sp.csr_matrix(np.hstack([pseudo, rest]).astype(np.float32)))
            columns = torch.cat([every, torch.tensor([-1])])
            # the tokenizer gives back the predicted values: the cells are fed their prediction
            tokens = model.module.tokenize(x, columns)
            fed = tokens.values[tokens.is_token].numpy()
            cell = np.nonzero(tokens.is_token.numpy())[0]
            np.testing.assert_allclose(fed, values[cell, tokens.gene_ids[tokens.is_token].numpy()], rtol=1e-4)
            p, mean = (t.numpy() for t in model._fold_outputs(x, columns, codes, no_batch, every, folds))
        expected = (p * mean)[:, column_to_gene.numpy()]
        np.testing.assert_allclose(refined, expected, rtol=1e-4, atol=1e-5)
    plain = model.predict_response(controls, {"condition": "stim"})
    assert not np.allclose(out.X, plain.X, atol=1e-4)  # the round changed the prediction
    with pytest.raises(ValueError, match="refine_rounds must be an integer >= 0"):
        model.predict_response(controls, {"condition": "stim"}, refine_rounds=-1)


def test_deletion_equals_tokenizing_without_the_gene_and_runs_only_on_expressing_cells(querying):
    model, data = querying
    counts = data.layers["counts"]
    gene = "gene_5"
    expressing = np.flatnonzero(np.asarray((counts[:, 5] > 0).todense()).ravel())
    assert 0 < len(expressing) < data.n_obs
    result = model.perturb(data, [gene], return_cell_shifts=True, batch_size=17)
    assert int(result.summary["n_cells"].iloc[0]) == len(expressing)
    shifts = result.cell_shifts[gene]
    assert not shifts[np.setdiff1d(np.arange(data.n_obs), expressing)].any()
    # reference: the gene held out of the tokens (library and bins as measured), one cell at a time
    module, c2g = model.module, torch.as_tensor(model._column_to_gene(data))
    held = torch.zeros(len(model.vocabulary_), dtype=torch.bool)
    held[5] = True
    codes = torch.as_tensor(model._phenotype_inputs(data, data.n_obs, {}))
    with torch.no_grad():
        # cells within max_length (re-tokenising a longer cell lets the next gene into the freed place)
        short = [c for c in expressing if counts[c].nnz <= TINY["max_length"]]
        assert len(short) >= 5
        for cell in short[:5]:
            x = to_torch_csr(counts[cell : cell + 1])
            full, without = module.tokenize(x, c2g), module.tokenize(x, c2g, held_out=held)
            before = module.cell_embedding(module.encode(full, codes[cell : cell + 1]), full)
            after = module.cell_embedding(module.encode(without, codes[cell : cell + 1]), without)
            np.testing.assert_allclose(shifts[cell], (after - before)[0].numpy(), rtol=1e-4, atol=1e-5)
    change = result.expression_change
    assert change.shape == (1, len(model.vocabulary_)) and np.isfinite(change.to_numpy()).all()
    assert gene not in result.summary["most_changed"].iloc[0]


def test_overexpression_runs_on_every_cell_and_groups_are_reported(querying):
    model, data = querying
    result = model.perturb(data, "gene_2", mode="overexpress", groupby="cell_type", predict_expression=False)
    assert set(result.summary["group"]) == set(data.obs["cell_type"].astype(str))
    assert result.summary["n_cells"].sum() == data.n_obs
    assert (result.summary["embedding_shift"] > 0).all() and result.expression_change is None
    fixed = model.perturb(data, "gene_2", mode="overexpress", value=3.0, predict_expression=False)
    twice = model.perturb(data, ["gene_2", "gene_2"], mode="overexpress", predict_expression=False)
    assert len(twice.summary) == 1 and twice.summary["embedding_shift"].iloc[0] == pytest.approx(
        model.perturb(data, "gene_2", mode="overexpress", predict_expression=False)
        .summary["embedding_shift"]
        .iloc[0]
    )
    assert fixed.summary["embedding_shift"].iloc[0] != pytest.approx(result.summary["embedding_shift"].mean())


def test_perturbation_bad_input(querying):
    model, data = querying
    with pytest.raises(ValueError, match=r"not in the model's vocabulary.*\['NOPE', 'ALSO_NOT'\]"):
        model.perturb(data, ["gene_1", "NOPE", "ALSO_NOT"])
    silent = data.copy()
    counts = silent.layers["counts"].toarray()
    counts[:, 9] = 0
    silent.layers["counts"] = sp.csr_matrix(counts)
    with pytest.warns(UserWarning, match="gene_9 is expressed in no cell"):
        result = model.perturb(silent, ["gene_9", "gene_1"], predict_expression=False)
    assert list(result.summary["perturbed"]) == ["gene_1"]
    with pytest.warns(UserWarning, match="gene_9 is not among adata's genes; its deletion is skipped"):
        model.perturb(
            data[:, data.var_names != "gene_9"].copy(), ["gene_9", "gene_1"], predict_expression=False
        )
    with pytest.raises(ValueError, match="mode must be"):
        model.perturb(data, "gene_1", mode="knockdown")
    with pytest.raises(ValueError, match="value is the over-expressed"):
        model.perturb(data, "gene_1", value=2.0)


def test_tl_perturb_writes_results_and_they_plot(querying):
    model, data = querying
    adata = data.copy()
    summary = sct.tl.perturb(adata, model, ["gene_1", "gene_4"], store_cell_shifts=True)
    assert list(summary["perturbed"]) == ["gene_1", "gene_4"]
    stored = adata.uns["sct_perturb"]
    # genes as rows: anndata writes each column under its own key, which cannot hold "/"
    assert stored["expression_change"].shape == (adata.n_vars, 2)
    assert list(stored["expression_change"].columns) == ["0", "1"]
    pd.testing.assert_frame_equal(
        stored["expression_change"].T.reset_index(drop=True),
        model.perturb(data, ["gene_1", "gene_4"]).expression_change.reset_index(drop=True),
    )
    assert adata.uns["sct"]["sct_perturb"]["params"]["genes"] == ["gene_1", "gene_4"]
    assert adata.obsm["sct_perturb_gene_1"].shape == (adata.n_obs, TINY["d_model"])
    assert sct.pl.perturbation(adata, show=False) is not None
    assert sct.pl.perturbation(adata, gene="gene_4", n=5, show=False) is not None
    with pytest.raises(ValueError, match="was not perturbed"):
        sct.pl.perturbation(adata, gene="gene_7", show=False)
    # the returned table sorted or re-indexed in place: the stored results stay aligned
    stored = {k: v.copy() for k, v in stored.items() if isinstance(v, pd.DataFrame)}
    summary.sort_values("embedding_shift", ascending=False, inplace=True)
    summary.set_index("perturbed", inplace=True)
    for name, table in stored.items():
        pd.testing.assert_frame_equal(adata.uns["sct_perturb"][name], table)
    assert sct.pl.perturbation(adata, gene="gene_4", n=5, show=False) is not None


def test_cell_shifts_of_a_gene_with_a_slash_in_its_name_can_be_written(tmp_path):
    data = sct.datasets.synthetic(n_cells=60, n_genes=20, n_cell_types=2, n_markers=4, seed=5)
    data.var_names = ["HLA-A/B", *data.var_names[1:]]
    sct.setup_anndata(data, layer="counts")
    model = sct.GeneTransformer(data, **TINY)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(max_epochs=1, batch_size=32, **QUIET)
    sct.tl.perturb(data, model, "HLA-A/B", predict_expression=False, store_cell_shifts=True)
    assert data.obsm["sct_perturb_HLA-A_B"].shape == (data.n_obs, TINY["d_model"])
    data.write_h5ad(tmp_path / "perturbed.h5ad")  # a "/" in an .obsm key would fail here


def test_generation_is_reproducible_with_a_seed(querying):
    model, _ = querying
    tokens = {"cell_type": "type_1", "condition": "stim"}
    first = model.generate(tokens, 12, seed=4, n_steps=3)
    again = model.generate(tokens, 12, seed=4, n_steps=3)
    other = model.generate(tokens, 12, seed=5, n_steps=3)
    assert first.shape == (12, len(model.vocabulary_))
    np.testing.assert_array_equal(first.X.toarray(), again.X.toarray())
    assert not np.array_equal(first.X.toarray(), other.X.toarray())
    assert (first.X.data > 0).all() and np.isfinite(first.X.data).all() and first.X.nnz > 0
    assert (first.obs["condition"] == "stim").all()
    assert first.uns["sct_generation"]["seed"] == 4


def test_generation_and_imputation_bad_input(querying, adata):
    model, _ = querying
    with pytest.raises(ValueError, match="n_cells must be a positive integer"):
        model.generate({"cell_type": "type_1"}, 0)
    with pytest.raises(ValueError, match=r"never saw; known values: \['type_0', 'type_1', 'type_2'\]"):
        model.generate({"cell_type": "type_9"}, 5)
    sct.setup_anndata(adata, layer="counts", phenotype_keys=["cell_type"])
    plain = sct.GeneTransformer(adata, **TINY)
    with pytest.raises(ValueError, match="expression_queries"):
        plain.get_normalized_expression(adata)


def test_response_plot_shows_the_predicted_and_observed_mean_changes(querying):
    model, data = querying
    controls = data[(data.obs["condition"] == "ctrl") & (data.obs["cell_type"] == "type_0")]
    predicted = sct.tl.predict_response(controls, model, {"condition": "stim"})
    ax = sct.pl.response(predicted, data, genes=["gene_2"], groupby="cell_type", show=False)
    x, y = np.asarray(ax.collections[0].get_offsets()).T
    np.testing.assert_allclose(
        x, predicted.X.mean(0) - predicted.layers["sct_baseline"].mean(0), rtol=1e-4, atol=1e-5
    )
    counts = data.layers["counts"].toarray()
    values = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)
    stim = ((data.obs["condition"] == "stim") & (data.obs["cell_type"] == "type_0")).to_numpy()
    ctrl = data.obs_names.isin(controls.obs_names)
    np.testing.assert_allclose(y, values[stim].mean(0) - values[ctrl].mean(0), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="predict_response"):
        sct.pl.response(controls, data, show=False)


def test_response_plot_matches_genes_by_the_models_gene_key():
    data = sct.datasets.synthetic(n_cells=120, n_genes=30, n_cell_types=3, n_markers=6, seed=3)
    data.obs["condition"] = np.where(np.arange(data.n_obs) % 2 == 0, "ctrl", "stim")
    data.var["ensembl"] = [f"ENSG{i:05d}" for i in range(data.n_vars)]  # var_names stay symbols
    data = data[:, ::-1].copy()  # and the columns in another order than the vocabulary's
    sct.setup_anndata(data, layer="counts", phenotype_keys=["condition"], gene_key="ensembl")
    model = sct.GeneTransformer(data, **TINY, expression_queries=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(max_epochs=1, batch_size=32, **QUIET)
    controls = data[data.obs["condition"] == "ctrl"].copy()
    predicted = sct.tl.predict_response(controls, model, {"condition": "stim"})
    assert predicted.uns["sct_response"]["gene_key"] == "ensembl"
    ax = sct.pl.response(predicted, data, genes=["ENSG00002"], show=False)
    _, y = np.asarray(ax.collections[0].get_offsets()).T
    counts = data.layers["counts"].toarray()
    values = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)
    stim = (data.obs["condition"] == "stim").to_numpy()
    observed = values[stim].mean(0) - values[~stim].mean(0)
    columns = pd.Index(data.var["ensembl"]).get_indexer(predicted.var_names)
    np.testing.assert_allclose(y, observed[columns], rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def counts_in_x():
    """A tiny querying model set up on counts in ``X`` (the matrix a backed AnnData reads from disk)."""
    data = sct.datasets.synthetic(n_cells=60, n_genes=40, n_cell_types=3, n_markers=6, seed=3)
    sct.setup_anndata(data, layer=None, phenotype_keys=["cell_type"])
    model = sct.GeneTransformer(data, **TINY, expression_queries=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(max_epochs=1, batch_size=32, **QUIET)
    return model, data


@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "dense"])
def test_perturbation_of_a_backed_adata_reads_it_in_row_chunks_and_matches_in_memory(
    counts_in_x, tmp_path, monkeypatch, dense
):
    model, data = counts_in_x
    data = data.copy()
    if dense:
        data.X = data.X.toarray()
    data.write_h5ad(tmp_path / "cells.h5ad")
    backed = ad.read_h5ad(tmp_path / "cells.h5ad", backed="r")
    options = {"groupby": "cell_type", "return_cell_shifts": True, "batch_size": 16}
    expected = {
        mode: model.perturb(data, ["gene_1", "gene_7"], mode=mode, **options)
        for mode in ("overexpress", "delete")
    }
    monkeypatch.setattr("sctransformer.model._expression._CHUNK_ROWS", 7, raising=False)  # several chunks
    for mode, reference in expected.items():
        result = model.perturb(backed, ["gene_1", "gene_7"], mode=mode, **options)
        pd.testing.assert_frame_equal(result.summary, reference.summary)
        pd.testing.assert_frame_equal(result.expression_change, reference.expression_change)
        for gene, shifts in reference.cell_shifts.items():
            np.testing.assert_array_equal(result.cell_shifts[gene], shifts)


def test_overexpression_leaves_out_cells_without_vocabulary_genes(querying):
    model, data = querying
    data = data.copy()
    counts = data.layers["counts"].tolil()
    counts[0, :] = 0
    data.layers["counts"] = counts.tocsr()
    # a gene outside the vocabulary that every cell expresses: cell 0 has only it
    extra = ad.AnnData(X=sp.csr_matrix(np.full((data.n_obs, 1), 5, dtype=np.float32)), obs=data.obs.copy())
    extra.layers["counts"] = extra.X.copy()
    extra.var_names = ["NOT_IN_VOCABULARY"]
    cells = ad.concat([data, extra], axis=1, merge="same")
    for value in (None, 2.0):
        result = model.perturb(
            cells,
            "gene_1",
            mode="overexpress",
            value=value,
            predict_expression=False,
            return_cell_shifts=True,
        )
        assert int(result.summary["n_cells"].iloc[0]) == cells.n_obs - 1
        assert not result.cell_shifts["gene_1"][0].any()
        assert result.cell_shifts["gene_1"][1:].any()


def test_a_non_finite_cell_shift_is_refused_before_anything_is_computed(querying):
    model, data = querying
    d_model = TINY["d_model"]
    with mock.patch.object(model, "_fold_outputs", side_effect=AssertionError("computed")):
        for bad in (np.nan, np.inf, -np.inf):
            shift = np.zeros(d_model)
            shift[3] = bad
            with pytest.raises(ValueError, match="cell_shift holds NaN or infinite values"):
                model.get_normalized_expression(data, cell_shift=shift)
    finite = model.get_normalized_expression(data[:5], cell_shift=np.full(d_model, 0.1))
    assert np.isfinite(finite).all()


def test_deletion_without_a_profile_warns_of_expressing_cells_beyond_max_length():
    data = sct.datasets.synthetic(n_cells=60, n_genes=40, n_cell_types=3, n_markers=6, seed=3)
    sct.setup_anndata(data, layer="counts")
    model = sct.GeneTransformer(data, **{**TINY, "max_length": 8}, cell_profile=False)
    expressing = int((data.layers["counts"][:, 1] > 0).sum())
    with pytest.warns(
        UserWarning, match=r"(\d+) of the (\d+) cells expressing gene_1 were skipped"
    ) as caught:
        result = model.perturb(data, "gene_1", predict_expression=False)
    message = next(str(w.message) for w in caught if "cells expressing gene_1" in str(w.message))
    skipped, total = map(int, message.split(" cells expressing")[0].split(" of the "))
    n_cells = int(result.summary["n_cells"].iloc[0])
    assert total == expressing and skipped > 0 and n_cells == expressing - skipped


def test_genes_perturbed_in_no_cell_get_no_cell_shifts():
    data = sct.datasets.synthetic(n_cells=60, n_genes=40, n_cell_types=3, n_markers=6, seed=3)
    sct.setup_anndata(data, layer="counts")
    model = sct.GeneTransformer(data, **{**TINY, "max_length": 4}, cell_profile=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = model.perturb(data, list(data.var_names), predict_expression=False, return_cell_shifts=True)
    with_rows = set(result.summary["perturbed"])
    assert len(with_rows) < data.n_vars  # some genes are beyond max_length in every cell expressing them
    assert set(result.cell_shifts) == with_rows
    assert all(np.abs(shifts).sum() > 0 for shifts in result.cell_shifts.values())


def test_perturb_refuses_a_value_that_is_not_a_number(querying):
    model, data = querying
    for bad in ("2", True, np.ones(3)):
        with pytest.raises(TypeError, match="value must be a number"):
            model.perturb(data, "gene_1", mode="overexpress", value=bad)
    assert model.perturb(data, "gene_1", mode="overexpress", value=np.float32(2.0), predict_expression=False)


def test_tl_perturb_refuses_the_run_records_key_and_leaves_them(querying):
    model, data = querying
    adata = data.copy()
    sct.tl.embed(adata, model)
    records = dict(adata.uns["sct"])
    with pytest.raises(ValueError, match="records every tool's runs"):
        sct.tl.perturb(adata, model, "gene_1", key_added="sct")
    assert dict(adata.uns["sct"]).keys() == records.keys()


def test_tl_perturb_results_of_a_gene_named_with_a_slash_write_to_h5ad_and_zarr(tmp_path):
    data = sct.datasets.synthetic(n_cells=40, n_genes=20, n_cell_types=2, n_markers=4, seed=3)
    data.var_names = ["HLA-A/B" if name == "gene_1" else name for name in data.var_names]
    sct.setup_anndata(data, layer="counts")
    model = sct.GeneTransformer(data, **TINY, expression_queries=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an untrained model's outputs
        sct.tl.perturb(data, model, "gene_4")
    assert "HLA-A/B" in data.uns["sct_perturb"]["expression_change"].index
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # anndata warns before it refuses "/" in h5 keys
        data.write_h5ad(tmp_path / "perturbed.h5ad")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*zarr v2.*")
        data.write_zarr(tmp_path / "perturbed.zarr")
    back = ad.read_h5ad(tmp_path / "perturbed.h5ad")
    assert sct.pl.perturbation(back, gene="gene_4", n=3, show=False) is not None
