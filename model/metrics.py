"""Semantic segmentation metrics from a confusion matrix: per-class IoU and mIoU, by the rules of
ScanNet's `evaluate_semantic_label.py`.

One confusion matrix is accumulated over every evaluated scene (never a mean of per-scene
IoUs); a class's IoU is TP / (TP + FP + FN); a class with TP + FP + FN = 0 (neither in the
ground truth nor predicted) has none and is left out of the mean; a class that is predicted but
absent from the ground truth has IoU 0. Predictions outside the K classes (ScanNet's "unknown")
are false negatives of the true class and no class's false positive.
"""

from __future__ import annotations

import torch
from torch import Tensor

from model.batch import IGNORE_INDEX


def confusion_matrix(prediction: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """(K, K) int64 counts, rows the true class, columns the predicted one.

    prediction, target: (P,) int64; points whose target is IGNORE_INDEX are left out.
    """
    labelled = target != IGNORE_INDEX
    index = target[labelled] * num_classes + prediction[labelled]
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def class_iou(confusion: Tensor) -> Tensor:
    """(K,) float64 IoU per class from a (K, K) or (K, K + 1) confusion matrix.

    Rows are the true classes, columns the predicted ones; a (K + 1)-th column counts points
    predicted as none of the K classes. IoU = TP / (TP + FP + FN); NaN where that denominator
    is 0. A class predicted but absent from the ground truth has IoU 0.
    """
    confusion = confusion.double()
    classes = confusion.shape[0]
    true_positive = confusion.diagonal()
    false_negative = confusion.sum(1) - true_positive
    false_positive = confusion[:, :classes].sum(0) - true_positive
    union = true_positive + false_positive + false_negative
    return torch.where(union > 0, true_positive / union.clamp_min(1), torch.nan)


def mean_iou(confusion: Tensor) -> float:
    """Mean IoU over the classes with TP + FP + FN > 0 (NaN if there is none)."""
    return float(class_iou(confusion).nanmean())
