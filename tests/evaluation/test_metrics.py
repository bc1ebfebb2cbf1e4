"""The one segmentation metric: both label conventions, hand-computed cases and scikit-learn's numbers."""

import numpy as np
import pytest
import sklearn.metrics
import torch

from evaluation.metrics import confusion_counts, confusion_matrix, scores_from_confusion, segmentation_scores


IGNORE = 255


# ---------------------------------------------------------------- probes: classes 0..K-1, 255 unlabelled
def test_mean_iou_matches_a_hand_computed_case():
    labels = np.array([[0, 0, 1], [1, IGNORE, 2]])
    predictions = np.array([[0, 1, 1], [1, 0, 0]])  # the prediction under the ignored pixel must not count
    scores = segmentation_scores(predictions, labels, num_classes=4, ignore_index=IGNORE)
    # class 0: TP 1, union 2 + 2 - 1 = 3; class 1: TP 2, union 2 + 3 - 2 = 3; class 2: TP 0, union 1;
    # class 3: in neither ground truth nor prediction -> no IoU, left out of the mean.
    expected = {"class_0": 1 / 3, "class_1": 2 / 3, "class_2": 0.0, "class_3": None}
    assert scores["per_class_iou"].keys() == expected.keys()
    for name, value in expected.items():
        assert scores["per_class_iou"][name] == (None if value is None else pytest.approx(value))
    assert scores["miou"] == pytest.approx(1 / 3)
    assert scores["pixel_accuracy"] == pytest.approx(3 / 5)
    assert scores["num_pixels"] == 5 and scores["num_present_classes"] == 3

    confusion = confusion_matrix(predictions, labels, 4, IGNORE)
    assert confusion.sum() == 5
    assert confusion[0].tolist() == [1, 1, 0, 0] and confusion[2].tolist() == [1, 0, 0, 0]


def test_a_predicted_but_absent_class_counts_as_zero():
    labels = np.zeros((2, 2), dtype=np.int64)
    predictions = np.array([[0, 0], [0, 1]])
    scores = segmentation_scores(predictions, labels, num_classes=3, ignore_index=IGNORE)
    assert scores["per_class_iou"] == {"class_0": 0.75, "class_1": 0.0, "class_2": None}
    assert scores["miou"] == pytest.approx(0.375)


# ---------------------------------------------------------------- scribble tools: 0 unlabelled, classes 1..K
def scribble_miou(pred, target, n_classes, ignore_index=0):
    first_class = 1 if ignore_index == 0 else 0
    return segmentation_scores(pred, target, n_classes, ignore_index=ignore_index, first_class=first_class)["miou"]


def test_scribble_convention_matches_a_hand_computed_case():
    target = np.array([[1, 1, 2], [2, 0, 2]])
    pred = np.array([[1, 2, 2], [2, 1, 1]])
    # Pixel (1, 1) is unlabelled and ignored. Class 1: I = 1, U = 3. Class 2: I = 2, U = 4.
    assert scribble_miou(pred, target, n_classes=2) == pytest.approx((1 / 3 + 2 / 4) / 2)
    # A class absent from prediction and target is skipped, not counted as 0 or 1.
    assert scribble_miou(pred, target, n_classes=3) == pytest.approx((1 / 3 + 2 / 4) / 2)
    # Scoring every pixel with classes 0..2: class 0 I = 0, U = 1; class 1 I = 1, U = 4; class 2 I = 2, U = 4.
    assert scribble_miou(pred, target, n_classes=3, ignore_index=None) == pytest.approx((0 + 1 / 4 + 2 / 4) / 3)
    names = segmentation_scores(pred, target, 2, ignore_index=0, first_class=1)["per_class_iou"]
    assert names == {"class_1": pytest.approx(1 / 3), "class_2": pytest.approx(2 / 4)}


def test_mean_iou_extremes_and_shape_check():
    truth = np.array([[1, 2], [2, 1]])
    assert scribble_miou(truth, truth, n_classes=2) == 1.0
    assert scribble_miou(3 - truth, truth, n_classes=2) == 0.0
    with pytest.raises(ValueError, match="shape"):
        scribble_miou(truth, truth[:1], n_classes=2)


def test_values_outside_the_classes_are_refused_not_dropped():
    labels = np.array([[0, 1], [2, IGNORE]])
    with pytest.raises(ValueError, match=r"labels hold values \[2\] outside the classes 0 .. 1"):
        confusion_matrix(labels, labels, 2, IGNORE)
    with pytest.raises(ValueError, match=r"predictions hold values \[0\] outside the classes 1 .. 2"):
        confusion_matrix(np.array([0, 1]), np.array([1, 2]), 2, ignore_index=0, first_class=1)
    # Under an ignored pixel anything may be predicted.
    assert confusion_matrix(np.array([7, 1]), np.array([0, 1]), 2, ignore_index=0, first_class=1).sum() == 1
    with pytest.raises(ValueError, match="2 class names for 3 classes"):
        scores_from_confusion(np.eye(3), class_names=["a", "b"])


def test_nothing_scored_gives_nan():
    scores = segmentation_scores(np.zeros((2, 2)), np.full((2, 2), IGNORE), 3, ignore_index=IGNORE)
    assert np.isnan(scores["miou"]) and np.isnan(scores["pixel_accuracy"]) and scores["num_pixels"] == 0


# ---------------------------------------------------------------- against scikit-learn
@pytest.mark.parametrize("first_class, ignore_index", [(0, 255), (1, 0), (0, None)])
def test_agrees_with_sklearn_jaccard_and_confusion_matrix(first_class, ignore_index):
    rng = np.random.default_rng(first_class + 7)
    num_classes = 5
    classes = np.arange(first_class, first_class + num_classes)
    labels = rng.choice(classes[:-1], size=(3, 17, 19))  # the last class is only ever predicted
    predictions = np.where(rng.random(labels.shape) < 0.6, labels, rng.choice(classes, size=labels.shape))
    if ignore_index is not None:
        labels[rng.random(labels.shape) < 0.2] = ignore_index
    scored = np.ones(labels.shape, bool) if ignore_index is None else labels != ignore_index
    truth, predicted = labels[scored], predictions[scored]

    confusion = confusion_matrix(predictions, labels, num_classes, ignore_index, first_class)
    np.testing.assert_array_equal(confusion, sklearn.metrics.confusion_matrix(truth, predicted, labels=classes))
    scores = scores_from_confusion(confusion, first_class=first_class)
    assert scores["num_present_classes"] == num_classes  # sklearn gives absent classes 0, not "no IoU"
    expected_iou = sklearn.metrics.jaccard_score(truth, predicted, labels=classes, average=None)
    np.testing.assert_allclose(list(scores["per_class_iou"].values()), expected_iou)
    assert scores["miou"] == pytest.approx(expected_iou.mean())
    assert scores["pixel_accuracy"] == pytest.approx(sklearn.metrics.accuracy_score(truth, predicted))

    # The tensor path of the training loops counts the same.
    tensor_counts = confusion_counts(
        torch.from_numpy(predictions), torch.from_numpy(labels), num_classes, ignore_index, first_class
    )
    np.testing.assert_array_equal(tensor_counts.numpy(), confusion)
