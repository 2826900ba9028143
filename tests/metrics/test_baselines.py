from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

import sctransformer as sct
from sctransformer.metrics import annotation_baselines, log1p_normalise
from sctransformer.metrics._baselines import BASELINES, _select_highly_variable


@pytest.fixture(scope="module")
def data():
    adata = sct.datasets.synthetic(n_cells=240, n_genes=80, n_cell_types=3, n_markers=8, seed=0)
    labels = adata.obs["cell_type"].to_numpy()
    order = np.random.default_rng(0).permutation(adata.n_obs)
    return adata.layers["counts"], labels, order[:160], order[160:]


def test_every_baseline_beats_chance_clearly(data):
    counts, labels, train, test = data
    predictions = annotation_baselines(counts, labels, train, test, n_top_genes=40, n_pcs=10)
    assert list(predictions) == list(BASELINES)
    chance = max(np.mean(labels[test] == label) for label in np.unique(labels))
    for name, predicted in predictions.items():
        assert predicted.shape == (len(test),), name
        assert set(predicted) <= set(labels[train]), name
        assert (predicted == labels[test]).mean() > max(0.8, chance + 0.3), name


def test_dense_and_sparse_counts_give_the_same_predictions(data):
    counts, labels, train, test = data
    sparse = annotation_baselines(counts, labels, train, test, n_top_genes=40, n_pcs=10)
    dense = annotation_baselines(
        counts.toarray().astype(np.int64), labels, train, test, n_top_genes=40, n_pcs=10
    )
    for name in BASELINES:
        np.testing.assert_array_equal(sparse[name], dense[name])


def test_methods_selects_a_subset_in_the_given_order(data):
    counts, labels, train, test = data
    predictions = annotation_baselines(
        counts, labels, train, test, methods=["knn_pca", "logreg_hvg"], n_pcs=5
    )
    assert list(predictions) == ["knn_pca", "logreg_hvg"]
    with pytest.raises(ValueError, match="methods"):
        annotation_baselines(counts, labels, train, test, methods=["scgpt"])


def test_hvg_count_is_respected_and_chosen_on_the_training_cells_only(data):
    counts, _, train, test = data
    x = log1p_normalise(counts)
    genes = _select_highly_variable(x[train], 25)
    assert len(genes) == 25 and np.all(np.diff(genes) > 0)
    assert len(_select_highly_variable(x[train], 500)) == 80  # fewer genes than asked: all
    # a gene that varies only among the test cells is never chosen from the training cells
    dense = counts.toarray()
    dense[:, 79] = 0
    dense[test[::2], 79] = 200
    x = log1p_normalise(dense)
    assert 79 not in _select_highly_variable(x[train], 25)
    assert 79 in _select_highly_variable(x, 25)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"test_idx": "overlap"}, "disjoint"),
        ({"train_idx": np.array([0, 1, 10_000])}, r"\[0, 240\)"),
        ({"test_idx": np.array([], dtype=int)}, "empty"),
        ({"labels": np.array(["a"] * 10)}, "one entry per cell"),
        ({"n_pcs": 0}, "n_pcs"),
        ({"train_idx": np.array([0.5, 1.5])}, "integer"),
    ],
)
def test_bad_input_raises(data, change, match):
    counts, labels, train, test = data
    kwargs = {"counts": counts, "labels": labels, "train_idx": train, "test_idx": test}
    if isinstance(change.get("test_idx"), str):
        change = {"test_idx": np.concatenate([test, train[:3]])}
    kwargs.update(change)
    with pytest.raises(ValueError, match=match):
        annotation_baselines(**kwargs)


def test_missing_training_labels_are_refused(data):
    counts, labels, train, test = data
    labels = labels.astype(object)
    labels[train[0]] = None
    with pytest.raises(ValueError, match="no label"):
        annotation_baselines(counts, labels, train, test)


def test_sparse_input_is_not_densified(data, monkeypatch):
    counts, labels, train, test = data

    def refuse(self, *args, **kwargs):
        raise AssertionError("densified")

    monkeypatch.setattr(sp.csr_matrix, "toarray", refuse)
    monkeypatch.setattr(sp.csr_matrix, "todense", refuse)
    annotation_baselines(counts, labels, train, test, n_top_genes=40, n_pcs=5)


@pytest.mark.parametrize("kind", ["int", "bool"])  # float: tests/metrics/test_probes.py
def test_labels_of_any_kind_get_the_predictions_of_the_same_labels_as_text(data, kind):
    # were refused by scikit-learn: "Unknown label type: unknown"
    counts, labels, train, test = data
    codes = np.unique(labels, return_inverse=True)[1]  # "type_0" < "type_1" < ...: 0 < 1 < ...
    values = {"int": codes, "bool": codes > 0}[kind]
    text = {"int": labels, "bool": np.where(codes > 0, "true", "false")}[kind]
    kwargs = {"n_top_genes": 40, "n_pcs": 5}
    by_value = annotation_baselines(counts, values, train, test, **kwargs)
    by_text = annotation_baselines(counts, text, train, test, **kwargs)
    back = dict(zip(text, values, strict=True))
    for name in BASELINES:
        assert list(by_value[name]) == [back[label] for label in by_text[name]], name
        assert {type(v) for v in by_value[name]} == {type(values.tolist()[0])}, name  # the labels' values


def test_predictions_do_not_depend_on_the_order_of_the_training_cells():
    # cells 0 ("a") and 1 ("b") have the test cell's counts: the nearest neighbour was the one
    # that came first in train_idx
    counts = np.random.default_rng(0).poisson(3, size=(12, 8))
    counts[[1, 11]] = counts[0]
    labels = np.array(["a", "b"] * 6)
    train = np.arange(11)
    predicted = {
        annotation_baselines(
            counts, labels, order, [11], methods=["knn_pca"], n_neighbors=1, n_pcs=3, n_top_genes=8
        )["knn_pca"][0]
        for order in (train, train[::-1], np.r_[1, 0, train[2:]])
    }
    assert len(predicted) == 1
