"""Semantic segmentation metrics from a confusion matrix: per-class IoU and mIoU."""

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
    """(K,) float64 IoU per class; NaN for a class absent from the target.

    A class that only occurs in the predictions has no IoU of its own (it is left out rather
    than counted as 0), but its false positives still lower the IoU of the true classes.
    """
    confusion = confusion.double()
    true_positive = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - true_positive
    present = confusion.sum(1) > 0
    return torch.where(present, true_positive / union.clamp_min(1), torch.nan)


def mean_iou(confusion: Tensor) -> float:
    """Mean IoU over the classes present in the target (NaN if no point is labelled)."""
    return float(class_iou(confusion).nanmean())
