"""Pure functions (arrays in, numbers out): embedding probes and simple baselines."""

from ._probes import knn_probe_accuracy, log1p_normalise, logistic_regression_baseline

__all__ = ["knn_probe_accuracy", "log1p_normalise", "logistic_regression_baseline"]
