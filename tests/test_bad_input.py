"""Catalogue of malformed inputs across the public entry points.

Each raises a ValueError / TypeError / KeyError (or a documented warning) that names the problem
and the fix, before any long computation, and a failed setup leaves the AnnData unchanged.
"""

from __future__ import annotations

import json
import logging
import warnings

import matplotlib

matplotlib.use("Agg")

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import sctransformer as sct

from .conftest import QUIET, TINY, fingerprint


def _set_layer(value_fn):
    return lambda a: a.layers.__setitem__("counts", value_fn(a.layers["counts"]))


def _set_obs(key, value_fn):
    return lambda a: a.obs.__setitem__(key, value_fn(a))


def _int8_overflow(x):
    dense = x.toarray()
    dense[0, 0] = 200
    return dense.astype(np.int16).astype(np.int8)  # 200 wraps to -56


SETUP_CASES = {
    "non-integer counts": (_set_layer(lambda x: x * 0.5), {}, ValueError, "non-integer"),
    "negative counts": (
        _set_layer(lambda x: x - 2 * sp.eye(x.shape[0], x.shape[1], format="csr")),
        {},
        ValueError,
        "negative",
    ),
    "NaN counts": (
        _set_layer(lambda x: sp.csr_matrix(np.where(np.eye(*x.shape) > 0, np.nan, x.toarray()))),
        {},
        ValueError,
        "NaN",
    ),
    "inf counts": (
        _set_layer(lambda x: sp.csr_matrix(np.where(np.eye(*x.shape) > 0, np.inf, x.toarray()))),
        {},
        ValueError,
        "infinite",
    ),
    "int8 overflow": (_set_layer(_int8_overflow), {}, ValueError, "negative"),
    "beyond float32": (
        _set_layer(
            lambda x: sp.csr_matrix(np.where(np.eye(*x.shape) > 0, 1e300, x.toarray().astype(np.float64)))
        ),
        {},
        ValueError,
        "too large for float32",
    ),
    "complex": (_set_layer(lambda x: x.toarray().astype(np.complex64)), {}, TypeError, "complex numbers"),
    "phenotype of lists": (
        _set_obs("cell_type", lambda a: pd.Series([["a"]] * a.n_obs, index=a.obs_names, dtype=object)),
        {"phenotype_keys": ["cell_type"]},
        TypeError,
        "values that are not labels",
    ),
    "batch of lists": (
        _set_obs("batch", lambda a: pd.Series([[1, 2]] * a.n_obs, index=a.obs_names, dtype=object)),
        {"batch_key": "batch"},
        TypeError,
        "values that are not labels",
    ),
    "strings": (_set_layer(lambda x: x.toarray().astype(str).astype(object)), {}, TypeError, "numeric"),
    "booleans": (_set_layer(lambda x: x > 0), {}, TypeError, "booleans"),
    "float16": (_set_layer(lambda x: x.toarray().astype(np.float16)), {}, TypeError, "float16"),
    "missing layer": (lambda a: None, {"layer": "raw_counts"}, KeyError, "raw_counts"),
    "missing batch key": (lambda a: None, {"batch_key": "donor"}, KeyError, "donor"),
    "missing phenotype key": (lambda a: None, {"phenotype_keys": ["tissue"]}, KeyError, "tissue"),
    "missing gene key": (lambda a: None, {"gene_key": "ensembl"}, KeyError, "ensembl"),
    "gene key with NaN": (
        lambda a: a.var.__setitem__("ensembl", [np.nan] + [f"E{i}" for i in range(1, a.n_vars)]),
        {"gene_key": "ensembl"},
        ValueError,
        "missing gene identifiers",
    ),
    "duplicate genes": (
        lambda a: setattr(a, "var_names", ["g0"] * 2 + list(a.var_names[2:])),
        {},
        ValueError,
        "duplicate gene",
    ),
    "duplicate genes in gene_key": (
        lambda a: a.var.__setitem__("symbol", ["g0"] * 2 + list(a.var_names[2:])),
        {"gene_key": "symbol"},
        ValueError,
        r"adata\.var\['symbol'\] has duplicate gene identifiers.*~adata\.var\['symbol'\]\.duplicated\(\)",
    ),
    "phenotype all NaN": (
        _set_obs("cell_type", lambda a: np.nan),
        {"phenotype_keys": ["cell_type"]},
        ValueError,
        "no known value",
    ),
    "phenotype continuous": (
        _set_obs("size", lambda a: np.random.default_rng(0).normal(size=a.n_obs)),
        {"phenotype_keys": ["size"]},
        ValueError,
        "looks continuous",
    ),
    "phenotype of per-cell integers": (
        _set_obs("n_genes", lambda a: np.arange(a.n_obs) * 3),
        {"phenotype_keys": ["n_genes"]},
        ValueError,
        r"looks like a count or an index .*\.astype\('category'\)",
    ),
    "batch with NaN": (
        _set_obs("batch", lambda a: pd.Categorical([np.nan] + ["b"] * (a.n_obs - 1))),
        {"batch_key": "batch"},
        ValueError,
        "missing values",
    ),
    "batch also a phenotype": (
        lambda a: None,
        {"batch_key": "batch", "phenotype_keys": ["batch"]},
        ValueError,
        "both batch_key",
    ),
    "phenotype key not a string": (
        _set_obs(1, lambda a: a.obs["cell_type"].to_numpy()),  # saved as "1", which no column is named
        {"phenotype_keys": [1]},
        TypeError,
        r"phenotype_keys must name by strings .*got \[1\]; .*adata\.obs\.columns\.astype\(str\)",
    ),
    "batch key not a string": (
        _set_obs(0, lambda a: "b"),
        {"batch_key": 0},
        TypeError,
        r"batch_key must name by strings",
    ),
    "duplicate phenotype keys": (
        lambda a: None,
        {"phenotype_keys": ["cell_type", "cell_type"]},
        ValueError,
        "duplicates",
    ),
}


@pytest.mark.parametrize("case", list(SETUP_CASES))
def test_setup_refuses_bad_input_and_leaves_adata_unchanged(adata, case):
    corrupt, kwargs, error, message = SETUP_CASES[case]
    corrupt(adata)
    before = fingerprint(adata)
    with pytest.raises(error, match=message):
        sct.setup_anndata(adata, **{"layer": "counts", **kwargs})
    assert fingerprint(adata) == before


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda a: a[:0].copy(), ValueError, "zero cells"),
        (lambda a: a[:, :0].copy(), ValueError, "zero genes"),
        (lambda a: a[:50], ValueError, r"adata\.copy\(\)"),
        (lambda a: a.layers["counts"], TypeError, "must be an AnnData"),
    ],
    ids=["zero cells", "zero genes", "a view", "not an AnnData"],
)
def test_setup_refuses_empty_views_and_non_anndata(adata, make, error, message):
    with pytest.raises(error, match=message):
        sct.setup_anndata(make(adata), layer="counts")


def test_a_backed_file_with_column_major_counts_is_refused_with_the_rewrite(adata, tmp_path):
    adata.X = sp.csc_matrix(adata.layers.pop("counts"))
    adata.write_h5ad(tmp_path / "csc.h5ad")
    backed = ad.read_h5ad(tmp_path / "csc.h5ad", backed="r")
    with pytest.raises(ValueError, match=r"stored column-major \(CSC\) in the backed file.*tocsr\(\)"):
        sct.setup_anndata(backed)
    assert "_scvi_uuid" not in backed.uns


def test_documented_warnings_single_category_and_empty_cells(adata):
    adata.obs["tissue"] = "blood"
    x = adata.layers["counts"].tolil()
    x[0] = 0
    adata.layers["counts"] = x.tocsr()
    with pytest.warns(UserWarning) as record:
        sct.setup_anndata(adata, layer="counts", phenotype_keys=["tissue"])
    messages = " ".join(str(w.message) for w in record)
    assert "single category" in messages and "1 cells have no counts" in messages


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"d_model": 30, "n_heads": 4}, "must divide"),
        ({"d_model": 64.0}, "d_model must be an integer"),
        ({"n_layers": 0}, "n_layers"),
        ({"max_length": 0}, "max_length"),
        ({"n_bins": 1}, "n_bins"),
        ({"dropout": 1.0}, "dropout"),
        ({"label_smoothing": -0.1}, "label_smoothing"),
        ({"expression_queries": -1}, "expression_queries"),
        ({"expression_queries": 61}, r"expression_queries=61 exceeds the 60 genes of the vocabulary"),
        ({"value_encoding": "log"}, "value_encoding"),
        ({"binning": "uniform"}, "binning"),
        ({"seed": 2**64}, r"seed must be an integer >= 0 and < 2\*\*32"),  # was an overflow after sampling
        ({"dropout": "0.1"}, r"dropout must be a number in \[0, 1\), got '0.1'"),  # was a raw TypeError
        ({"label_smoothing": None}, r"label_smoothing must be a number in \[0, 1\), got None"),
    ],
)
def test_model_hyperparameters_out_of_range_are_refused(adata, kwargs, message):
    sct.setup_anndata(adata, layer="counts")
    with pytest.raises(ValueError, match=message):
        sct.GeneTransformer(adata, **kwargs)


def test_model_on_an_adata_that_is_not_set_up(adata):
    with pytest.raises(ValueError, match="setup_anndata"):
        sct.GeneTransformer(adata)


def test_model_on_a_subset_copied_after_setup_says_to_set_it_up_again(adata):
    sct.setup_anndata(adata, layer="counts")
    subset = adata[adata.obs["batch"] == adata.obs["batch"].iloc[0]].copy()  # e.g. QC after setup
    with pytest.raises(
        ValueError,
        match=r"not set up for sctransformer.*a subset or copy made after setup_anndata.*setup_anndata\(adata, \.\.\.\) on it",
    ):
        sct.GeneTransformer(subset, **TINY)
    sct.setup_anndata(subset, layer="counts")  # the fix works
    sct.GeneTransformer(subset, **TINY)


@pytest.fixture(scope="module")
def x_model(tmp_path_factory):
    """An untrained model that reads counts from ``adata.X`` and genes from ``adata.var_names``, saved."""
    data = sct.datasets.synthetic(n_cells=40, n_genes=60, n_cell_types=3, n_markers=8, seed=0)
    data.X = data.layers.pop("counts")
    sct.setup_anndata(data, phenotype_keys=["cell_type"])
    path = tmp_path_factory.mktemp("x_model") / "m"
    model = sct.GeneTransformer(data, **TINY)
    model.save(path)
    return model, path


def _normalised_x(query):  # the usual shape: X normalised, counts in a layer
    query.X = query.layers["counts"].astype(np.float32) * 0.5


def _ids_in_a_var_column(query):
    query.var["symbol"] = query.var_names
    query.var_names = [f"ENSG{i:011d}" for i in range(query.n_vars)]


def _duplicated_var_names(query):  # e.g. read_10x_mtx without make_unique
    query.var_names = ["gene_0", *query.var_names[:-1]]


@pytest.mark.parametrize(
    ("corrupt", "fix"),
    [
        (_normalised_x, "adata.X = adata.layers['counts']"),
        (_ids_in_a_var_column, "adata.var_names = adata.var['symbol'].astype(str)"),
        (_duplicated_var_names, "adata.var_names_make_unique()"),
    ],
    ids=["normalised X", "gene ids in a .var column", "duplicated var_names"],
)
@pytest.mark.parametrize("entry", ["tl.embed", "tl.predict", "load", "load_query_data"])
def test_inference_and_loading_say_how_to_meet_the_models_settings_not_to_pass_them(
    x_model, entry, corrupt, fix
):
    model, path = x_model
    query = sct.datasets.synthetic(n_cells=20, n_genes=60, n_cell_types=3, n_markers=8, seed=1)
    query.X = query.layers["counts"].copy()
    corrupt(query)
    calls = {
        "tl.embed": lambda: sct.tl.embed(query, model),
        "tl.predict": lambda: sct.tl.predict(query, model),
        "load": lambda: sct.GeneTransformer.load(path, adata=query),
        "load_query_data": lambda: sct.GeneTransformer.load_query_data(query, path),
    }
    with warnings.catch_warnings(), pytest.raises(ValueError) as err:
        warnings.simplefilter("ignore")  # anndata's about duplicated names
        calls[entry]()
    message = str(err.value)
    # none of these takes layer= or gene_key=: the message says what to change in adata instead
    assert fix in message and "layer=" not in message and "gene_key=" not in message, message
    if corrupt is not _ids_in_a_var_column:  # setup_anndata does take them, and still says so
        with warnings.catch_warnings(), pytest.raises(ValueError, match=r"layer=|gene_key="):
            warnings.simplefilter("ignore")
            sct.setup_anndata(query)


def test_inference_words_a_gene_fix_only_when_it_says_one_and_reads_var_with_repeated_columns(
    x_model, monkeypatch
):
    """The fix is worked out only for an error or warning (it scans .var); a .var column name twice is no matter."""
    model, _ = x_model
    query = sct.datasets.synthetic(n_cells=20, n_genes=60, n_cell_types=3, n_markers=8, seed=1)
    query.X = query.layers["counts"].copy()
    query.var = pd.concat([query.var, pd.DataFrame({"s": "x", "t": "y"}, index=query.var_names)], axis=1)
    query.var.columns = [*query.var.columns[:-2], "symbol", "symbol"]
    from sctransformer.data import _validation

    def unwanted(*args, **kwargs):
        raise AssertionError("the fix was worked out though nothing is wrong")

    monkeypatch.setattr(_validation, "model_gene_fix", unwanted)
    monkeypatch.setattr(sct.model._gene_transformer, "model_gene_fix", unwanted)
    assert model.get_latent_representation(query).shape[0] == 20


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": -1.0}, "lr"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"warmup_fraction": 1.0}, "warmup_fraction"),
        ({"gene_mask_prob": 1.0}, "gene_mask_prob"),
        ({"phenotype_mask_prob": -0.1}, "phenotype_mask_prob"),
        ({"max_epochs": 0}, "max_epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"train_size": 0.0}, "train_size"),
        ({"class_weight": "auto"}, "class_weight"),
        ({"focal_gamma": -1.0}, "focal_gamma"),
        ({"freeze": "decoder"}, "freeze"),
        ({"deterministic": "yes"}, "deterministic"),
        ({"precision": "16-true"}, "precision must be one of"),
        ({"precision": "transformer-engine"}, "precision must be one of"),
        (
            {"warmup_fraction": None},
            "warmup_fraction must be a finite number, got None",
        ),  # was a bare TypeError
        ({"gene_mask_prob": "0.15"}, "gene_mask_prob must be a finite number"),
        ({"phenotype_mask_prob": None}, "phenotype_mask_prob must be a finite number"),
        ({"train_size": "0.9"}, "train_size must be a finite number"),
        ({"focal_gamma": True}, "focal_gamma must be a finite number"),
        ({"accumulate_grad_batches": 0}, "accumulate_grad_batches must be a positive integer"),  # was 1/0
    ],
)
def test_training_options_out_of_range_are_refused(adata, kwargs, message):
    sct.setup_anndata(adata, layer="counts", phenotype_keys=["cell_type"])
    model = sct.GeneTransformer(adata, **TINY)
    with pytest.raises(ValueError, match=message):
        model.train(**kwargs)
    assert not model.is_trained


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize(
    "name", ["lr", "weight_decay", "adversary_weight", "adversary_lr_factor", "align_weight"]
)
def test_non_finite_training_options_are_refused_before_touching_the_weights(adata, name, value):
    sct.setup_anndata(adata, layer="counts", phenotype_keys=["cell_type"])
    model = sct.GeneTransformer(adata, **TINY)
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    with pytest.raises(ValueError, match=f"{name} must be a finite number"):
        model.train(max_epochs=1, **QUIET, **{name: value})
    assert not model.is_trained
    for key, tensor in model.module.state_dict().items():
        assert torch.equal(tensor, before[key]), key


def test_adata_whose_shape_changed_after_setup(adata):
    sct.setup_anndata(adata, layer="counts")
    model = sct.GeneTransformer(adata, **TINY)
    model.adata._inplace_subset_obs(np.arange(100))
    with pytest.raises(ValueError, match="changed shape"):
        model.train(max_epochs=1)


def test_phenotype_column_changed_after_setup(adata):
    sct.setup_anndata(adata, layer="counts", phenotype_keys=["cell_type"])
    model = sct.GeneTransformer(adata, **TINY)
    adata.obs["cell_type"] = adata.obs["cell_type"].cat.rename_categories(["a", "b", "c"])
    with pytest.raises(ValueError, match=r"obs\['cell_type'\] changed since setup_anndata"):
        model.train(max_epochs=1)


def test_cells_labelled_after_setup_with_a_new_category_are_refused(adata):
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(object)
    adata.obs.loc[adata.obs_names[:40], "cell_type"] = np.nan  # not annotated yet
    sct.setup_anndata(adata, layer="counts", phenotype_keys=["cell_type"])
    model = sct.GeneTransformer(adata, **TINY)
    adata.obs.loc[adata.obs_names[:40], "cell_type"] = (
        "type_new"  # annotated after setup: not silently unknown
    )
    message = r"obs\['cell_type'\] changed since setup_anndata: 40 cells without a label then have one now"
    with pytest.raises(ValueError, match=message):
        model.train(max_epochs=1, **QUIET)
    with pytest.raises(ValueError, match=message):
        sct.GeneTransformer(adata, **TINY)
    sct.setup_anndata(adata, layer="counts", phenotype_keys=["cell_type"])  # the fix works
    assert "type_new" in sct.GeneTransformer(adata, **TINY).phenotype_categories_["cell_type"]


def test_a_query_labelled_after_setup_with_categories_the_reference_lacks_still_trains(trained, tmp_path):
    model, data = trained
    model.save(tmp_path / "m")
    query = data.copy()
    query.obs["cell_type"] = query.obs["cell_type"].astype(object)
    query.obs.loc[query.obs_names[:20], "cell_type"] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = sct.GeneTransformer.load_query_data(query, tmp_path / "m")
        query.obs.loc[query.obs_names[:20], "cell_type"] = "type_new"  # unknown to the model either way
        loaded.train(max_epochs=1, **QUIET)
    assert loaded.is_trained


def test_training_that_hits_a_non_finite_loss_stops_naming_the_step(adata, tmp_path):
    sct.setup_anndata(adata, layer="counts")
    model = sct.GeneTransformer(adata, **TINY)
    with torch.no_grad():
        model.module.gene_embedding.weight.fill_(float("nan"))
    with (
        pytest.raises(FloatingPointError, match="non-finite training loss at step 0") as raised,
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        model.train(max_epochs=1, checkpoint_dir=tmp_path / "ckpt", **QUIET)
    assert "resume=True" not in str(raised.value)  # no checkpoint was written to resume from


def test_a_non_finite_loss_mid_run_keeps_the_last_good_checkpoint(adata, tmp_path):
    import lightning.pytorch as pl

    class PoisonAtStep(pl.Callback):
        """Turn the weights to NaN just before a step of the second epoch."""

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.current_epoch == 1 and batch_idx == 1:
                with torch.no_grad():
                    pl_module.module.gene_embedding.weight.fill_(float("nan"))

    sct.setup_anndata(adata, layer="counts")
    model = sct.GeneTransformer(adata, **TINY)
    steps_per_epoch = int(np.ceil(round(0.9 * adata.n_obs) / 32))
    with (
        pytest.raises(
            FloatingPointError, match=f"non-finite training loss at step {steps_per_epoch + 1}"
        ) as raised,
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        model.train(max_epochs=3, checkpoint_dir=tmp_path, callbacks=[PoisonAtStep()], **QUIET)
    # a retry with resume=True would go on from that checkpoint, with its settings: the error says so
    assert "resume=True would go on from it with the same settings" in str(raised.value)
    # a new run that diverges beside that checkpoint, before writing its own, says nothing of it
    again = sct.GeneTransformer(adata, **TINY)
    with torch.no_grad():
        again.module.gene_embedding.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="at step 0") as raised, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again.train(max_epochs=1, checkpoint_dir=tmp_path, **QUIET)
    assert "resume=True" not in str(raised.value)
    checkpoint = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)  # our own file
    assert checkpoint["epoch"] == 0  # the end of the first epoch, the last good one
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values() if v.is_floating_point())


def test_a_diverged_run_puts_back_the_weights_and_calibration_it_started_from(adata):
    import lightning.pytorch as pl

    class Poison(pl.Callback):
        def __init__(self, step: int) -> None:
            self.step = step

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == self.step:
                with torch.no_grad():
                    pl_module.module.gene_embedding.weight.fill_(float("inf"))

    sct.setup_anndata(adata, layer="counts", phenotype_keys=["cell_type"])
    model = sct.GeneTransformer(adata, **TINY)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(max_epochs=2, batch_size=32, **QUIET)  # trained and calibrated
    weights = {k: v.clone() for k, v in model.module.state_dict().items()}
    temperatures = dict(model.temperatures_)
    with pytest.raises(FloatingPointError, match="puts back the weights"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(max_epochs=4, batch_size=32, callbacks=[Poison(step=7)], **QUIET)  # in its third epoch
    assert all(torch.equal(v, weights[k]) for k, v in model.module.state_dict().items())
    assert len(model.history["loss_train"]) == 2  # the epochs of the weights it went back to
    assert model.temperatures_ == temperatures and temperatures
    with warnings.catch_warnings():  # and a retry trains from them
        warnings.simplefilter("ignore")
        model.train(max_epochs=1, batch_size=32, **QUIET)
    assert all(torch.isfinite(v).all() for v in model.module.state_dict().values() if v.is_floating_point())


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda m, d: m.get_latent_representation(d, pooling="max"), ValueError, "pooling"),
        (lambda m, d: m.get_latent_representation(d, batch_size=0), ValueError, "batch_size"),
        (lambda m, d: m.get_latent_representation(d.layers["counts"]), TypeError, "must be an AnnData"),
        (lambda m, d: m.predict(d, phenotype="tissue"), KeyError, "not modelled"),
        (
            lambda m, d: sct.tl.embed(_without_layer(d), m),
            KeyError,
            r"reads counts from adata.layers\['counts'\]",
        ),
        (lambda m, d: sct.tl.predict(_with_nan(d), m), ValueError, "NaN"),
        (lambda m, d: sct.tl.embed(_renamed_genes(d), m), ValueError, "shares 0 genes"),
        (lambda m, d: sct.pl.embedding(d.copy(), color="cell_type"), KeyError, r"sct\.tl\.embed"),
        (lambda m, d: sct.pl.training_history(m, metrics=["nope"], show=False), KeyError, "available"),
        (lambda m, d: m.predict(d, min_confidence=1.5), ValueError, "min_confidence"),
        (lambda m, d: sct.tl.predict(d.copy(), m, min_confidence=0.0), ValueError, "min_confidence"),
        (
            lambda m, d: sct.tl.predict(d.copy(), m, over_clustering="cell_type"),
            ValueError,
            "majority_voting",
        ),
        (
            lambda m, d: sct.tl.predict(d.copy(), m, majority_voting=True, over_clustering="nope"),
            KeyError,
            "sc.tl.leiden",
        ),
        (lambda m, d: m.calibrate(d, phenotype="tissue"), KeyError, "not modelled"),
        (lambda m, d: sct.GeneTransformer.load_query_data(d[:10], m), ValueError, "view"),
        (
            lambda m, d: sct.pl.confusion_matrix(d, "cell_type", "sct_cell_type", show=False),
            KeyError,
            "sct_cell_type",
        ),
        (
            lambda m, d: sct.pl.training_history(m, metrics=["loss", "expression"], ax=object()),
            ValueError,
            "one metric",
        ),
    ],
    ids=[
        "unknown pooling",
        "batch_size 0",
        "not an AnnData",
        "unknown phenotype",
        "query without the count layer",
        "query with NaN",
        "query sharing no gene",
        "plot without an embedding",
        "unknown metric",
        "ax with several metrics",
        "min_confidence above 1",
        "min_confidence 0",
        "over_clustering without majority_voting",
        "over_clustering column missing",
        "calibrate an unknown phenotype",
        "query is a view",
        "confusion matrix without predictions",
    ],
)
def test_getters_tools_and_plots_refuse_bad_input(trained, call, error, message):
    model, data = trained
    with pytest.raises(error, match=message):
        call(model, data)


def _without_layer(adata):
    out = adata.copy()
    del out.layers["counts"]
    return out


def _with_nan(adata):
    out = adata.copy()
    out.layers["counts"] = out.layers["counts"].astype(np.float32)
    out.layers["counts"].data[0] = np.nan
    return out


def _renamed_genes(adata):
    out = adata.copy()
    out.var_names = [f"other_{i}" for i in range(out.n_vars)]
    return out


def test_predict_and_history_of_a_model_without_phenotypes_or_training(adata):
    sct.setup_anndata(adata, layer="counts")
    model = sct.GeneTransformer(adata, **TINY)
    with pytest.raises(ValueError, match="no phenotype keys"):
        model.predict()
    with pytest.raises(ValueError, match="train it first"):
        sct.pl.training_history(model)


def test_save_and_load_refuse_bad_targets(trained, tmp_path):
    model, data = trained
    # (saving into a non-empty directory: tests/model/test_gene_transformer.py)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        model.save(a_file)
    with pytest.raises(FileNotFoundError, match="not a directory holding a saved"):
        sct.GeneTransformer.load(tmp_path / "nothing_here")
    with pytest.raises(FileNotFoundError, match="not a saved sctransformer model"):
        sct.GeneTransformer.load(occupied)
    model.save(tmp_path / "m")
    with pytest.raises(ValueError, match="shares 0 genes"):
        sct.GeneTransformer.load(tmp_path / "m", adata=_renamed_genes(data))
    state = json.loads((tmp_path / "m" / "model.json").read_text())
    state["model_class"] = "OtherModel"
    (tmp_path / "m" / "model.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match="holds a 'OtherModel'"):
        sct.GeneTransformer.load(tmp_path / "m")


def _edit(path: list[str], value=None):
    """A change to model.json: set ``value`` at ``path`` (remove the key where ``value`` is ``...``)."""

    def change(state):
        *parents, last = path
        for key in parents:
            state = state[key]
        if value is ...:
            del state[last]
        else:
            state[last] = value

    return change


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_edit(["hyperparameters", "n_heads"], 3), "n_heads=3 must divide d_model=16"),
        (_edit(["hyperparameters", "max_length"], -1), "max_length must be an integer >= 1"),
        (_edit(["hyperparameters", "dropout"], "0.1"), "dropout must be a number"),
        (_edit(["hyperparameters", "seed"], 2**64), "seed must be an integer"),
        (_edit(["hyperparameters", "d_model"], ...), "missing key 'd_model' in hyperparameters"),
        (_edit(["setup_args", "layer"], ...), "missing key 'layer' in setup_args"),
        (_edit(["is_trained"], ...), "missing key 'is_trained'"),
        (_edit(["history"], ...), "missing key 'history'"),
        (
            _edit(["temperatures"], {"cell_type": -1.0}),
            r"temperatures\['cell_type'\] must be a finite number > 0",
        ),
        (_edit(["temperatures"], {"cell_type": 0}), "must be a finite number > 0, got 0"),
        (_edit(["temperatures"], {"cell_type": float("nan")}), "must be a finite number > 0, got nan"),
        (
            _edit(["phenotype_categories", "cell_type"], "abc"),
            "must be a list of distinct strings, got 'abc'",
        ),
        (_edit(["phenotype_categories", "cell_type"], ["a", "a", "b"]), "list of distinct strings"),
        (_edit(["phenotype_categories", "cell_type"], [1, 2, 3]), "list of distinct strings"),
        (_edit(["vocabulary"], "genes"), "vocabulary must be a list of distinct strings"),
    ],
)
def test_a_hand_edited_model_json_is_refused_on_load_naming_the_damage(trained, tmp_path, change, message):
    model, data = trained
    model.save(tmp_path / "m")
    state = json.loads((tmp_path / "m" / "model.json").read_text())
    change(state)
    (tmp_path / "m" / "model.json").write_text(json.dumps(state))
    query = data.copy()
    query.obs = query.obs[[c for c in query.obs if not c.startswith("_scvi")]]
    query.uns.clear()
    before = fingerprint(query)
    for load in (
        lambda: sct.GeneTransformer.load(tmp_path / "m"),
        lambda: sct.GeneTransformer.load(tmp_path / "m", adata=query),
        lambda: sct.GeneTransformer.load_query_data(query, tmp_path / "m"),
    ):  # were loaded (then predicted wrong labels or failed deep inside), or raised a bare KeyError
        with pytest.raises(ValueError, match=f"damaged model.json in .*{message}"):
            load()
    assert fingerprint(query) == before


def _cli_case(tmp_path, case: str) -> list[str]:
    """Arguments of one malformed command line (files are made in tmp_path)."""
    import yaml

    data = sct.datasets.synthetic(n_cells=30, n_genes=20, n_cell_types=2, n_markers=5)
    data.write_h5ad(tmp_path / "cells.h5ad")
    good = {"data": {"paths": "cells.h5ad", "layer": "counts"}, "model": dict(TINY), "output": "m"}
    config = tmp_path / "c.yaml"
    if case == "missing config":
        return ["pretrain", "--config", str(tmp_path / "absent.yaml")]
    if case == "not a mapping":
        config.write_text("- a\n- b\n")
    elif case == "unknown section":
        config.write_text(yaml.safe_dump({**good, "optimizer": {}}))
    elif case == "unknown model option":
        config.write_text(yaml.safe_dump({**good, "model": {"d_modle": 8}}))
    elif case == "missing data file":
        config.write_text(yaml.safe_dump({**good, "data": {"paths": ["cells.h5ad", "gone.h5ad"]}}))
    elif case == "no output":
        config.write_text(yaml.safe_dump({k: v for k, v in good.items() if k != "output"}))
    elif case == "output not empty":
        (tmp_path / "m").mkdir()
        (tmp_path / "m" / "mine.txt").write_text("x")
        config.write_text(yaml.safe_dump(good))
    elif case == "output holds a model":
        (tmp_path / "m").mkdir()
        (tmp_path / "m" / "model.json").write_text("{}")
        config.write_text(yaml.safe_dump(good))
    elif case == "bad hyper-parameter":
        config.write_text(yaml.safe_dump({**good, "model": {**TINY, "n_heads": 3}}))
    elif case == "embed: model is not a model":
        return ["embed", "--model", str(tmp_path), "--input", str(tmp_path / "cells.h5ad"),
                "--output", str(tmp_path / "out.h5ad")]  # fmt: skip
    elif case == "embed: output is the input":
        sct.setup_anndata(data, layer="counts")
        sct.GeneTransformer(data, **TINY).save(tmp_path / "model")
        return ["embed", "--model", str(tmp_path / "model"), "--input", str(tmp_path / "cells.h5ad"),
                "--output", str(tmp_path / "cells.h5ad"), "--overwrite"]  # fmt: skip
    elif case == "predict: missing input":
        return ["predict", "--model", str(tmp_path), "--input", str(tmp_path / "absent.h5ad"),
                "--output", str(tmp_path / "out.h5ad")]  # fmt: skip
    return ["pretrain", "--config", str(config)]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing config", "does not exist"),
        ("not a mapping", "must hold a mapping"),
        ("unknown section", "unknown config sections"),
        ("unknown model option", "d_modle"),
        ("missing data file", "gone.h5ad"),
        ("no output", "no 'output' section"),
        ("output not empty", "does not hold a saved sctransformer model"),
        ("output holds a model", "--overwrite"),
        ("bad hyper-parameter", "n_heads"),
        ("embed: model is not a model", "not a saved sctransformer model"),
        ("embed: output is the input", "must differ from --input"),
        ("predict: missing input", "absent.h5ad"),
    ],
)
def test_cli_refuses_bad_arguments_with_status_2(tmp_path, capsys, case, message):
    from sctransformer.cli import main

    args = _cli_case(tmp_path, case)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sctransformer {args[0]}: error:") and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    with pytest.raises(SystemExit) as exit_info:  # argparse: a required argument missing
        main([args[0]])
    assert exit_info.value.code == 2


def test_a_single_cell_trains_without_validation_and_embeds_finitely(adata):
    one = adata[:1].copy()
    with pytest.warns(UserWarning, match="single category"):
        sct.setup_anndata(one, layer="counts", phenotype_keys=["cell_type"])
    model = sct.GeneTransformer(one, **TINY)
    with pytest.raises(ValueError, match="early_stopping needs validation cells"):
        model.train(max_epochs=1, early_stopping=True, **QUIET)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(max_epochs=1, **QUIET)
    assert not any(k.endswith("_validation") for k in model.history)
    assert model.temperatures_ == {}  # no validation cells: nothing to calibrate on
    assert np.isfinite(model.get_latent_representation()).all()


def test_duplicate_cell_names_are_accepted_and_results_follow_positions(trained):
    model, data = trained
    duplicated = data.copy()
    duplicated.obs_names = ["same"] * duplicated.n_obs
    np.testing.assert_array_equal(
        model.get_latent_representation(duplicated), model.get_latent_representation(data)
    )
    sct.tl.predict(duplicated, model)
    expected = model.predict(data)["cell_type"].to_numpy()
    np.testing.assert_array_equal(duplicated.obs["sct_cell_type"].to_numpy(), expected)


@pytest.mark.parametrize("value", [2**40, -1, 1.5, True, "0"])
def test_a_default_seed_that_could_not_be_saved_and_loaded_is_refused_when_set(value):
    with pytest.raises(
        ValueError, match=r"sctransformer\.settings\.seed must be an integer >= 0 and < 2\*\*32"
    ):
        sct.settings.seed = value
    assert sct.settings.seed == 0  # unchanged


@pytest.mark.parametrize("value", [0, -1, 2.5, "8", None, True])
def test_a_default_batch_size_that_is_not_a_positive_integer_is_refused_when_set(value):
    with pytest.raises(ValueError, match=r"sctransformer\.settings\.batch_size must be a positive integer"):
        sct.settings.batch_size = value
    assert sct.settings.batch_size == 64  # unchanged


def test_an_unknown_verbosity_is_refused_with_the_names_it_takes():
    before = sct.settings.verbosity
    with pytest.raises(ValueError, match=r"verbosity must be one of \['debug', 'info', 'warning', 'error'\]"):
        sct.settings.verbosity = "verbose"
    assert sct.settings.verbosity == before
    sct.settings.verbosity = "WARNING"
    assert sct.settings.verbosity == logging.WARNING
    sct.settings.verbosity = before


def test_predict_with_no_phenotype_and_plots_with_no_bars_are_refused(trained):
    model, data = trained
    adata = data.copy()
    sct.tl.predict(adata, model)
    before = fingerprint(adata), list(adata.uns["sct"]["sct"]["params"]["phenotypes"])
    with pytest.raises(ValueError, match="phenotype is empty"):
        sct.tl.predict(adata, model, phenotype=[])
    assert (fingerprint(adata), list(adata.uns["sct"]["sct"]["params"]["phenotypes"])) == before
    sct.tl.perturb(adata, model, ["gene_0", "gene_1"], predict_expression=False, n_folds=2)
    for n in (0, -1, 2.5):
        with pytest.raises(ValueError, match="n must be a positive integer"):
            sct.pl.perturbation(adata, n=n, show=False)
