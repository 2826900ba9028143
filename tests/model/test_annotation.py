"""Annotation features of the model: class weights, focal loss, freezing, calibration, transfer."""

from __future__ import annotations

import json
import warnings
from unittest.mock import patch

import numpy as np
import pandas as pd
import pytest
import torch

import sctransformer as sct

from ..conftest import QUIET, TINY


def train_quietly(model, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(**{"max_epochs": 2, "batch_size": 32, **QUIET, **kwargs})


def synthetic(seed: int, n_cells: int = 150):
    return sct.datasets.synthetic(n_cells=n_cells, n_genes=60, n_cell_types=3, n_markers=8, seed=seed)


def test_balanced_class_weights_match_a_naive_count(adata):
    adata.obs["cell_type"] = pd.Categorical(
        np.where(np.arange(adata.n_obs) < 90, "common", np.where(np.arange(adata.n_obs) < 110, "mid", "rare"))
    )
    adata.obs.loc[adata.obs_names[:5], "cell_type"] = np.nan
    sct.setup_anndata(adata, layer="counts", phenotype_keys=["cell_type"])
    model = sct.GeneTransformer(adata, **TINY)
    train_idx = np.arange(0, adata.n_obs, 2)
    (weights,) = model._class_weights(train_idx)
    labels = adata.obs["cell_type"].to_numpy()[train_idx]
    labels = labels[pd.notna(labels)]
    cats = model.phenotype_categories_["cell_type"]
    expected = [len(labels) / (len(set(labels)) * (labels == c).sum()) for c in cats]
    np.testing.assert_allclose(weights.numpy(), expected, rtol=1e-6)
    train_quietly(model, class_weight="balanced", focal_gamma=2.0)
    assert model.train_settings_["class_weight"] == "balanced"
    assert np.isfinite(model.history["phenotype_cell_type_train"].to_numpy()).all()


@pytest.mark.parametrize(
    ("freeze", "fixed", "trained_part"),
    [
        (
            "backbone",
            ["gene_embedding", "bin_embedding", "blocks", "cls"],
            ["phenotype_heads", "expression_head"],
        ),
        ("embeddings", ["gene_embedding", "bin_embedding"], ["blocks", "phenotype_heads"]),
        ("none", [], ["gene_embedding", "blocks", "phenotype_heads"]),
    ],
)
def test_freeze_modes_keep_exactly_their_parameters_fixed(adata, freeze, fixed, trained_part):
    sct.setup_anndata(adata, layer="counts", phenotype_keys=["cell_type"])
    model = sct.GeneTransformer(adata, **TINY)
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    train_quietly(model, freeze=freeze)
    after = model.module.state_dict()
    for prefix in fixed:
        for k in before:
            if k.split(".")[0] == prefix:
                assert torch.equal(before[k], after[k]), k
    for prefix in trained_part:
        assert any(not torch.equal(before[k], after[k]) for k in before if k.split(".")[0] == prefix), prefix
    assert all(p.requires_grad for p in model.module.parameters())  # restored after training


def test_calibration_fits_the_nll_minimising_temperature_and_keeps_labels(trained):
    model, data = trained
    table = model.calibrate(data, indices=np.arange(60))
    row = table.loc["cell_type"]
    assert row["n_cells"] == 60
    assert row["nll_after"] <= row["nll_before"] + 1e-9
    # naive reference: grid search of the temperature on the same cells
    logits = model._phenotype_logits(data[:60], ["cell_type"], None)["cell_type"].astype(np.float64)
    target = sct.data.category_codes(data.obs["cell_type"][:60], model.phenotype_categories_["cell_type"])

    def nll(t):
        z = logits / t
        z = z - z.max(1, keepdims=True)
        return float(-(z[np.arange(60), target] - np.log(np.exp(z).sum(1))).mean())

    grid = np.exp(np.linspace(np.log(0.05), np.log(20), 2001))
    best = grid[np.argmin([nll(t) for t in grid])]
    assert row["temperature"] == pytest.approx(best, rel=0.01)
    assert row["nll_after"] == pytest.approx(nll(row["temperature"]), rel=1e-6)
    calibrated = model.predict(data)
    raw = model.predict(data, calibrated=False)
    assert (calibrated["cell_type"] == raw["cell_type"]).all()
    if abs(row["temperature"] - 1) > 0.05:
        assert not np.allclose(calibrated["cell_type_confidence"], raw["cell_type_confidence"])


def test_calibration_on_labels_the_model_does_not_know_is_refused_or_warned_about(trained):
    model, data = trained
    before = dict(model.temperatures_)
    cells = data[:60].copy()
    cells.obs["cell_type"] = cells.obs["cell_type"].cat.rename_categories(lambda c: f"{c} cell")
    with (
        pytest.warns(UserWarning, match="categories the reference does not know"),
        pytest.raises(ValueError, match="no cell has a label of 'cell_type' that the model knows"),
    ):
        model.calibrate(cells, phenotype="cell_type")
    assert model.temperatures_ == before
    partly = data[:60].copy()
    partly.obs["cell_type"] = partly.obs["cell_type"].cat.rename_categories({"type_0": "novel"})
    n_known = int((partly.obs["cell_type"] != "novel").sum())
    with pytest.warns(UserWarning, match=r"does not know: \['novel'\]"):
        table = model.calibrate(partly)
    assert table.loc["cell_type", "n_cells"] == n_known
    model.temperatures_ = before
    # labels under another column name, or none the model knows: refused before any forward pass
    renamed = data[:60].copy()
    renamed.obs = renamed.obs.rename(columns={"cell_type": "celltype"})
    unknown = data[:60].copy()
    unknown.obs["cell_type"] = "novel"
    for cells, column in ((renamed, "'celltype'"), (unknown, "'cell_type'")):
        with (
            warnings.catch_warnings(),
            patch.object(type(model), "_phenotype_logits", side_effect=AssertionError("forward pass")),
            pytest.raises(
                ValueError, match=rf"no cell has a label the model knows .*columns: \[{column}.*adata\.obs\["
            ),
        ):
            warnings.simplefilter("ignore")
            model.calibrate(cells)
    assert model.temperatures_ == before


def test_an_uncalibrated_threshold_is_warned_about_and_the_temperatures_used_are_recorded(trained):
    model, data = trained
    before = dict(model.temperatures_)
    try:
        adata = data.copy()
        sct.tl.predict(adata, model, min_confidence=0.5)
        assert adata.uns["sct"]["sct"]["params"]["temperatures"] == {"cell_type": before["cell_type"]}
        model.temperatures_ = {}
        with pytest.warns(UserWarning, match=r"no calibration temperature for \['cell_type'\]"):
            sct.tl.predict(adata, model, min_confidence=0.5)
        assert adata.uns["sct"]["sct"]["params"]["temperatures"] == {"cell_type": 1.0}
    finally:
        model.temperatures_ = before


def test_calibration_keeps_temperature_1_when_every_cell_is_right_and_warns_at_the_range_end(trained, caplog):
    model, data = trained
    temperatures, calibration = dict(model.temperatures_), dict(model.calibration_)
    try:
        cells = data[:60].copy()
        predicted = model.predict(cells, calibrated=False)["cell_type"]
        cells.obs["cell_type"] = predicted.astype(str).to_numpy()  # every label as predicted
        with caplog.at_level("WARNING", logger="sctransformer"):
            row = model.calibrate(cells).loc["cell_type"]
        assert "all 60 calibration cells of 'cell_type' are predicted correctly" in caplog.text
        assert row["temperature"] == 1.0 and model.temperatures_["cell_type"] == 1.0
        assert row["nll_after"] == row["nll_before"] and row["ece_after"] == row["ece_before"]
        # every label wrong: the likelihood rises with the temperature, up to the end of the range
        categories = model.phenotype_categories_["cell_type"]
        wrong = [
            categories[(categories.index(label) + 1) % len(categories)] for label in cells.obs["cell_type"]
        ]
        cells.obs["cell_type"] = wrong
        with caplog.at_level("WARNING", logger="sctransformer"):
            row = model.calibrate(cells).loc["cell_type"]
        assert "reached the end of its range (0.05, 20.0)" in caplog.text
        assert row["temperature"] == pytest.approx(20.0, rel=1e-3)
    finally:
        model.temperatures_, model.calibration_ = temperatures, calibration


def test_calibration_takes_a_boolean_mask_like_positions(trained):
    model, data = trained
    mask = np.zeros(data.n_obs, dtype=bool)
    mask[:60] = True
    by_mask = model.calibrate(data, indices=mask).loc["cell_type", "temperature"]
    by_position = model.calibrate(data, indices=np.arange(60)).loc["cell_type", "temperature"]
    assert by_mask == pytest.approx(by_position)
    with pytest.raises(ValueError, match="one entry per cell"):
        model.calibrate(data, indices=mask[:-1])


def test_training_calibrates_on_the_validation_cells(adata):
    sct.setup_anndata(adata, layer="counts", phenotype_keys=["cell_type"])
    model = sct.GeneTransformer(adata, **TINY)
    train_quietly(model)
    assert set(model.temperatures_) == {"cell_type"}
    assert model.calibration_["cell_type"]["n_cells"] == len(model.validation_indices)
    train_quietly(model, calibrate=False)
    assert model.temperatures_ == {}  # a stale temperature is never kept


def test_min_confidence_labels_uncertain_cells_unknown(trained):
    model, data = trained
    plain = model.predict(data)
    threshold = float(np.median(plain["cell_type_confidence"]))
    gated = model.predict(data, min_confidence=threshold)
    low = plain["cell_type_confidence"].to_numpy() < threshold
    assert (gated["cell_type"][low] == "unknown").all()
    assert (gated["cell_type"][~low].astype(str) == plain["cell_type"][~low].astype(str)).all()
    assert list(gated["cell_type"].cat.categories) == [*model.phenotype_categories_["cell_type"], "unknown"]


def test_load_query_data_aligns_genes_extends_batches_and_keeps_the_reference(trained, tmp_path):
    model, _ = trained
    model.save(tmp_path / "ref")
    query = synthetic(seed=7)
    query = query[:, ::-1].copy()  # other gene order
    query = query[:, 5:].copy()  # 55 of the 60 genes
    query.obs["batch"] = query.obs["batch"].astype(str) + "_query"
    query.obs = query.obs.drop(columns="cell_type")
    from_dir = sct.GeneTransformer.load_query_data(query, tmp_path / "ref")
    assert from_dir.gene_coverage_["n_shared"] == 55
    assert from_dir.temperatures_ == model.temperatures_
    from_model = sct.GeneTransformer.load_query_data(query.copy(), model)
    for a, b in ((from_dir, model), (from_model, model)):
        for k, v in b.module.state_dict().items():
            torch.testing.assert_close(a.module.state_dict()[k], v.cpu(), rtol=0, atol=0)
    np.testing.assert_allclose(
        from_dir.get_latent_representation(query),
        model.get_latent_representation(query),
        rtol=1e-5,
        atol=1e-6,
    )
    # a query without labels can be adapted (expression only) with a frozen backbone
    train_quietly(from_dir, freeze="backbone")
    # scvi-tools appends the new epochs to the reference's history; the query had no labels to score
    history = from_dir.history
    assert len(history["loss_train"]) == len(model.history["loss_train"]) + 2
    assert len(history["phenotype_cell_type_train"]) == len(model.history["phenotype_cell_type_train"])


def test_load_query_data_extends_batch_categories(adata, tmp_path):
    sct.setup_anndata(adata, layer="counts", batch_key="batch")
    model = sct.GeneTransformer(adata, **TINY)
    model.save(tmp_path / "ref")
    query = synthetic(seed=3, n_cells=40)
    query.obs["batch"] = np.where(np.arange(40) < 20, "batch_1", "new_batch")
    q = sct.GeneTransformer.load_query_data(query, tmp_path / "ref")
    assert q.batch_categories_ == [*model.batch_categories_, "new_batch"]
    codes = query.obs["_scvi_batch"].to_numpy()
    assert (codes[:20] == model.batch_categories_.index("batch_1")).all()
    assert (codes[20:] == len(model.batch_categories_)).all()


def test_load_query_data_matches_integer_batches_to_the_reference(adata, tmp_path):
    adata.obs["batch"] = adata.obs["batch"].cat.codes.astype(int)  # batches 0, 1, saved as "0", "1"
    sct.setup_anndata(adata, layer="counts", batch_key="batch")
    model = sct.GeneTransformer(adata, **TINY)
    model.save(tmp_path / "ref")
    query = synthetic(seed=3, n_cells=40)
    query.obs["batch"] = np.where(np.arange(40) < 20, 1, 7)
    for reference in (tmp_path / "ref", model):
        q = sct.GeneTransformer.load_query_data(query, reference)
        assert q.batch_categories_ == [*model.batch_categories_, "7"]
        codes = query.obs["_scvi_batch"].to_numpy()
        assert (codes[:20] == model.batch_categories_.index("1")).all()
        assert (codes[20:] == len(model.batch_categories_)).all()
    # integers cannot name the reference's batches "batch_0", ...: a clear error, not a crash in sorting
    named = synthetic(seed=4, n_cells=40)
    sct.setup_anndata(named, layer="counts", batch_key="batch")
    with pytest.raises(ValueError, match=r"astype\(str\)"):
        sct.GeneTransformer.load_query_data(query, sct.GeneTransformer(named, **TINY))


def test_a_refused_query_keeps_its_setup_id_and_the_reference_batch_key_is_no_phenotype(adata, tmp_path):
    sct.setup_anndata(adata, layer="counts", batch_key="batch")
    sct.GeneTransformer(adata, **TINY).save(tmp_path / "ref")
    query = synthetic(seed=3, n_cells=40)
    sct.setup_anndata(query, layer="counts", batch_key="batch")
    query = query.copy()  # a copy of a set-up AnnData: registering it gives it an id of its own
    query.obs["batch"] = np.arange(40) % 2  # integers cannot be the reference's "batch_0", ...
    before = dict(query.uns)
    with pytest.raises(ValueError, match="the reference names its batches"):
        sct.GeneTransformer.load_query_data(query, tmp_path / "ref")
    assert dict(query.uns) == before
    with pytest.raises(ValueError, match=r"is the reference's batch key.*copy it to another column"):
        sct.GeneTransformer.load_query_data(
            synthetic(seed=3, n_cells=40), tmp_path / "ref", phenotype_keys=["batch"]
        )


def test_pretrained_model_gets_new_phenotype_slots_and_fine_tunes(adata, tmp_path):
    sct.setup_anndata(adata, layer="counts")
    pretrained = sct.GeneTransformer(adata, **TINY)
    train_quietly(pretrained)
    labelled = synthetic(seed=5)
    sct.setup_anndata(labelled, layer="counts", phenotype_keys=["cell_type"])
    model = sct.GeneTransformer.load_query_data(labelled, pretrained)
    assert model.phenotype_categories_ == {"cell_type": ["type_0", "type_1", "type_2"]}
    assert model.module.n_phenotypes == 1
    for k, v in pretrained.module.state_dict().items():
        torch.testing.assert_close(model.module.state_dict()[k], v)
    train_quietly(model, freeze="embeddings", max_epochs=30, lr=3e-3)
    torch.testing.assert_close(model.module.gene_embedding.weight, pretrained.module.gene_embedding.weight)
    predicted = model.predict()["cell_type"].astype(str).to_numpy()
    assert (predicted == labelled.obs["cell_type"].astype(str).to_numpy()).mean() > 0.8
    model.save(tmp_path / "fine")
    again = sct.GeneTransformer.load(tmp_path / "fine")
    assert again.temperatures_ == model.temperatures_
    pd.testing.assert_frame_equal(again.predict(labelled), model.predict(labelled))


def test_unseen_query_categories_warn_and_count_as_unknown(trained):
    model, _ = trained
    query = synthetic(seed=8, n_cells=40)
    query.obs["cell_type"] = query.obs["cell_type"].cat.rename_categories(["type_0", "type_1", "novel"])
    with pytest.warns(UserWarning, match=r"categories the reference does not know: \['novel'\]"):
        q = sct.GeneTransformer.load_query_data(query, model)
    novel = (query.obs["cell_type"] == "novel").to_numpy()
    assert (query.obs["_scvi_phenotype_cell_type"].to_numpy()[novel] == -1).all()
    assert set(q.predict(query)["cell_type"].cat.categories) == {"type_0", "type_1", "type_2"}
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*categories the reference does not know")  # said once
        warnings.filterwarnings("ignore", message="(?!.*categories the reference).*")
        q.train(max_epochs=1, batch_size=32, enable_progress_bar=False, logger=False)


def test_load_onto_cells_of_unseen_categories_warns_as_load_query_data_does(trained, tmp_path):
    model, _ = trained
    model.save(tmp_path / "m")
    query = synthetic(seed=8, n_cells=40)
    query.obs["cell_type"] = query.obs["cell_type"].cat.rename_categories(["type_0", "type_1", "novel"])
    with pytest.warns(UserWarning, match=r"categories the reference does not know: \['novel'\]"):
        sct.GeneTransformer.load(tmp_path / "m", adata=query)
    novel = (query.obs["cell_type"] == "novel").to_numpy()
    assert (query.obs["_scvi_phenotype_cell_type"].to_numpy()[novel] == -1).all()


def test_load_query_data_refuses_requested_phenotype_keys_the_query_lacks(trained):
    model, _ = trained
    query = synthetic(seed=10, n_cells=30)
    query.obs = query.obs.drop(columns="cell_type")
    # a reference key asked for explicitly must be there (not silently left unlabelled)
    with pytest.raises(ValueError, match=r"\['cell_type'\] not in adata\.obs.*available: \['batch'\]"):
        sct.GeneTransformer.load_query_data(query, model, phenotype_keys=["cell_type"])
    with pytest.raises(ValueError, match=r"\['cell_type', 'tissue'\] not in adata\.obs"):
        sct.GeneTransformer.load_query_data(query, model, phenotype_keys=["cell_type", "tissue"])
    assert "_scvi_phenotype_cell_type" not in query.obs  # refused before anything was registered
    # not asked for, the reference's key is unknown for every query cell (a query to annotate)
    q = sct.GeneTransformer.load_query_data(query, model)
    assert list(q.phenotype_categories_) == ["cell_type"]


def _training_target_logs(caplog) -> list:
    return [r for r in caplog.records if "are training targets" in r.getMessage()]


def test_load_query_data_takes_only_the_query_labels_it_is_given_and_says_when_they_would_leak(
    trained, caplog
):
    model, _ = trained
    query = synthetic(seed=14, n_cells=40)  # keeps its true labels, to score the predictions against
    # phenotype_keys=[]: none of the query's labels; the reference's key is still predicted
    kept = query.copy()
    with caplog.at_level("INFO", logger="sctransformer"):
        q = sct.GeneTransformer.load_query_data(kept, model, phenotype_keys=[])
    assert (q._registered_codes("cell_type") == -1).all() and "_scvi_phenotype_cell_type" not in kept.obs
    assert list(q.phenotype_categories_) == ["cell_type"]
    assert not _training_target_logs(caplog)
    # nor do training and its calibration read them from the column of that name
    train_quietly(q, max_epochs=1, freeze="backbone")
    assert q.temperatures_ == {} and not q.calibration_
    assert q.calibrate().empty and q.temperatures_ == {}  # its validation cells have no labels
    # by default the column named as the reference's key is a training target: a warning says so
    caplog.clear()
    with caplog.at_level("INFO", logger="sctransformer"):
        q = sct.GeneTransformer.load_query_data(query.copy(), model)
    assert (q._registered_codes("cell_type") >= 0).sum() == 40
    (record,) = _training_target_logs(caplog)
    assert record.levelname == "WARNING"
    assert "adata.obs['cell_type'] (40 labelled cells)" in record.getMessage()
    assert "phenotype_keys=[]" in record.getMessage()
    # asked for, they are trained on without a warning (logged as information)
    caplog.clear()
    with caplog.at_level("INFO", logger="sctransformer"):
        sct.GeneTransformer.load_query_data(query.copy(), model, phenotype_keys=["cell_type"])
    assert [r.levelname for r in _training_target_logs(caplog)] == ["INFO"]


def test_labels_left_out_of_training_may_change_after_an_earlier_setup_registered_them(trained):
    """A query first loaded with its labels, then with phenotype_keys=[]: editing them later is no change to refuse."""
    model, _ = trained
    query = synthetic(seed=15, n_cells=40)
    sct.GeneTransformer.load_query_data(query, model)  # the default: registers the labels (and their codes)
    q = sct.GeneTransformer.load_query_data(query, model, phenotype_keys=[])
    query.obs["cell_type"] = query.obs["cell_type"].cat.rename_categories(lambda c: f"{c}_coarse")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the dropped calibration: not what this test is about
        train_quietly(q, max_epochs=1, freeze="backbone")
    assert q.is_trained_


def test_labels_left_out_of_a_query_stay_out_when_it_is_saved_and_loaded_again(trained, tmp_path):
    model, _ = trained
    query = synthetic(seed=16, n_cells=40)  # keeps its true labels, to score the predictions against
    q = sct.GeneTransformer.load_query_data(query, model, phenotype_keys=[])
    q.save(tmp_path / "query_model")
    again = sct.GeneTransformer.load(tmp_path / "query_model", adata=query)
    assert not again._labels_registered("cell_type") and (again._registered_codes("cell_type") == -1).all()
    # also when saved again by a copy loaded without cells
    sct.GeneTransformer.load(tmp_path / "query_model").save(tmp_path / "resaved")
    again = sct.GeneTransformer.load(tmp_path / "resaved", adata=query.copy())
    assert not again._labels_registered("cell_type")
    # the reference, saved with its labels, still registers a query's labels when loaded onto it
    model.save(tmp_path / "reference")
    labelled = sct.GeneTransformer.load(tmp_path / "reference", adata=synthetic(seed=17, n_cells=40))
    assert (labelled._registered_codes("cell_type") >= 0).all()


def test_training_a_query_without_labels_warns_that_the_reference_calibration_is_dropped(trained):
    model, _ = trained
    assert model.temperatures_  # fitted on the validation cells
    query = synthetic(seed=12, n_cells=60)
    query.obs = query.obs.drop(columns="cell_type")
    q = sct.GeneTransformer.load_query_data(query, model)
    assert q.temperatures_ == model.temperatures_
    with pytest.warns(
        UserWarning,
        match=r"temperatures of \['cell_type'\].*no labels of them.*uncalibrated confidences.*"
        r"model\.calibrate\(labelled_adata\)",
    ):
        q.train(max_epochs=1, batch_size=32, freeze="backbone", **QUIET)
    assert q.temperatures_ == {}
    q.calibrate(synthetic(seed=13, n_cells=60))  # the fix it names
    assert set(q.temperatures_) == {"cell_type"}


def test_load_query_data_refuses_too_few_genes_and_bad_references(trained, tmp_path):
    model, _ = trained
    query = synthetic(seed=9, n_cells=30)
    query.var_names = [f"g{i}" if i < 40 else name for i, name in enumerate(query.var_names)]
    with pytest.raises(ValueError, match=r"shares 20 genes .*min_gene_overlap=0.5"):
        sct.GeneTransformer.load_query_data(query, model)
    assert (
        sct.GeneTransformer.load_query_data(query, model, min_gene_overlap=0.3).gene_coverage_["n_shared"]
        == 20
    )
    with pytest.raises(ValueError, match="min_gene_overlap"):
        sct.GeneTransformer.load_query_data(query, model, min_gene_overlap=1.5)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a saved sctransformer model"):
        sct.GeneTransformer.load_query_data(query, tmp_path / "empty")
    model.save(tmp_path / "m")
    state = json.loads((tmp_path / "m" / "model.json").read_text())
    state["format_version"] = 99
    state["sctransformer_version"] = "9.0"
    (tmp_path / "m" / "model.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match=r"format 99 by sctransformer 9\.0"):
        sct.GeneTransformer.load_query_data(query, tmp_path / "m")
    with pytest.raises(TypeError, match="model directory or a GeneTransformer"):
        sct.GeneTransformer.load_query_data(query, 3)


def test_token_plus_mean_phenotype_input_trains_and_round_trips(adata, tmp_path):
    sct.setup_anndata(adata, layer="counts", phenotype_keys=["cell_type"])
    model = sct.GeneTransformer(adata, **TINY, phenotype_input="token+mean")
    train_quietly(model)
    model.save(tmp_path / "m")
    again = sct.GeneTransformer.load(tmp_path / "m")
    pd.testing.assert_frame_equal(again.predict(adata), model.predict(adata))


def test_a_query_matching_a_models_older_label_spelling_is_not_warned_about(tmp_path):
    data = synthetic(seed=11, n_cells=60)
    data.obs["dose"] = pd.Categorical(np.where(np.arange(60) % 2, 0.1, 0.5).astype(np.float32))
    sct.setup_anndata(data, layer="counts", phenotype_keys=["dose"])
    sct.GeneTransformer(data, **TINY).save(tmp_path / "m")
    # a model saved before the one naming rule: float32 labels spelt as Python floats
    state = json.loads((tmp_path / "m" / "model.json").read_text())
    state["phenotype_categories"]["dose"] = [str(float(np.float32(v))) for v in (0.1, 0.5)]
    (tmp_path / "m" / "model.json").write_text(json.dumps(state))
    query = data.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "categories the reference does not know"
        q = sct.GeneTransformer.load_query_data(query, tmp_path / "m")
        loaded = sct.GeneTransformer.load(tmp_path / "m", adata=query.copy())
    assert (q.adata_manager.get_from_registry("phenotype:dose").ravel() >= 0).all()
    assert (loaded.adata_manager.get_from_registry("phenotype:dose").ravel() >= 0).all()


def test_a_query_without_the_models_layer_is_told_how_to_fill_it(trained, tmp_path):
    model, _ = trained
    model.save(tmp_path / "ref")
    query = synthetic(seed=4, n_cells=40)
    query.layers["raw"] = query.layers.pop("counts")
    fix = "adata.layers['counts'] = adata.layers['raw']"
    for load in (
        lambda: sct.GeneTransformer.load(tmp_path / "ref", adata=query.copy()),
        lambda: sct.GeneTransformer.load_query_data(query.copy(), tmp_path / "ref"),
    ):
        with pytest.raises(KeyError) as err:  # neither takes layer=
            load()
        assert fix in str(err.value) and "layer=" not in str(err.value), err.value
    with pytest.raises(KeyError, match="layer=None"):  # setup_anndata does take it
        sct.setup_anndata(query.copy(), layer="counts")

    plain = synthetic(seed=5, n_cells=40)
    plain.X = plain.layers["counts"].copy()
    sct.setup_anndata(plain)  # counts in X
    sct.GeneTransformer(plain, **TINY).save(tmp_path / "x")
    query.X = None
    with pytest.raises(ValueError, match=r"adata.X = adata.layers\['raw'\]"):
        sct.GeneTransformer.load(tmp_path / "x", adata=query)
