"""Pure functions (arrays in, numbers out): classification and integration metrics, probes and baselines."""

from ._baselines import annotation_baselines
from ._classification import (
    ClassificationReport,
    classification_report,
    classification_scores,
    expected_calibration_error,
)
from ._integration import integration
from ._probes import knn_probe_accuracy, log1p_normalise, logistic_regression_baseline
from ._retrieval import cross_modal_retrieval, retrieval_ranks

__all__ = [
    "ClassificationReport",
    "annotation_baselines",
    "classification_report",
    "classification_scores",
    "cross_modal_retrieval",
    "expected_calibration_error",
    "integration",
    "knn_probe_accuracy",
    "log1p_normalise",
    "logistic_regression_baseline",
    "retrieval_ranks",
]
