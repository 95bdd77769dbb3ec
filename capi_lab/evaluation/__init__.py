"""Evaluations of frozen CAPI features: k-NN, linear and attentive classification, k-NN segmentation."""

from capi_lab.evaluation.attentive import AttentiveProbe, attentive_accuracy
from capi_lab.evaluation.classification import knn_accuracy, knn_predict, linear_accuracy

__all__ = ["AttentiveProbe", "attentive_accuracy", "knn_accuracy", "knn_predict", "linear_accuracy"]
