"""CLIP-style alignment with a second modality: the loss, the retrieval metric, training and bad input."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

import sctransformer as sct
from sctransformer.metrics import retrieval_ranks
from sctransformer.module import symmetric_info_nce

from ..conftest import QUIET, TINY, fingerprint


def test_symmetric_info_nce_matches_a_naive_loop():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 4)), rng.normal(size=(6, 4))
    scale = 2.3

    def naive(x, y):
        total = 0.0
        for i in range(len(x)):
            sims = [
                scale * np.dot(x[i], y[j]) / np.linalg.norm(x[i]) / np.linalg.norm(y[j])
                for j in range(len(y))
            ]
            total += -(sims[i] - math.log(sum(math.exp(s) for s in sims)))
        return total / len(x)

    expected = 0.5 * (naive(a, b) + naive(b, a))
    got = symmetric_info_nce(torch.as_tensor(a), torch.as_tensor(b), torch.tensor(math.log(scale)))
    assert abs(float(got) - expected) < 1e-5


def test_retrieval_ranks_match_a_naive_loop():
    rng = np.random.default_rng(1)
    q, t = rng.normal(size=(30, 5)), rng.normal(size=(30, 5))
    cos = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (t / np.linalg.norm(t, axis=1, keepdims=True)).T
    naive = [sum(cos[i, j] >= cos[i, i] for j in range(30)) for i in range(30)]
    np.testing.assert_array_equal(retrieval_ranks(q, t, chunk_size=7), naive)
    collapsed = np.ones((10, 3))  # every target ties with the partner: ranks are the worst, not the best
    np.testing.assert_array_equal(retrieval_ranks(collapsed, collapsed), np.full(10, 10))


def _paired(seed: int = 0):
    """Counts with cell types, and a second modality: a noisy per-cell function of the same counts."""
    adata = sct.datasets.synthetic(n_cells=200, n_genes=60, n_cell_types=4, n_markers=8, seed=seed)
    x = np.log1p(adata.layers["counts"].toarray())
    rng = np.random.default_rng(seed)
    adata.obsm["X_protein"] = (x @ rng.normal(size=(60, 12)) + 0.1 * rng.normal(size=(200, 12))).astype(
        np.float32
    )
    return adata


def test_alignment_trains_retrieves_partners_above_the_shuffled_control_and_writes_both_sides(tmp_path):
    adata = _paired()
    sct.setup_anndata(adata, layer="counts")
    model = sct.GeneTransformer(adata, **TINY, align_obsm="X_protein", align_dim=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(max_epochs=15, batch_size=32, **QUIET)
    assert "alignment_train" in model.history
    sct.tl.embed(adata, model, space="aligned", key_added="X_sct_aligned")
    sct.tl.embed(adata, model, space="aligned_other", key_added="X_protein_aligned")
    assert adata.uns["sct"]["X_sct_aligned"]["params"]["space"] == "aligned"
    assert adata.obsm["X_sct_aligned"].shape == adata.obsm["X_protein_aligned"].shape == (200, 8)
    np.testing.assert_allclose(np.linalg.norm(adata.obsm["X_sct_aligned"], axis=1), 1, atol=1e-5)
    scores = sct.metrics.cross_modal_retrieval(adata, "X_sct_aligned", "X_protein_aligned", k=(1, 10))
    assert scores.loc["a -> b", "recall@10"] > 3 * scores.loc["a -> b, shuffled pairs", "recall@10"]
    assert scores.loc["b -> a", "mean rank"] < scores.loc["b -> a, shuffled pairs", "mean rank"] / 2
    model.save(tmp_path / "m")
    loaded = sct.GeneTransformer.load(tmp_path / "m", adata=adata)
    np.testing.assert_allclose(
        loaded.get_latent_representation(space="aligned_other"), adata.obsm["X_protein_aligned"]
    )


def test_freezing_one_side_of_the_alignment_keeps_it(adata):
    adata.obsm["X_other"] = np.random.default_rng(0).normal(size=(adata.n_obs, 5)).astype(np.float32)
    sct.setup_anndata(adata, layer="counts")
    model = sct.GeneTransformer(adata, **TINY, align_obsm="X_other", align_dim=4)
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(max_epochs=1, batch_size=32, freeze="transcriptome", **QUIET)
    after = {k: v.clone() for k, v in model.module.state_dict().items()}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("align_other", "align_logit_scale")) for k in changed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(max_epochs=1, batch_size=32, freeze="other", **QUIET)
    kept = model.module.state_dict()
    assert all(torch.equal(after[k], kept[k]) for k in after if k.startswith("align_other"))
    assert not torch.equal(after["align_transcriptome.weight"], kept["align_transcriptome.weight"])


def test_bad_alignment_input_is_refused_with_the_fix(adata):
    sct.setup_anndata(adata, layer="counts")
    with pytest.raises(KeyError, match="X_missing"):
        sct.GeneTransformer(adata, **TINY, align_obsm="X_missing")
    adata.obsm["X_nan"] = np.full((adata.n_obs, 3), np.nan)
    with pytest.raises(ValueError, match="NaN"):
        sct.GeneTransformer(adata, **TINY, align_obsm="X_nan")
    adata.obsm["X_ok"] = np.zeros((adata.n_obs, 3))
    with pytest.raises(ValueError, match="align_dim"):
        sct.GeneTransformer(adata, **TINY, align_obsm="X_ok", align_dim=0)
    model = sct.GeneTransformer(adata, **TINY)
    with pytest.raises(ValueError, match="align_obsm"):
        model.get_latent_representation(space="aligned")
    with pytest.raises(ValueError, match="no align_obsm"):
        model.train(freeze="transcriptome")
    aligned = sct.GeneTransformer(adata, **TINY, align_obsm="X_ok", align_dim=2)
    wrong = adata.copy()
    wrong.obsm["X_ok"] = np.zeros((adata.n_obs, 4))
    with pytest.raises(ValueError, match="has 4 features"):
        aligned.get_latent_representation(wrong, space="aligned_other")


def test_a_query_whose_second_modality_has_another_width_is_refused_before_setup(adata, tmp_path):
    adata.obsm["X_other"] = np.zeros((adata.n_obs, 3), dtype=np.float32)
    sct.setup_anndata(adata, layer="counts")
    sct.GeneTransformer(adata, **TINY, align_obsm="X_other", align_dim=2).save(tmp_path / "model")
    query = adata.copy()
    query.obs = query.obs[[]]
    query.obsm["X_other"] = np.zeros((adata.n_obs, 4), dtype=np.float32)
    for load in (
        lambda: sct.GeneTransformer.load_query_data(query, tmp_path / "model"),
        lambda: sct.GeneTransformer.load(tmp_path / "model", adata=query),
    ):
        with pytest.raises(ValueError, match="has 4 features; the model was trained on 3"):
            load()  # not later, deep in training
        assert not any(c.startswith("_scvi") for c in query.obs)  # refused before the setup


def test_a_plain_model_made_after_an_aligned_one_on_the_same_cells_has_no_second_modality(adata, tmp_path):
    adata.obsm["X_other"] = np.random.default_rng(0).normal(size=(adata.n_obs, 5)).astype(np.float32)
    sct.setup_anndata(adata, layer="counts")
    sct.GeneTransformer(adata, **TINY, align_obsm="X_other", align_dim=4)  # sets adata up again
    plain = sct.GeneTransformer(adata, **TINY)
    assert plain.setup_args_["align_obsm"] is None and plain.module.align_dims is None
    plain.save(tmp_path / "plain")
    query = sct.datasets.synthetic(n_cells=40, n_genes=60, n_cell_types=3, n_markers=8, seed=1)
    query.obsm["X_other"] = np.zeros((40, 5), dtype=np.float32)
    for loaded in (  # were refused: "has 5 features; the model was trained on None"
        sct.GeneTransformer.load(tmp_path / "plain", adata=adata),
        sct.GeneTransformer.load_query_data(query, tmp_path / "plain"),
    ):
        assert loaded.setup_args_["align_obsm"] is None
    np.testing.assert_allclose(
        sct.GeneTransformer.load(tmp_path / "plain", adata=adata).get_latent_representation(),
        plain.get_latent_representation(),
        rtol=1e-5,
        atol=1e-6,
    )
    # saved before the fix, a plain model recorded the key of the AnnData's setup: it loads too
    state = json.loads((tmp_path / "plain" / "model.json").read_text())
    state["setup_args"]["align_obsm"] = "X_other"
    (tmp_path / "plain" / "model.json").write_text(json.dumps(state))
    assert sct.GeneTransformer.load(tmp_path / "plain", adata=adata).module.align_dims is None


@pytest.mark.parametrize("change", ["a NaN row", "another width"])
def test_training_checks_the_second_modality_again_before_it_starts(adata, change):
    adata.obsm["X_other"] = np.random.default_rng(0).normal(size=(adata.n_obs, 5)).astype(np.float32)
    sct.setup_anndata(adata, layer="counts")
    model = sct.GeneTransformer(adata, **TINY, align_obsm="X_other", align_dim=4)
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    if change == "a NaN row":  # changed after the model was made, e.g. a panel read again
        adata.obsm["X_other"][5] = np.nan
        error, message = ValueError, r"adata.obsm\['X_other'\] holds NaN"
    else:
        adata.obsm["X_other"] = np.zeros((adata.n_obs, 7), dtype=np.float32)
        error, message = ValueError, "has 7 features; the model was trained on 5"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(error, match=message):  # not a non-finite loss or a shape error mid-run
            model.train(max_epochs=1, batch_size=32, **QUIET)
    assert not model.is_trained
    assert all(torch.equal(v, before[k]) for k, v in model.module.state_dict().items())


def test_an_aligned_model_loads_onto_cells_set_up_by_setup_anndata_without_a_warning(adata, tmp_path):
    from sctransformer._constants import REGISTRY_KEYS

    adata.obsm["X_other"] = np.random.default_rng(0).normal(size=(adata.n_obs, 5)).astype(np.float32)
    sct.setup_anndata(adata, layer="counts")
    sct.GeneTransformer(adata, **TINY, align_obsm="X_other", align_dim=4).save(tmp_path / "m")
    cells = sct.datasets.synthetic(n_cells=40, n_genes=60, n_cell_types=3, n_markers=8, seed=1)
    cells.obsm["X_other"] = np.zeros((40, 5), dtype=np.float32)
    sct.setup_anndata(cells, layer="counts")  # the documented setup: it has no align_obsm
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        loaded = sct.GeneTransformer.load(tmp_path / "m", adata=cells)
    assert not [w for w in record if "other settings" in str(w.message)]
    assert REGISTRY_KEYS.ALIGN_KEY in loaded.adata_manager.data_registry  # training aligns
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded.train(max_epochs=1, batch_size=32, **QUIET)
    assert "alignment_train" in loaded.history


def test_an_aligned_model_loads_without_cells_and_embeds_as_before(adata, tmp_path):
    adata.obsm["X_other"] = np.random.default_rng(0).normal(size=(adata.n_obs, 5)).astype(np.float32)
    sct.setup_anndata(adata, layer="counts")
    model = sct.GeneTransformer(adata, **TINY, align_obsm="X_other", align_dim=4)
    model.save(tmp_path / "m")
    loaded = sct.GeneTransformer.load(tmp_path / "m")  # for inference only, as the CLI loads it
    np.testing.assert_array_equal(loaded.get_latent_representation(adata), model.get_latent_representation())


def test_a_refused_aligned_model_leaves_adata_as_it_was_and_a_plain_model_needs_no_second_modality(adata):
    adata.obsm["X_other"] = np.random.default_rng(0).normal(size=(adata.n_obs, 5)).astype(np.float32)
    sct.setup_anndata(adata, layer="counts")
    before, manager = fingerprint(adata), adata.uns["_scvi_manager_uuid"]
    with pytest.raises(ValueError, match="needs at least 2 batches"):  # no batch key was set up
        sct.GeneTransformer(adata, **TINY, align_obsm="X_other", batch_correction="token")
    assert fingerprint(adata) == before and adata.uns["_scvi_manager_uuid"] == manager  # not registered again
    aligned = sct.GeneTransformer(adata, **TINY, align_obsm="X_other", align_dim=4)
    plain = sct.GeneTransformer(adata, **TINY)  # made after an aligned model on the same cells
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        aligned.train(max_epochs=1, batch_size=32, **QUIET)
        del adata.obsm["X_other"]
        plain.train(max_epochs=1, batch_size=32, **QUIET)
    assert "alignment_train" in aligned.history and "alignment_train" not in plain.history


def test_a_second_modality_without_features_is_refused():
    adata = _paired()
    adata.obsm["X_empty"] = np.zeros((adata.n_obs, 0), dtype=np.float32)
    sct.setup_anndata(adata, layer="counts")
    with pytest.raises(ValueError, match="at least one feature, got shape \\(200, 0\\)"):
        sct.GeneTransformer(adata, **TINY, align_obsm="X_empty")


def test_freezing_the_backbone_trains_both_projections_and_the_alignment_temperature():
    adata = _paired()
    sct.setup_anndata(adata, layer="counts")
    model = sct.GeneTransformer(adata, **TINY, align_obsm="X_protein", align_dim=8)
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(max_epochs=2, batch_size=32, freeze="backbone", **QUIET)
    after = model.module.state_dict()
    for name in ("align_logit_scale", "align_transcriptome.weight", "align_other.0.weight"):
        assert not torch.equal(after[name], before[name]), name
    assert torch.equal(after["blocks.0.attention.qkv.weight"], before["blocks.0.attention.qkv.weight"])


def test_training_only_the_other_side_keeps_the_phenotype_calibration_of_a_query(tmp_path):
    adata = _paired()
    sct.setup_anndata(adata, layer="counts", phenotype_keys=["cell_type"])
    model = sct.GeneTransformer(adata, **TINY, align_obsm="X_protein", align_dim=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(max_epochs=2, batch_size=32, **QUIET)
    assert model.temperatures_
    model.save(tmp_path / "m")
    query = _paired(seed=1)
    query = sct.GeneTransformer.load_query_data(query, tmp_path / "m", phenotype_keys=[])  # unlabelled
    before = query.predict()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        query.train(max_epochs=1, batch_size=32, freeze="transcriptome", **QUIET)
    assert not [w for w in record if "dropped" in str(w.message)]
    assert query.temperatures_ == model.temperatures_
    assert query.calibration_["cell_type"] == model.calibration_["cell_type"]
    pd.testing.assert_frame_equal(query.predict(), before)  # the same calibrated confidences


def test_loading_onto_cells_set_up_with_another_models_second_modality_sets_them_up_again(tmp_path):
    from sctransformer._constants import SETUP_ARGS

    adata = _paired()
    adata.obsm["X_other"] = adata.obsm["X_protein"][:, :5].copy()
    sct.setup_anndata(adata, layer="counts")
    sct.GeneTransformer(adata, **TINY, align_obsm="X_other", align_dim=4).save(tmp_path / "m")
    cells = _paired(seed=1)  # set up by a model of another modality; no X_other
    sct.setup_anndata(cells, layer="counts")
    sct.GeneTransformer(cells, **TINY, align_obsm="X_protein", align_dim=4)
    loaded = sct.GeneTransformer.load(tmp_path / "m", adata=cells)
    assert loaded.adata_manager.registry["setup_args"].get(SETUP_ARGS.ALIGN_OBSM) is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded.train(max_epochs=1, batch_size=32, **QUIET)  # without alignment, as a query lacking it
    assert "alignment_train" not in loaded.history


def test_the_other_side_is_mapped_in_minibatches_of_batch_size(monkeypatch):
    adata = _paired()
    sct.setup_anndata(adata, layer="counts")
    model = sct.GeneTransformer(adata, **TINY, align_obsm="X_protein", align_dim=8)
    whole = model.get_latent_representation(space="aligned_other")
    rows = []
    forward = model.module.aligned_other
    monkeypatch.setattr(model.module, "aligned_other", lambda x: rows.append(len(x)) or forward(x))
    np.testing.assert_allclose(
        model.get_latent_representation(space="aligned_other", batch_size=64), whole, atol=1e-6
    )
    assert rows == [64, 64, 64, 8]
    with pytest.raises(ValueError, match="batch_size"):
        model.get_latent_representation(space="aligned_other", batch_size=0)
    with pytest.raises(ValueError, match="no \\[BATCH\\] token; leave batch=None"):
        model.get_latent_representation(space="aligned_other", batch="own")
