"""Evaluations of frozen CAPI features: k-NN and linear (logistic-regression) classification."""

from capi_lab.evaluation.classification import knn_accuracy, knn_predict, linear_accuracy

__all__ = ["knn_accuracy", "knn_predict", "linear_accuracy"]
