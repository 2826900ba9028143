from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from anndata import AnnData
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

from sctransformer.data import observed_categories
from sctransformer.metrics import (
    ClassificationReport,
    classification_report,
    classification_scores,
    expected_calibration_error,
)
from sctransformer.metrics._classification import _bootstrap_scores, _encode


def naive_ece(confidence, correct, n_bins):
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins  # bins (lo, hi]: a confidence k / n_bins closes bin k - 1
        inside = [(c > lo or (b == 0 and c == 0)) and c <= hi for c in confidence]
        members = [i for i, x in enumerate(inside) if x]
        if members:
            accuracy = sum(correct[i] for i in members) / len(members)
            mean_confidence = sum(confidence[i] for i in members) / len(members)
            total += len(members) / len(confidence) * abs(accuracy - mean_confidence)
    return total


def noisy_labels(n, n_classes=4, accuracy=0.8, seed=0):
    rng = np.random.default_rng(seed)
    weights = np.linspace(1, 2, n_classes)
    y_true = rng.choice([f"t{k}" for k in range(n_classes)], size=n, p=weights / weights.sum())
    y_pred = np.where(
        rng.random(n) < accuracy, y_true, rng.choice([f"t{k}" for k in range(n_classes)], size=n)
    )
    return y_true, y_pred


@pytest.mark.parametrize("n_bins", [1, 5, 6, 7, 9, 12, 15])
def test_ece_matches_a_per_bin_loop(n_bins):
    # 6, 7, 9, 12: the edges of np.linspace put a confidence k / n_bins one bin too high for some k
    rng = np.random.default_rng(0)
    confidence = rng.random(300)
    confidence[: n_bins + 1] = np.arange(n_bins + 1) / n_bins  # every bin edge
    correct = rng.random(300) < confidence
    assert expected_calibration_error(confidence, correct, n_bins=n_bins) == pytest.approx(
        naive_ece(confidence, correct, n_bins)
    )


@pytest.mark.parametrize("n_bins", [5, 6, 7, 9, 12, 15])
def test_a_confidence_on_a_bin_edge_counts_in_the_bin_it_closes(n_bins):
    # a right prediction of confidence k / n_bins closes bin k - 1 and a wrong one of (k + 0.5) / n_bins
    # lies in bin k: their gaps add up. The edges of np.linspace put both in bin k for some k and
    # n_bins (6: k = 5, ECE 0.367 instead of 0.533)
    for k in range(1, n_bins):
        above = (k + 0.5) / n_bins
        ece = expected_calibration_error([k / n_bins, above], [1, 0], n_bins=n_bins)
        assert ece == pytest.approx(0.5 * (1 - k / n_bins) + 0.5 * above), k


def test_ece_is_zero_when_calibrated_and_the_gap_when_overconfident():
    assert expected_calibration_error(np.full(4, 0.75), np.array([1, 1, 1, 0])) == pytest.approx(0)
    assert expected_calibration_error(np.full(10, 0.9), np.zeros(10, dtype=bool)) == pytest.approx(0.9)


@pytest.mark.parametrize(
    ("confidence", "correct", "kwargs", "match"),
    [
        ([0.5, 0.6], [1], {}, "one value per cell"),
        ([1.5, 0.2], [1, 0], {}, r"\[0, 1\]"),
        ([np.nan, 0.2], [1, 0], {}, r"\[0, 1\]"),
        ([], [], {}, "empty"),
        ([0.5], [2], {}, "0/1"),
        ([0.5], [1], {"n_bins": 0}, "n_bins"),
        ([0.9, 0.8], pd.array([True, pd.NA], dtype="boolean"), {}, r"correct is missing .* for 1 of 2"),
        ([0.9, 0.8], [True, None], {}, "correct is missing"),
        ([0.9, 0.8], [1.0, np.nan], {}, "correct is missing"),
    ],
)
def test_ece_refuses_bad_input(confidence, correct, kwargs, match):
    with pytest.raises(ValueError, match=match):
        expected_calibration_error(np.asarray(confidence), np.asarray(correct), **kwargs)


def test_point_estimates_equal_sklearns():
    y_true, y_pred = noisy_labels(500)
    report = classification_scores(y_true, y_pred, n_bootstrap=50)
    assert isinstance(report, ClassificationReport)
    assert report.summary.loc["accuracy", "value"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert report.summary.loc["macro_f1", "value"] == pytest.approx(
        f1_score(y_true, y_pred, average="macro", zero_division=0)
    )
    labels = sorted(set(y_true))
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels)
    assert list(report.per_class.index) == labels
    np.testing.assert_allclose(report.per_class["precision"], precision)
    np.testing.assert_allclose(report.per_class["recall"], recall)
    np.testing.assert_allclose(report.per_class["f1"], f1)
    np.testing.assert_array_equal(report.per_class["support"], support)
    assert report.n_cells == 500 and report.n_bootstrap == 50 and report.confidence_level == 0.95
    assert list(report.summary.columns) == [
        "value",
        "ci_low",
        "ci_high",
        "t_low",
        "t_high",
        "binomial_low",
        "binomial_high",
    ]
    assert report.summary.loc["macro_f1", ["binomial_low", "binomial_high"]].isna().all()


def test_intervals_contain_the_estimate_and_narrow_with_more_cells():
    widths = {}
    for n in (200, 5000):
        y_true, y_pred = noisy_labels(n, seed=n)
        summary = classification_scores(y_true, y_pred, n_bootstrap=300).summary
        for metric in ("accuracy", "macro_f1"):
            value = summary.loc[metric, "value"]
            for low, high in (("ci_low", "ci_high"), ("t_low", "t_high")):
                assert summary.loc[metric, low] <= value <= summary.loc[metric, high]
            widths[n, metric] = summary.loc[metric, "ci_high"] - summary.loc[metric, "ci_low"]
        assert summary.loc["accuracy", "binomial_low"] <= summary.loc["accuracy", "value"]
        assert summary.loc["accuracy", "value"] <= summary.loc["accuracy", "binomial_high"]
    for metric in ("accuracy", "macro_f1"):
        assert widths[5000, metric] < widths[200, metric] / 3  # ~ 1 / sqrt(n)


def test_binomial_interval_is_scipys_clopper_pearson():
    y_true, y_pred = noisy_labels(300, seed=3)
    report = classification_scores(y_true, y_pred, n_bootstrap=0, confidence_level=0.9)
    k = int((y_true == y_pred).sum())
    expected = stats.binomtest(k, 300).proportion_ci(0.9, method="exact")
    assert report.summary.loc["accuracy", "binomial_low"] == pytest.approx(expected.low)
    assert report.summary.loc["accuracy", "binomial_high"] == pytest.approx(expected.high)


def test_t_interval_uses_the_bootstrap_standard_deviation():
    y_true, y_pred = noisy_labels(400, seed=4)
    report = classification_scores(y_true, y_pred, n_bootstrap=200, seed=7)
    true_codes, pred_codes, n_classes = _encode(y_true, y_pred, sorted(set(y_true)))
    scores = _bootstrap_scores(true_codes, pred_codes, n_classes, 4, 200, np.random.default_rng(7))
    for metric in ("accuracy", "macro_f1"):
        value = report.summary.loc[metric, "value"]
        half = stats.t.ppf(0.975, 199) * scores[metric].std(ddof=1)
        assert report.summary.loc[metric, "t_low"] == pytest.approx(value - half)
        assert report.summary.loc[metric, "t_high"] == pytest.approx(value + half)
        low, high = np.quantile(scores[metric], [0.025, 0.975])
        assert report.summary.loc[metric, "ci_low"] == pytest.approx(low)
        assert report.summary.loc[metric, "ci_high"] == pytest.approx(high)


def test_bootstrap_is_reproducible_with_a_seed():
    y_true, y_pred = noisy_labels(300, seed=5)
    first = classification_scores(y_true, y_pred, n_bootstrap=100, seed=1)
    again = classification_scores(y_true, y_pred, n_bootstrap=100, seed=1)
    other = classification_scores(y_true, y_pred, n_bootstrap=100, seed=2)
    pd.testing.assert_frame_equal(first.summary, again.summary)
    pd.testing.assert_frame_equal(first.per_class, again.per_class)
    assert not first.summary[["ci_low", "ci_high"]].equals(other.summary[["ci_low", "ci_high"]])


def test_each_resample_scores_as_sklearn_on_those_cells(monkeypatch):
    y_true, y_pred = noisy_labels(120, seed=6)
    y_pred[:5] = "unknown"
    labels = sorted(set(y_true))
    true_codes, pred_codes, n_classes = _encode(y_true, y_pred, labels)
    monkeypatch.setattr("sctransformer.metrics._classification._CHUNK_CELLS", 250)  # 2 resamples per chunk
    scores = _bootstrap_scores(true_codes, pred_codes, n_classes, len(labels), 5, np.random.default_rng(0))
    cells = np.random.default_rng(0).integers(0, 120, size=(5, 120))
    for b in range(5):
        t, p = y_true[cells[b]], y_pred[cells[b]]
        assert scores["accuracy"][b] == pytest.approx(accuracy_score(t, p))
        assert scores["macro_f1"][b] == pytest.approx(
            f1_score(t, p, labels=labels, average="macro", zero_division=0)
        )
        precision, recall, f1, _ = precision_recall_fscore_support(t, p, labels=labels, zero_division=0)
        np.testing.assert_allclose(scores["precision"][b], precision)
        np.testing.assert_allclose(scores["recall"][b], recall)
        np.testing.assert_allclose(scores["f1"][b], f1)


def test_missing_true_labels_are_dropped_and_unknown_predictions_count_as_wrong():
    y_true = np.array(["a", "a", None, "b", np.nan, "b"], dtype=object)
    y_pred = np.array(["a", "unknown", "a", "b", "b", None], dtype=object)
    report = classification_scores(y_true, y_pred, n_bootstrap=20)
    assert report.n_cells == 4
    assert list(report.per_class.index) == ["a", "b"]  # "unknown" is no class of its own
    assert report.summary.loc["accuracy", "value"] == pytest.approx(0.5)
    # a: precision 1, recall 1/2; b: precision 1, recall 1/2
    np.testing.assert_allclose(report.per_class["f1"], [2 / 3, 2 / 3])
    assert report.summary.loc["macro_f1", "value"] == pytest.approx(2 / 3)


def test_classes_absent_from_the_truth_are_not_averaged_unless_asked():
    y_true = np.array(["a", "a", "b", "b"])
    y_pred = np.array(["a", "c", "b", "b"])
    default = classification_scores(y_true, y_pred, n_bootstrap=0)
    assert list(default.per_class.index) == ["a", "b"]
    assert default.summary.loc["macro_f1", "value"] == pytest.approx(
        f1_score(y_true, y_pred, labels=["a", "b"], average="macro")
    )
    explicit = classification_scores(y_true, y_pred, labels=["a", "b", "c"], n_bootstrap=0)
    assert explicit.summary.loc["macro_f1", "value"] == pytest.approx(
        f1_score(y_true, y_pred, labels=["a", "b", "c"], average="macro", zero_division=0)
    )


def test_no_bootstrap_leaves_the_bootstrap_columns_empty_and_format_reads_well():
    y_true, y_pred = noisy_labels(200, seed=8)
    report = classification_scores(y_true, y_pred, n_bootstrap=0)
    assert report.summary[["ci_low", "ci_high", "t_low", "t_high"]].isna().all().all()
    assert report.per_class[["f1_ci_low", "f1_ci_high"]].isna().all().all()
    assert report.format("macro_f1") == f"{report.summary.loc['macro_f1', 'value']:.3f}"
    with_ci = classification_scores(y_true, y_pred, n_bootstrap=50)
    row = with_ci.summary.loc["macro_f1"]
    assert with_ci.format() == f"{row['value']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}]"
    acc = with_ci.summary.loc["accuracy"]
    assert with_ci.format("accuracy", interval="binomial", digits=2) == (
        f"{acc['value']:.2f} [{acc['binomial_low']:.2f}, {acc['binomial_high']:.2f}]"
    )
    text = str(with_ci)
    assert "macro_f1" in text and "t0" in text and "200 cells" in text and repr(with_ci) == text
    with pytest.raises(ValueError, match="metric"):
        with_ci.format("recall")


@pytest.mark.parametrize(
    ("y_true", "y_pred", "kwargs", "match"),
    [
        (["a", "b"], ["a"], {}, "one label per cell"),
        ([None, np.nan], ["a", "b"], {}, "no cell has a true label"),
        (["a", "b"], ["a", "b"], {"confidence_level": 1.0}, "confidence_level"),
        (["a", "b"], ["a", "b"], {"confidence_level": 0}, "confidence_level"),
        (["a", "b"], ["a", "b"], {"n_bootstrap": -1}, "n_bootstrap"),
        (["a", "b"], ["a", "b"], {"n_bootstrap": 1}, "n_bootstrap"),
        (["a", "b"], ["a", "b"], {"labels": []}, "labels"),
        (["a", "b"], ["a", "b"], {"labels": ["a", "a"]}, "duplicates"),
    ],
)
def test_bad_input_raises(y_true, y_pred, kwargs, match):
    with pytest.raises(ValueError, match=match):
        classification_scores(np.array(y_true, dtype=object), np.array(y_pred, dtype=object), **kwargs)


def test_anndata_wrapper_reads_obs_and_changes_nothing():
    y_true, y_pred = noisy_labels(150, seed=9)
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical(y_true), "sct_cell_type": pd.Categorical(y_pred)},
        index=[f"c{i}" for i in range(150)],
    )
    obs.loc["c0", "cell_type"] = np.nan
    adata = AnnData(obs=obs)
    before = adata.obs.copy()
    report = classification_report(adata, "cell_type", "sct_cell_type", n_bootstrap=30)
    pd.testing.assert_frame_equal(adata.obs, before)
    assert report.n_cells == 149
    expected = classification_scores(y_true[1:], y_pred[1:], n_bootstrap=30)
    pd.testing.assert_frame_equal(report.summary, expected.summary)
    with pytest.raises(KeyError, match=r"pred_key='nope'.*available: cell_type, sct_cell_type"):
        classification_report(adata, "cell_type", "nope")
    with pytest.raises(KeyError, match="true_key='truth'"):
        classification_report(adata, "truth", "sct_cell_type")


def test_missing_labels_in_a_plain_list_are_dropped_like_in_a_series():
    y_true = ["a", "b", "a", np.nan, "b"]
    y_pred = ["a", "b", "b", "a", "b"]
    from_list = classification_scores(y_true, y_pred, n_bootstrap=0)
    from_series = classification_scores(pd.Series(y_true), pd.Series(y_pred), n_bootstrap=0)
    assert from_list.n_cells == from_series.n_cells == 4
    assert list(from_list.per_class.index) == ["a", "b"]
    pd.testing.assert_frame_equal(from_list.summary, from_series.summary)


def test_bootstrap_macro_f1_skips_classes_a_resample_did_not_draw():
    # naive reference: each resample scored by sklearn over the labels it holds (truly or predicted)
    rng = np.random.default_rng(3)
    y_true = np.array(["a"] * 60 + ["b"] * 40 + ["c"] * 2)
    y_pred = np.where(rng.random(len(y_true)) < 0.85, y_true, rng.choice(["a", "b"], len(y_true)))
    report = classification_scores(y_true, y_pred, n_bootstrap=300, seed=11)
    cells = np.random.default_rng(11).integers(0, len(y_true), size=(300, len(y_true)))
    expected, c_f1 = [], []
    for rows in cells:
        held = sorted(set(y_true[rows]) | set(y_pred[rows]))
        expected.append(f1_score(y_true[rows], y_pred[rows], labels=held, average="macro", zero_division=0))
        if "c" in held:
            c_f1.append(f1_score(y_true[rows], y_pred[rows], labels=["c"], average="macro", zero_division=0))
    low, high = np.quantile(expected, [0.025, 0.975])
    assert report.summary.loc["macro_f1", "ci_low"] == pytest.approx(low)
    assert report.summary.loc["macro_f1", "ci_high"] == pytest.approx(high)
    assert report.per_class.loc["c", "f1_ci_low"] == pytest.approx(np.quantile(c_f1, 0.025))
    # a perfect classifier is certain, rare class or not
    perfect = classification_scores(y_true, y_true, n_bootstrap=300)
    assert perfect.summary.loc["macro_f1", "ci_low"] == 1.0
    assert (perfect.per_class["f1_ci_low"] == 1.0).all()


@pytest.mark.parametrize(
    "true",
    [
        pytest.param(lambda codes: codes.astype(np.int64), id="int64"),
        pytest.param(lambda codes: pd.Categorical(codes.astype(np.int64)), id="int-categorical"),
        pytest.param(lambda codes: pd.Categorical(codes.astype(np.float64)), id="float-categorical"),
    ],
)
def test_anndata_wrapper_compares_numeric_labels_as_the_model_encodes_them(true):
    # a model trained on a numeric column stores its categories as strings (str(value)), so
    # tl.predict writes "0", "1", ... (or "0.0", ... for floats) next to the numbers
    rng = np.random.default_rng(4)
    codes = rng.integers(0, 3, size=120)
    right = rng.random(120) < 0.7
    predicted_codes = np.where(right, codes, rng.integers(0, 3, size=120))
    y_true = pd.Series(true(codes))
    as_model = [str(v) for v in y_true.astype(object)]
    categories = sorted(set(as_model))
    y_pred = pd.Categorical([categories[c] for c in predicted_codes], categories=categories)
    obs = pd.DataFrame({"label": y_true.to_numpy(), "sct_label": y_pred}, index=[f"c{i}" for i in range(120)])
    if isinstance(obs["label"].dtype, pd.CategoricalDtype):
        obs.loc["c0", "label"] = np.nan  # a cell without a label is dropped
    adata = AnnData(obs=obs)
    before = adata.obs.copy()

    report = classification_report(adata, "label", "sct_label", n_bootstrap=0)

    pd.testing.assert_frame_equal(adata.obs, before)
    known = adata.obs["label"].notna().to_numpy()
    expected = (predicted_codes == codes)[known].mean()
    assert report.n_cells == known.sum()
    assert report.summary.loc["accuracy", "value"] == pytest.approx(expected)
    assert list(report.per_class.index) == categories
    # labels are given as the column holds them
    numbers = list(pd.Series(y_true).dropna().astype(object).unique()[:2])
    subset = classification_report(adata, "label", "sct_label", labels=numbers, n_bootstrap=0)
    assert list(subset.per_class.index) == [str(v) for v in numbers]
    assert (subset.per_class["support"] > 0).all()


def _integers_made_float(seed=0, n=200, n_classes=4):
    """Integer labels with a missing value (so pandas holds them as floats) and the predictions of a
    model trained on the integers (named "0", "1", ... as observed_categories names integers)."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, n_classes, n)
    model_categories = observed_categories(pd.Series(codes))
    predicted = np.where(rng.random(n) < 0.8, codes, rng.integers(0, n_classes, n))
    obs = pd.DataFrame(index=[f"c{i}" for i in range(n)])
    obs["label"] = codes.astype(float)
    obs.loc[obs.index[:20], "label"] = np.nan
    obs["sct_label"] = pd.Categorical([model_categories[c] for c in predicted], categories=model_categories)
    return AnnData(obs=obs), codes, predicted


def test_anndata_wrapper_matches_integers_made_float_by_a_missing_label_with_their_predictions():
    adata, codes, predicted = _integers_made_float()
    assert adata.obs["label"].dtype == np.float64
    before = adata.obs.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = classification_report(adata, "label", "sct_label", n_bootstrap=0)
    pd.testing.assert_frame_equal(adata.obs, before)
    assert report.n_cells == 180
    assert report.summary.loc["accuracy", "value"] == pytest.approx((predicted == codes)[20:].mean())
    assert list(report.per_class.index) == ["0", "1", "2", "3"]
    expected = classification_scores(codes[20:].astype(str), predicted[20:].astype(str), n_bootstrap=0)
    pd.testing.assert_frame_equal(report.summary, expected.summary)
    # labels given as the column holds them (floats) or as integers
    for labels in ([1.0, 3.0], [1, 3], ["1", "3"]):
        subset = classification_report(adata, "label", "sct_label", labels=labels, n_bootstrap=0)
        assert list(subset.per_class.index) == ["1", "3"]
        assert (subset.per_class["support"] > 0).all()


def test_anndata_wrapper_keeps_float_names_where_the_predictions_use_them():
    adata, codes, predicted = _integers_made_float(seed=1)
    adata.obs["sct_label"] = pd.Categorical([f"{c}.0" for c in predicted])  # a model trained on floats
    report = classification_report(adata, "label", "sct_label", n_bootstrap=0)
    assert list(report.per_class.index) == ["0.0", "1.0", "2.0", "3.0"]
    assert report.summary.loc["accuracy", "value"] == pytest.approx((predicted == codes)[20:].mean())
    adata.obs["label"] += 0.5  # not whole numbers: never named as integers
    adata.obs["sct_label"] = pd.Categorical([f"{c}" for c in predicted])
    with pytest.warns(UserWarning, match="none of the predicted labels"):
        report = classification_report(adata, "label", "sct_label", n_bootstrap=0)
    assert list(report.per_class.index) == ["0.5", "1.5", "2.5", "3.5"]


def _integer_truth_and_predictions(names: str) -> tuple[np.ndarray, AnnData]:
    """60 cells with integer labels 0-2 and predictions of the same codes named by ``names`` (a format)."""
    codes = np.random.default_rng(2).integers(0, 3, 60)
    obs = pd.DataFrame(
        {"label": codes, "sct_label": pd.Categorical([names.format(c) for c in codes])},
        index=[f"c{i}" for i in range(60)],
    )
    return codes, AnnData(obs=obs)


def test_anndata_wrapper_matches_integer_labels_with_the_float_names_of_predictions():
    # the other way round: a model trained on floats predicts "0.0", the truth is integers
    _, adata = _integer_truth_and_predictions("{}.0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "none of the predicted labels is a true label"
        report = classification_report(adata, "label", "sct_label", n_bootstrap=0)
    assert report.summary.loc["accuracy", "value"] == 1
    assert list(report.per_class.index) == ["0.0", "1.0", "2.0"]


def test_anndata_wrapper_warns_when_no_predicted_label_is_a_true_label():
    codes, adata = _integer_truth_and_predictions("type_{}")
    message = (
        r"none of the predicted labels in adata.obs\['sct_label'\] \('type_0', 'type_1', 'type_2'\) is a "
        r"true label of adata.obs\['label'\] \('0', '1', '2'\), so every prediction counts as wrong.*rename"
    )
    with pytest.warns(UserWarning, match=message):
        report = classification_report(adata, "label", "sct_label", n_bootstrap=0)
    assert report.summary.loc["accuracy", "value"] == 0
    adata.obs["sct_label"] = pd.Categorical(codes.astype(str))  # some predictions right: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        classification_report(adata, "label", "sct_label", n_bootstrap=0)


@pytest.mark.parametrize("label", ["NK", "B cell"])
def test_a_single_string_is_one_label(label):
    y_true = ["NK", "NK", "B cell", "T", "B cell"]
    y_pred = ["NK", "NK", "B cell", "B cell", "T"]
    report = classification_scores(y_true, y_pred, labels=label, n_bootstrap=0)
    expected = classification_scores(y_true, y_pred, labels=[label], n_bootstrap=0)
    assert list(report.per_class.index) == [label]
    pd.testing.assert_frame_equal(report.summary, expected.summary)
    pd.testing.assert_frame_equal(report.per_class, expected.per_class)
    adata = AnnData(obs=pd.DataFrame({"t": y_true, "p": y_pred}, index=[f"c{i}" for i in range(5)]))
    from_obs = classification_report(adata, "t", "p", labels=label, n_bootstrap=0)
    pd.testing.assert_frame_equal(from_obs.per_class, expected.per_class)


def test_missing_predictions_of_every_kind_are_one_wrong_value():
    y_true = np.array(["a", "b", "b", "a", "a", "b"], dtype=object)
    y_pred = np.array(["a", "b", pd.NaT, None, np.nan, pd.NA], dtype=object)
    true_codes, pred_codes, n_classes = _encode(y_true, y_pred, ["a", "b"])
    np.testing.assert_array_equal(true_codes, [0, 1, 1, 0, 0, 1])
    np.testing.assert_array_equal(pred_codes, [0, 1, 2, 2, 2, 2])
    assert n_classes == 3
    report = classification_scores(y_true, y_pred, n_bootstrap=20)
    assert report.summary.loc["accuracy", "value"] == pytest.approx(2 / 6)
    same = classification_scores(
        y_true, np.array(["a", "b", None, None, None, None], dtype=object), n_bootstrap=20
    )
    pd.testing.assert_frame_equal(report.summary, same.summary)
