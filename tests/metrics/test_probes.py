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
