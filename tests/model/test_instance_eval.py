"""ScanNet's instance AP and semantic mIoU on hand-made cases whose figures are worked out by
hand from the rules of evaluate_semantic_instance.py and evaluate_semantic_label.py (stated in
model/instance_eval.py and model/metrics.py).

The room of every case: 1000 vertices; wall 0-399 (NYU40 1, void for instances), chair A
400-599 and chair B 600-799 (NYU40 5), table 800-999 (NYU40 7). Only chair and table have
ground truth, so AP, AP50, AP25 are means over those two classes.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from model.instance_eval import (
    INSTANCE_CLASS_IDS,
    IOU_THRESHOLDS,
    InstanceEvaluator,
    average_precision,
    encode_ground_truth,
)
from model.metrics import class_iou, confusion_matrix, mean_iou

WALL, CHAIR, SOFA, TABLE = 1, 5, 6, 7  # NYU40 ids
CHAIR_A, CHAIR_B, TABLE_VERTICES = np.arange(400, 600), np.arange(600, 800), np.arange(800, 1000)
WALL_VERTICES = np.arange(400)


def room_ground_truth() -> np.ndarray:
    semantic = np.repeat([0, 4, 4, 6], [400, 200, 200, 200])  # benchmark classes
    instance = np.repeat([0, 1, 2, 3], [400, 200, 200, 200])
    return encode_ground_truth(semantic, instance)


def mask(*vertex_sets: np.ndarray) -> np.ndarray:
    out = np.zeros(1000, dtype=bool)
    for vertices in vertex_sets:
        out[vertices] = True
    return out


def score(predictions: list[tuple[np.ndarray, int, float]]) -> dict:
    evaluator = InstanceEvaluator()
    evaluator.add(room_ground_truth(), [p[0] for p in predictions], [p[1] for p in predictions],
                  [p[2] for p in predictions])
    return evaluator.result()


TABLE_RIGHT = (mask(TABLE_VERTICES), TABLE, 0.7)


def test_ground_truth_encoding_is_scannets():
    ids = room_ground_truth()
    assert ids[0] == 1 * 1000 + 1 and ids[400] == 5002 and ids[600] == 5003 and ids[999] == 7004
    assert encode_ground_truth(np.array([-100, 4]), np.array([-1, -1])).tolist() == [0, 5000]
    with pytest.raises(ValueError, match="999"):
        encode_ground_truth(np.array([4]), np.array([999]))


def test_nine_thresholds_from_half_to_nine_tenths():
    assert len(IOU_THRESHOLDS) == 9
    assert IOU_THRESHOLDS[0] == 0.5 and IOU_THRESHOLDS[-1] == pytest.approx(0.9)
    assert len(INSTANCE_CLASS_IDS) == 18 and WALL not in INSTANCE_CLASS_IDS


def test_perfect_prediction_scores_one():
    result = score([(mask(CHAIR_A), CHAIR, 0.9), (mask(CHAIR_B), CHAIR, 0.8), TABLE_RIGHT])
    assert result["ap"] == result["ap50"] == result["ap25"] == 1.0
    assert result["classes"][CHAIR] == {"ap": 1.0, "ap50": 1.0, "ap25": 1.0}
    assert math.isnan(result["classes"][SOFA]["ap"])  # no ground truth: left out


def test_false_positive_with_the_top_score():
    # chair: FP 0.95 (a chair mask on the table: not void, so it counts), TPs 0.9 and 0.8.
    # Points (ascending score): 0.8: P 2/3 R 1; 0.9: P 1/2 R 1/2; 0.95: P 0 R 0; artificial
    # P 1 R 0. Midpoint widths .25 .5 .25 0: AP = 2/3 * .25 + 1/2 * .5 = 5/12 (an envelope
    # would give 2/3).
    result = score([(mask(TABLE_VERTICES[:150]), CHAIR, 0.95), (mask(CHAIR_A), CHAIR, 0.9),
                    (mask(CHAIR_B), CHAIR, 0.8), TABLE_RIGHT])
    chair = result["classes"][CHAIR]
    assert chair["ap50"] == pytest.approx(5 / 12) and chair["ap25"] == pytest.approx(5 / 12)
    assert chair["ap"] == pytest.approx(5 / 12)
    assert result["ap50"] == pytest.approx((5 / 12 + 1) / 2)


def test_split_at_iou_exactly_one_half():
    # chair A predicted as two halves (IoU 100/200 = 0.5 each; 0.9 and 0.8), chair B right (0.7).
    # IoU > 0.5 is strict: at 0.5 and above chair A is missed and both halves are FPs:
    # 0.7: P 1/3 R 1/2; 0.8 and 0.9: P 0 R 0 -> AP 1/3 * 1/4 = 1/12.
    # At 0.25 chair A takes the 0.9 half; the 0.8 half is a second match: an FP at 0.8.
    # 0.7: P 2/3 R 1; 0.8: P 1/2 R 1/2; 0.9: P 1 R 1/2; widths .25 each -> 19/24.
    result = score([(mask(CHAIR_A[:100]), CHAIR, 0.9), (mask(CHAIR_A[100:]), CHAIR, 0.8),
                    (mask(CHAIR_B), CHAIR, 0.7), TABLE_RIGHT])
    chair = result["classes"][CHAIR]
    assert chair["ap50"] == pytest.approx(1 / 12) and chair["ap"] == pytest.approx(1 / 12)
    assert chair["ap25"] == pytest.approx(19 / 24)
    assert result["ap25"] == pytest.approx((19 / 24 + 1) / 2)


def test_false_positive_on_the_wall_is_ignored():
    right = [(mask(CHAIR_A), CHAIR, 0.9), (mask(CHAIR_B), CHAIR, 0.8), TABLE_RIGHT]
    # all on void (the wall): more than any threshold of its vertices -> neither way
    on_wall = score([(mask(WALL_VERTICES[:150]), CHAIR, 0.95)] + right)
    assert on_wall["classes"][CHAIR] == {"ap": 1.0, "ap50": 1.0, "ap25": 1.0}
    # half on the wall, half on the table: ignored fraction 0.5 is not above 0.5 (an FP at
    # 0.5..0.9, 5/12 as above) but above 0.25 (ignored there)
    half = score([(mask(WALL_VERTICES[:100], TABLE_VERTICES[:100]), CHAIR, 0.95)] + right)
    assert half["classes"][CHAIR]["ap50"] == pytest.approx(5 / 12)
    assert half["classes"][CHAIR]["ap25"] == 1.0


def test_masks_under_100_vertices_are_dropped():
    right = [(mask(CHAIR_A), CHAIR, 0.9), (mask(CHAIR_B), CHAIR, 0.8), TABLE_RIGHT]
    dropped = score([(mask(TABLE_VERTICES[:99]), CHAIR, 0.95)] + right)
    assert dropped["classes"][CHAIR]["ap50"] == 1.0
    kept = score([(mask(TABLE_VERTICES[:100]), CHAIR, 0.95)] + right)
    assert kept["classes"][CHAIR]["ap50"] == pytest.approx(5 / 12)
    # a prediction that is right but under 100 vertices is no prediction: chair has ground
    # truth and nothing predicted -> AP 0
    small_truth = np.repeat([0, 4], [900, 100])
    ids = encode_ground_truth(small_truth, np.repeat([0, 1], [900, 100]))
    evaluator = InstanceEvaluator()
    evaluator.add(ids, [np.r_[np.zeros(901, bool), np.ones(99, bool)]], [CHAIR], [0.9])
    assert evaluator.result()["classes"][CHAIR]["ap50"] == 0.0


def test_ground_truth_under_100_vertices_is_ignored_with_predictions_on_it():
    # chair B cut to 80 vertices (the rest: wall): ignored. A prediction covering it and 20
    # table vertices (100 vertices, 0.95): IoU 80/100 with the ignored instance, so below 0.8
    # it counts neither way; at 0.8, 0.85, 0.9 its IoU exceeds no threshold and its ignored
    # fraction, 0.8, does not exceed the threshold either: a false positive there.
    semantic = np.repeat([0, 4, 0, 4, 6], [400, 200, 120, 80, 200])
    instance = np.repeat([0, 1, 0, 2, 3], [400, 200, 120, 80, 200])
    ids = encode_ground_truth(semantic, instance)
    on_small = np.zeros(1000, bool)
    on_small[720:820] = True  # 80 of chair B, 20 of the table
    evaluator = InstanceEvaluator()
    evaluator.add(ids, [mask(CHAIR_A), on_small, mask(TABLE_VERTICES)], [CHAIR, CHAIR, TABLE],
                  [0.9, 0.95, 0.7])
    chair = evaluator.result()["classes"][CHAIR]
    # thresholds 0.5 .. 0.75 (six): AP 1; 0.8 .. 0.9 (three): the 0.95 FP on top: P 1/2 at
    # R 1 (0.9), P 0 R 0 (0.95): widths (1 - 0) / 2, (1 - 0) / 2, 0 -> 1/2 * 1/2 = 1/4
    assert chair["ap50"] == 1.0 and chair["ap25"] == 1.0
    assert chair["ap"] == pytest.approx((6 * 1.0 + 3 * 0.25) / 9)


def test_one_mask_over_two_instances():
    # chairs A and B in one mask (0.9): IoU 200/400 = 0.5 with each. At 0.5 and above no match:
    # both missed, the mask an FP -> AP 0. At 0.25 chair A (lower id) takes it; chair B finds
    # it taken and is missed; the mask matched, so no FP: P 1 R 1/2 -> AP 1/2.
    result = score([(mask(CHAIR_A, CHAIR_B), CHAIR, 0.9), TABLE_RIGHT])
    assert result["classes"][CHAIR] == {"ap": 0.0, "ap50": 0.0, "ap25": pytest.approx(0.5)}
    assert result["ap"] == pytest.approx(0.5) and result["ap25"] == pytest.approx(0.75)


def test_tied_scores_fall_together_in_any_order():
    # TP 0.8 (chair A), FP 0.8 (on the table), TP 0.5 (chair B): 0.5: P 2/3 R 1; 0.8: P 1/2
    # R 1/2; artificial: widths .25 .5 .25 -> 1/6 + 1/4 + 1/4 = 2/3.
    tp_a, fp, tp_b = ((mask(CHAIR_A), CHAIR, 0.8), (mask(TABLE_VERTICES[:150]), CHAIR, 0.8),
                      (mask(CHAIR_B), CHAIR, 0.5))
    for order in ([tp_a, fp, tp_b], [fp, tp_b, tp_a], [tp_b, tp_a, fp]):
        assert score(order + [TABLE_RIGHT])["classes"][CHAIR]["ap50"] == pytest.approx(2 / 3)
    # the FP just above or just below the TP gives another figure: ties are their own case
    above = (fp[0], CHAIR, 0.81)
    below = (fp[0], CHAIR, 0.79)
    assert score([tp_a, above, tp_b])["classes"][CHAIR]["ap50"] == pytest.approx(5 / 12)
    assert score([tp_a, below, tp_b])["classes"][CHAIR]["ap50"] == pytest.approx(19 / 24)


def test_class_predicted_but_absent_and_classes_not_scored():
    # a sofa (no sofa in the room) and a wall instance: sofa has no ground truth (NaN, left out
    # of the mean), wall is not an instance class (dropped); chair and table stay perfect
    result = score([(mask(CHAIR_A), CHAIR, 0.9), (mask(CHAIR_B), CHAIR, 0.8), TABLE_RIGHT,
                    (mask(TABLE_VERTICES), SOFA, 0.99), (mask(WALL_VERTICES), WALL, 0.99)])
    assert math.isnan(result["classes"][SOFA]["ap50"])
    assert result["ap"] == result["ap50"] == 1.0
    # a class with ground truth and no prediction has AP 0
    assert score([TABLE_RIGHT])["classes"][CHAIR]["ap50"] == 0.0
    assert score([TABLE_RIGHT])["ap50"] == pytest.approx(0.5)


def test_every_prediction_ignored_gives_zero_where_the_script_raises():
    # chair has ground truth and one prediction, all on the wall: nothing scored (ScanNet's
    # script raises IndexError here); AP 0, the formula with its artificial point alone
    assert score([(mask(WALL_VERTICES[:150]), CHAIR, 0.9), TABLE_RIGHT])["classes"][CHAIR][
        "ap50"] == 0.0
    assert average_precision(np.zeros(0), np.zeros(0, bool), 2) == 0.0


# ---------------------------------------------------------------------------- mIoU


def test_miou_counts_a_predicted_but_absent_class_as_zero():
    # 100 wall, 100 floor, 100 chair; half the chairs predicted sofa (absent): wall 1, floor 1,
    # chair 50/100, sofa 0/50 -> mean over four classes 0.625 (leaving sofa out: 0.833)
    target = torch.repeat_interleave(torch.tensor([0, 1, 4]), 100)
    prediction = target.clone()
    prediction[200:250] = 5
    confusion = confusion_matrix(prediction, target, 20)
    iou = class_iou(confusion)
    assert iou[5] == 0.0 and iou[4] == 0.5 and math.isnan(iou[3])  # class 3: TP+FP+FN = 0
    assert mean_iou(confusion) == pytest.approx(0.625)


def test_predictions_outside_the_classes_are_misses_and_no_ones_false_positive():
    # a (K, K+1) matrix: the last column is ScanNet's "unknown" (a NYU40 id outside the 20)
    target = torch.repeat_interleave(torch.tensor([0, 4]), 100)
    prediction = target.clone()
    prediction[150:] = 20  # unknown
    confusion = confusion_matrix(prediction, target, 21)[:20]
    iou = class_iou(confusion)
    assert iou[0] == 1.0 and iou[4] == 0.5
    assert mean_iou(confusion) == pytest.approx(0.75)
