from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from sctransformer.metrics import knn_probe_accuracy, log1p_normalise, logistic_regression_baseline


def test_log1p_normalise_matches_a_per_cell_loop_and_keeps_sparsity():
    rng = np.random.default_rng(0)
    counts = rng.poisson(1.0, size=(6, 9)).astype(float)
    counts[2] = 0
    expected = np.zeros_like(counts)
    for i, row in enumerate(counts):
        if row.sum() > 0:
            expected[i] = np.log1p(row / row.sum() * 1e4)
    np.testing.assert_allclose(log1p_normalise(counts), expected)
    sparse = log1p_normalise(sp.csr_matrix(counts))
    assert sp.issparse(sparse)
    np.testing.assert_allclose(sparse.toarray(), expected)


def test_knn_probe_matches_a_brute_force_majority_vote():
    rng = np.random.default_rng(1)
    embedding = rng.normal(size=(60, 3))
    labels = np.where(embedding[:, 0] + 0.3 * rng.normal(size=60) > 0, "a", "b")
    train, test = np.arange(40), np.arange(40, 60)
    correct = 0
    for i in test:
        distance = ((embedding[train] - embedding[i]) ** 2).sum(1)
        nearest = labels[train][np.argsort(distance, kind="stable")[:5]]
        values, counts = np.unique(nearest, return_counts=True)
        correct += values[np.argmax(counts)] == labels[i]
    assert knn_probe_accuracy(embedding, labels, train, test, n_neighbors=5) == correct / len(test)


def test_logistic_regression_baseline_separates_separable_classes():
    rng = np.random.default_rng(2)
    x = np.vstack([rng.normal(-2, 1, size=(50, 4)), rng.normal(2, 1, size=(50, 4))])
    y = np.array(["a"] * 50 + ["b"] * 50)
    order = rng.permutation(100)
    x, y = x[order], y[order]
    predicted = logistic_regression_baseline(x, y, np.arange(70), np.arange(70, 100))
    assert (predicted == y[70:]).mean() > 0.95


def test_probes_take_boolean_masks_like_positions():
    rng = np.random.default_rng(2)
    embedding = rng.normal(size=(40, 3))
    labels = np.where(embedding[:, 0] > 0, "x", "y")
    train = np.zeros(40, dtype=bool)
    train[:30] = True
    by_mask = knn_probe_accuracy(embedding, labels, train, ~train, n_neighbors=50)
    by_position = knn_probe_accuracy(embedding, labels, np.arange(30), np.arange(30, 40), n_neighbors=50)
    assert by_mask == by_position
    np.testing.assert_array_equal(
        logistic_regression_baseline(embedding, labels, train, ~train),
        logistic_regression_baseline(embedding, labels, np.arange(30), np.arange(30, 40)),
    )


def test_probes_leave_out_cells_without_a_label():
    from sctransformer.metrics import knn_probe_accuracy, logistic_regression_baseline

    rng = np.random.default_rng(0)
    embedding = np.r_[rng.normal(0, 0.1, (20, 2)), rng.normal(5, 0.1, (20, 2))]
    labels = np.array(["a"] * 20 + ["b"] * 20, dtype=object)
    labels[[0, 25, 1, 27]] = np.nan  # two training and two test cells without a label
    train, test = np.arange(0, 40, 2), np.arange(1, 40, 2)
    assert knn_probe_accuracy(embedding, labels, train, test, n_neighbors=3) == 1.0  # not 18 / 20
    predicted = logistic_regression_baseline(embedding, labels, train, test)
    assert len(predicted) == len(test) and set(predicted) == {"a", "b"}
    with pytest.raises(ValueError, match="no cell of test_idx has a label"):
        knn_probe_accuracy(embedding, labels, train, [1, 27])


def test_probes_refuse_test_cells_that_are_also_training_cells():
    from sctransformer.metrics import knn_probe_accuracy, logistic_regression_baseline

    rng = np.random.default_rng(0)
    embedding, labels = rng.normal(size=(60, 4)), rng.integers(0, 3, 60)  # random labels: chance is 1/3
    cells = np.arange(60)
    for probe in (knn_probe_accuracy, logistic_regression_baseline):
        with pytest.raises(ValueError, match=r"train_idx and test_idx share 10 cells .*disjoint"):
            probe(embedding, labels, cells[:40], cells[30:])  # each test cell would find itself


@pytest.mark.parametrize(
    ("kind", "zero", "one"), [("int", 0, 1), ("float with a missing label", 0.0, 1.0), ("bool", False, True)]
)
def test_probes_take_labels_of_any_kind_and_predict_them_as_given(kind, zero, one):
    # were refused by scikit-learn: "Unknown label type: unknown"
    rng = np.random.default_rng(3)
    embedding = rng.normal(size=(40, 3))
    numbers = (embedding[:, 0] > 0).astype(int)
    labels = {"int": numbers, "float with a missing label": numbers.astype(float), "bool": numbers == 1}[kind]
    as_text = np.where(numbers == 1, "one", "zero").astype(object)  # sorts as zero < one does: same classes
    if kind.startswith("float"):
        labels[[0, 35]] = np.nan  # an integer column with a missing label is float
        as_text[[0, 35]] = None
    train, test = np.arange(30), np.arange(30, 40)
    accuracy = knn_probe_accuracy(embedding, labels, train, test, n_neighbors=5)
    assert accuracy == knn_probe_accuracy(embedding, as_text, train, test, n_neighbors=5)
    predicted = logistic_regression_baseline(embedding, labels, train, test)
    expected = logistic_regression_baseline(embedding, as_text, train, test)
    assert list(predicted) == [{"one": one, "zero": zero}[e] for e in expected]
    assert {type(p) for p in predicted} == {type(one)}  # the values of labels, not codes or strings


@pytest.mark.parametrize(
    ("embedding", "labels", "n_neighbors"),
    [
        ([[-1.0], [1.0], [0.0]], ["a", "b", "b"], 1),  # the test cell is as far from "a" as from "b"
        ([[-1.0], [1.0], [1.0], [0.0]], ["a", "b", "c", "a"], 2),
    ],
)
def test_knn_probe_does_not_depend_on_the_order_of_the_training_cells(embedding, labels, n_neighbors):
    # equidistant neighbours were taken in the order of train_idx: 0.0 for [0, 1], 1.0 for [1, 0]
    embedding, labels = np.array(embedding), np.array(labels)
    train, test = np.arange(len(labels) - 1), [len(labels) - 1]
    accuracies = {
        knn_probe_accuracy(embedding, labels, order, test, n_neighbors=n_neighbors)
        for order in (train, train[::-1], np.roll(train, 1))
    }
    assert len(accuracies) == 1


@pytest.mark.parametrize("kind", ["DataFrame", "list", "sparse"])
def test_probes_take_a_dataframe_a_list_or_a_sparse_matrix_like_an_array(kind):
    import pandas as pd

    rng = np.random.default_rng(4)
    embedding = rng.normal(size=(30, 3))
    labels = np.where(embedding[:, 0] > 0, "a", "b")
    other = {
        "DataFrame": pd.DataFrame(embedding),
        "list": embedding.tolist(),
        "sparse": sp.coo_matrix(embedding),
    }
    train, test = np.arange(20), np.arange(20, 30)
    assert knn_probe_accuracy(other[kind], labels, train, test, n_neighbors=3) == knn_probe_accuracy(
        embedding, labels, train, test, n_neighbors=3
    )
    np.testing.assert_array_equal(
        logistic_regression_baseline(other[kind], labels, train, test),
        logistic_regression_baseline(embedding, labels, train, test),
    )
    with pytest.raises(ValueError, match=r"one row per label \(29\)"):
        knn_probe_accuracy(embedding, labels[:29], train, [20])
