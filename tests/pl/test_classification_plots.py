from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import warnings

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from anndata import AnnData
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from sklearn.metrics import confusion_matrix as sklearn_confusion_matrix

import sctransformer as sct
from sctransformer.metrics import expected_calibration_error

from ..conftest import fingerprint


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


@pytest.fixture
def predicted():
    rng = np.random.default_rng(0)
    n = 200
    categories = ["T cell", "B cell", "NK"]  # not alphabetical: the plot keeps this order
    truth = rng.choice(categories, size=n)
    confidence = rng.uniform(0.3, 1.0, size=n)
    right = rng.random(n) < confidence
    pred = np.where(right, truth, rng.choice(categories, size=n)).astype(object)
    pred[:7] = "unknown"
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(truth, categories=categories),
            "sct_cell_type": pd.Categorical(pred, categories=[*categories, "unknown"]),
            "sct_cell_type_confidence": confidence,
        },
        index=[f"c{i}" for i in range(n)],
    )
    obs.loc["c10", "cell_type"] = np.nan
    return AnnData(obs=obs)


@pytest.mark.parametrize("normalize", ["true", "pred", "all", None])
def test_confusion_matrix_shows_sklearns_matrix_in_category_order(predicted, normalize):
    before = fingerprint(predicted)
    ax = sct.pl.confusion_matrix(predicted, "cell_type", "sct_cell_type", normalize=normalize, show=False)
    assert isinstance(ax, Axes)
    assert fingerprint(predicted) == before
    rows = ["T cell", "B cell", "NK"]
    columns = [*rows, "unknown"]
    assert [t.get_text() for t in ax.get_yticklabels()] == rows
    assert [t.get_text() for t in ax.get_xticklabels()] == columns
    known = predicted.obs["cell_type"].notna().to_numpy()
    y_true = predicted.obs["cell_type"].astype(object)[known]
    y_pred = predicted.obs["sct_cell_type"].astype(object)[known]
    expected = sklearn_confusion_matrix(y_true, y_pred, labels=columns, normalize=normalize)[:3]
    np.testing.assert_allclose(np.asarray(ax.images[0].get_array()), expected)
    texts = [t.get_text() for t in ax.texts]
    assert len(texts) == expected.size
    assert texts[0] == (f"{expected[0, 0]:.2f}" if normalize else str(int(expected[0, 0])))
    assert len(ax.figure.axes) == 2  # the colorbar


def test_confusion_matrix_return_rule_and_options(predicted):
    fig = sct.pl.confusion_matrix(predicted, "cell_type", "sct_cell_type", annotate=False, return_fig=True)
    assert isinstance(fig, Figure) and len(fig.axes[0].texts) == 0
    _, ax = plt.subplots()
    assert sct.pl.confusion_matrix(predicted, "cell_type", "sct_cell_type", ax=ax, show=False) is ax
    assert sct.pl.confusion_matrix(predicted, "cell_type", "sct_cell_type", show=True) is None
    with pytest.raises(ValueError, match="normalize"):
        sct.pl.confusion_matrix(predicted, "cell_type", "sct_cell_type", normalize="rows")
    with pytest.raises(KeyError, match=r"pred_key='sct_tissue'.*available"):
        sct.pl.confusion_matrix(predicted, "cell_type", "sct_tissue")
    with pytest.raises(KeyError, match="true_key='tissue'"):
        sct.pl.confusion_matrix(predicted, "tissue", "sct_cell_type")


def test_calibration_draws_accuracy_per_bin_and_the_ece_in_the_title(predicted):
    before = fingerprint(predicted)
    ax = sct.pl.calibration(predicted, "cell_type", "sct_cell_type", n_bins=5, show=False)
    assert isinstance(ax, Axes)
    assert fingerprint(predicted) == before
    # without .obsm["sct_cell_type_probs"], cells labelled "unknown" are left out
    known = (
        predicted.obs["cell_type"].notna().to_numpy()
        & (predicted.obs["sct_cell_type"] != "unknown").to_numpy()
    )
    obs = predicted.obs[known]
    confidence = obs["sct_cell_type_confidence"].to_numpy()
    correct = obs["cell_type"].astype(object).to_numpy() == obs["sct_cell_type"].astype(object).to_numpy()
    ece = expected_calibration_error(confidence, correct, n_bins=5)
    assert f"{ece:.3f}" in ax.get_title()
    bars = {c.get_label(): np.array([p.get_height() for p in c]) for c in ax.containers}
    share, accuracy = bars["share of cells"], bars["accuracy"]
    assert share.sum() == pytest.approx(1.0)
    edges = np.linspace(0, 1, 6)
    for b, height in zip(np.flatnonzero(share > 0), accuracy, strict=True):
        inside = (confidence > edges[b]) & (confidence <= edges[b + 1])
        assert height == pytest.approx(correct[inside].mean())
    assert any(np.allclose(line.get_xdata(), [0, 1]) for line in ax.get_lines())  # the diagonal


def test_calibration_return_rule_and_missing_keys(predicted):
    fig = sct.pl.calibration(predicted, "cell_type", "sct_cell_type", return_fig=True)
    assert isinstance(fig, Figure)
    predicted.obs["score"] = predicted.obs["sct_cell_type_confidence"]
    ax = sct.pl.calibration(predicted, "cell_type", "sct_cell_type", confidence_key="score", show=False)
    assert "score" in ax.get_xlabel()
    predicted.obs.loc["c3", "score"] = np.nan  # no prediction: left out
    ax = sct.pl.calibration(predicted, "cell_type", "sct_cell_type", confidence_key="score", show=False)
    share = next(c for c in ax.containers if c.get_label() == "share of cells")
    assert sum(p.get_height() for p in share) == pytest.approx(1.0)
    adata = predicted[:, :].copy()
    del adata.obs["sct_cell_type_confidence"]
    with pytest.raises(KeyError, match=r"sct_cell_type_confidence.*sct\.tl\.predict"):
        sct.pl.calibration(adata, "cell_type", "sct_cell_type")
    with pytest.raises(KeyError, match="pred_key='nope'"):
        sct.pl.calibration(adata, "cell_type", "nope", confidence_key="score")


@pytest.fixture
def numeric():
    """Integer labels next to the strings that a model trained on them predicts ("0", "1", "2")."""
    rng = np.random.default_rng(5)
    n = 150
    codes = rng.integers(0, 3, size=n)
    confidence = rng.uniform(0.3, 1.0, size=n)
    predicted_codes = np.where(rng.random(n) < confidence, codes, rng.integers(0, 3, size=n))
    obs = pd.DataFrame(
        {
            "label": codes,
            "sct_label": pd.Categorical(predicted_codes.astype(str), categories=["0", "1", "2"]),
            "sct_label_confidence": confidence,
        },
        index=[f"c{i}" for i in range(n)],
    )
    return AnnData(obs=obs), codes, predicted_codes


def test_confusion_matrix_matches_integer_labels_with_their_predictions(numeric):
    adata, codes, predicted_codes = numeric
    ax = sct.pl.confusion_matrix(adata, "label", "sct_label", normalize=None, show=False)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "1", "2"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "2"]  # no second "0", "1", "2"
    expected = sklearn_confusion_matrix(codes, predicted_codes, labels=[0, 1, 2])
    np.testing.assert_array_equal(np.asarray(ax.images[0].get_array()), expected)


def test_calibration_matches_integer_labels_with_their_predictions(numeric):
    adata, codes, predicted_codes = numeric
    ax = sct.pl.calibration(adata, "label", "sct_label", n_bins=5, show=False)
    ece = expected_calibration_error(adata.obs["sct_label_confidence"], codes == predicted_codes, n_bins=5)
    assert ax.get_title() == f"ECE = {ece:.3f}"


def test_calibration_scores_the_most_probable_label_of_cells_labelled_unknown():
    rng = np.random.default_rng(6)
    n, categories = 300, ["T cell", "B cell", "NK"]
    logits = rng.normal(size=(n, 3)) * 2
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    best = probabilities.argmax(axis=1)
    truth = np.where(rng.random(n) < probabilities.max(axis=1), best, rng.integers(0, 3, size=n))
    confidence = probabilities.max(axis=1)
    labels = np.array(categories, dtype=object)
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical(labels[truth], categories=categories)}, index=[f"c{i}" for i in range(n)]
    )
    plain = AnnData(obs=obs.assign(sct_cell_type=pd.Categorical(labels[best], categories=categories)))
    plain.obs["sct_cell_type_confidence"] = confidence
    # as tl.predict(min_confidence=0.6) writes it: same confidences, "unknown" below 0.6, the probabilities
    unknown = confidence < 0.6
    assert 0 < unknown.sum() < n
    thresholded = plain.copy()
    thresholded.obs["sct_cell_type"] = pd.Categorical(
        np.where(unknown, "unknown", labels[best]), categories=[*categories, "unknown"]
    )
    thresholded.obsm["sct_cell_type_probs"] = pd.DataFrame(
        probabilities, index=thresholded.obs_names, columns=categories
    )

    def drawn(adata):
        ax = sct.pl.calibration(adata, "cell_type", "sct_cell_type", n_bins=5, show=False)
        bars = {c.get_label(): [p.get_height() for p in c] for c in ax.containers}
        return ax.get_title(), bars

    title, bars = drawn(thresholded)
    assert (title, bars) == drawn(plain)  # "unknown" does not make a confident prediction wrong
    assert title == f"ECE = {expected_calibration_error(confidence, truth == best, n_bins=5):.3f}"

    # without the probabilities the cells labelled "unknown" are left out
    del thresholded.obsm["sct_cell_type_probs"]
    title, bars = drawn(thresholded)
    kept = ~unknown
    ece = expected_calibration_error(confidence[kept], (truth == best)[kept], n_bins=5)
    assert title == f"ECE = {ece:.3f}"
    assert sum(bars["share of cells"]) == pytest.approx(1.0)


def test_calibration_bins_by_default_as_the_calibration_error(predicted):
    ax = sct.pl.calibration(predicted, "cell_type", "sct_cell_type", show=False)
    share = next(c for c in ax.containers if c.get_label() == "share of cells")
    assert len(share) == 15
    known = (
        predicted.obs["cell_type"].notna().to_numpy()
        & (predicted.obs["sct_cell_type"] != "unknown").to_numpy()
    )
    obs = predicted.obs[known]
    correct = obs["cell_type"].astype(object).to_numpy() == obs["sct_cell_type"].astype(object).to_numpy()
    ece = expected_calibration_error(obs["sct_cell_type_confidence"].to_numpy(), correct)  # its default bins
    assert ax.get_title() == f"ECE = {ece:.3f}"


def test_calibration_after_predict_with_min_confidence_equals_the_plain_one(trained):
    model, data = trained
    adata = data.copy()
    sct.tl.predict(adata, model)
    plain = sct.pl.calibration(adata, "cell_type", "sct_cell_type", show=False).get_title()
    sct.tl.predict(adata, model, min_confidence=0.9)
    assert (adata.obs["sct_cell_type"] == "unknown").any()
    assert sct.pl.calibration(adata, "cell_type", "sct_cell_type", show=False).get_title() == plain


@pytest.mark.parametrize(
    ("categories", "columns", "record"),
    [
        # as tl.predict stores them: names .h5ad can hold, the exact ones in the run record
        (
            ["CD4+/CD25 T Reg", "CD4+_CD25 T Reg", "CD14+ Monocyte"],
            ["CD4+_CD25 T Reg_2", "CD4+_CD25 T Reg", "CD14+ Monocyte"],
            True,
        ),
        # without the record (ad.concat drops .uns): a column is the label with its stored name
        (
            ["CD4+/CD45RA+/CD25- Naive T", "CD8+/CD45RA+ Naive Cytotoxic", "CD14+ Monocyte"],
            ["CD4+_CD45RA+_CD25- Naive T", "CD8+_CD45RA+ Naive Cytotoxic", "CD14+ Monocyte"],
            False,
        ),
    ],
)
def test_calibration_scores_labels_with_slashes_from_probabilities_under_writable_names(
    categories, columns, record
):
    rng = np.random.default_rng(8)
    n = 300
    logits = rng.normal(size=(n, 3)) * 2
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    best, confidence = probabilities.argmax(axis=1), probabilities.max(axis=1)
    truth = np.where(rng.random(n) < confidence, best, rng.integers(0, 3, size=n))
    labels = np.array(categories, dtype=object)
    adata = AnnData(
        obs=pd.DataFrame(
            {
                "cell_type": pd.Categorical(labels[truth], categories=categories),
                "sct_cell_type": pd.Categorical(
                    np.where(confidence < 0.6, "unknown", labels[best]), categories=[*categories, "unknown"]
                ),
                "sct_cell_type_confidence": confidence,
            },
            index=[f"c{i}" for i in range(n)],
        )
    )
    adata.obsm["sct_cell_type_probs"] = pd.DataFrame(probabilities, index=adata.obs_names, columns=columns)
    if record:
        adata.uns["sct"] = {
            "sct": {
                "function": "predict",
                "params": {"phenotypes": ["cell_type"]},
                "categories": {"cell_type": np.array(categories, dtype=object)},  # as read from .h5ad
            }
        }
    before = fingerprint(adata)
    ax = sct.pl.calibration(adata, "cell_type", "sct_cell_type", n_bins=5, show=False)
    assert fingerprint(adata) == before
    assert ax.get_title() == f"ECE = {expected_calibration_error(confidence, truth == best, n_bins=5):.3f}"


@pytest.fixture
def integers_made_float(numeric):
    """``numeric`` with the first 15 labels missing: pandas holds the integers as floats (0.0, 1.0)."""
    adata, codes, predicted_codes = numeric
    adata.obs["label"] = adata.obs["label"].astype(float)
    adata.obs.loc[adata.obs_names[:15], "label"] = np.nan
    return adata, codes, predicted_codes


def test_confusion_matrix_matches_integers_made_float_with_their_predictions(integers_made_float):
    adata, codes, predicted_codes = integers_made_float
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ax = sct.pl.confusion_matrix(adata, "label", "sct_label", normalize=None, show=False)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "1", "2"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "2"]  # no "0.0" next to "0"
    expected = sklearn_confusion_matrix(codes[15:], predicted_codes[15:], labels=[0, 1, 2])
    np.testing.assert_array_equal(np.asarray(ax.images[0].get_array()), expected)


def test_calibration_matches_integers_made_float_with_their_predictions(integers_made_float):
    adata, codes, predicted_codes = integers_made_float
    ax = sct.pl.calibration(adata, "label", "sct_label", n_bins=5, show=False)
    confidence = adata.obs["sct_label_confidence"].to_numpy()[15:]
    ece = expected_calibration_error(confidence, (codes == predicted_codes)[15:], n_bins=5)
    assert ax.get_title() == f"ECE = {ece:.3f}"
    # from the probabilities too, whose columns are the model's categories
    probabilities = np.random.default_rng(8).dirichlet(np.ones(3), size=len(codes))
    adata.obsm["sct_label_probs"] = pd.DataFrame(
        probabilities, index=adata.obs_names, columns=["0", "1", "2"]
    )
    adata.obs["sct_label_confidence"] = probabilities.max(1)
    ax = sct.pl.calibration(adata, "label", "sct_label", n_bins=5, show=False)
    best = probabilities.argmax(1)
    ece = expected_calibration_error(probabilities.max(1)[15:], (codes == best)[15:], n_bins=5)
    assert ax.get_title() == f"ECE = {ece:.3f}"


def test_confusion_matrix_warns_when_no_predicted_label_is_a_true_label(numeric):
    adata, _, predicted_codes = numeric
    adata.obs["sct_label"] = pd.Categorical([f"type_{c}" for c in predicted_codes])  # another model's names
    with pytest.warns(UserWarning, match=r"none of the predicted labels in adata.obs\['sct_label'\]"):
        sct.pl.confusion_matrix(adata, "label", "sct_label", show=False)


def test_cells_without_a_prediction_get_a_column_apart_from_a_label_named_na():
    obs = pd.DataFrame(
        {"t": ["NA", "NA", "A", "A", "B"], "p": [np.nan, "A", np.nan, "A", "B"]}, index=list("abcde")
    )
    ax = sct.pl.confusion_matrix(AnnData(obs=obs), "t", "p", normalize=None, show=False)
    columns = [t.get_text() for t in ax.get_xticklabels()]
    assert columns == ["A", "B", "NA", "NA (no prediction)"]
    # true "NA" without a prediction is not a correct "NA" prediction
    np.testing.assert_array_equal(ax.images[0].get_array(), [[1, 0, 0, 1], [0, 1, 0, 0], [1, 0, 0, 1]])
    obs = pd.DataFrame({"t": ["A", "A", "B", "B"], "p": ["NA", np.nan, "B", "B"]}, index=list("abcd"))
    ax = sct.pl.confusion_matrix(AnnData(obs=obs), "t", "p", normalize=None, show=False)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["A", "B", "NA", "NA (no prediction)"]
    np.testing.assert_array_equal(ax.images[0].get_array(), [[0, 0, 1, 1], [0, 2, 0, 0]])


def test_annotations_switch_to_white_in_the_upper_half_of_the_colour_scale():
    # recall 0.4 everywhere: on the 0-1 scale of normalize="true", 0.4 is light and takes black text
    true = np.repeat(list("ABCD"), 5)
    pred = np.array([t if i < 2 else "ABCD"[("ABCD".index(t) + 1) % 4] for t in "ABCD" for i in range(5)])
    ax = sct.pl.confusion_matrix(AnnData(obs=pd.DataFrame({"t": true, "p": pred})), "t", "p", show=False)
    colours = {text.get_text(): text.get_color() for text in ax.texts}
    assert colours["0.40"] == "black" and colours["0.60"] == "white"
