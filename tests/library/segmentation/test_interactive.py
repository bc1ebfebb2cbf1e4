"""The logic under the user interfaces, without Qt: images and scribbles as pages, the checks that say what to paint,
training on the scribbled pages with features kept, page-by-page segmentation and area fractions."""

import numpy as np
import pytest

from alibi_dinov2.features.cache import FeatureCache
from alibi_dinov2.segmentation import extractors
from alibi_dinov2.segmentation.interactive import (
    area_fractions,
    as_pages,
    check_scribbles,
    label_pages,
    page_shape,
    scribbled_pages,
    segment_pages,
    train_on_scribbles,
)
from alibi_dinov2.synthetic.microstructures import generate_microstructure_dataset


@pytest.mark.parametrize(
    "shape, rgb, pages, labels",
    [((20, 30), False, (1, 20, 30), (20, 30)), ((20, 30, 3), True, (1, 20, 30, 3), (20, 30)),
     ((4, 20, 30), False, (4, 20, 30), (4, 20, 30)), ((2, 3, 20, 30, 3), True, (6, 20, 30, 3), (2, 3, 20, 30))],
)
def test_images_and_labels_become_pages_in_the_same_order(shape, rgb, pages, labels):
    image = np.arange(np.prod(shape)).reshape(shape)
    assert as_pages(image, rgb).shape == pages and page_shape(shape, rgb) == labels
    scribbles = np.arange(np.prod(labels)).reshape(labels)
    as_label_pages = label_pages(scribbles, shape, rgb)
    np.testing.assert_array_equal(as_label_pages[-1], scribbles.reshape(-1, 20, 30)[-1])
    assert len(as_label_pages) == pages[0]
    np.testing.assert_array_equal(as_pages(image, rgb)[-1], image.reshape(pages)[-1])


def test_labels_of_another_shape_and_images_without_pages_are_refused_by_name():
    with pytest.raises(ValueError, match=r"'paint' have shape \(20, 31\) but the image 'stack' has shape \(2, 20"):
        label_pages(np.zeros((20, 31)), (2, 20, 30), False, ("paint", "stack"))
    with pytest.raises(ValueError, match=r"shape \(20, 30, 3\)"):
        label_pages(np.zeros((20, 30, 3)), (20, 30, 3), True)
    with pytest.raises(ValueError, match="no 2D pages"):
        as_pages(np.zeros(7), False)


def test_the_checks_say_what_to_paint_and_areas_add_up():
    labels = np.zeros((2, 10, 10), np.int32)
    with pytest.raises(ValueError, match="No scribbles"):
        check_scribbles(labels)
    labels[1, 2, 2] = 3
    with pytest.raises(ValueError, match="Only class 3 is scribbled"):
        check_scribbles(labels)
    with pytest.raises(ValueError, match="Only phase C is scribbled"):
        check_scribbles(labels, lambda value: f"phase {'ABC'[value - 1]}")
    labels[1, 5, 5] = 1
    assert check_scribbles(labels) == [1, 3] and scribbled_pages(labels) == [1]
    mask = np.array([[1, 1, 3, 2]])
    assert area_fractions(mask, [1, 3]) == [0.5, 0.25]


def test_training_on_scribbled_pages_keeps_their_features_and_segments_the_others(monkeypatch):
    pairs = generate_microstructure_dataset(3, size=(64, 80), n_phases=2, seed=5)
    pages = np.stack([image for image, _ in pairs])
    truth = np.stack([labels for _, labels in pairs])
    labels = np.zeros_like(truth)
    labels[1, ::5, ::5] = truth[1, ::5, ::5]  # the middle page only
    calls, computed = [], extractors.classical_features

    def counted(image, **kwargs):
        calls.append(image.shape)
        return computed(image, **kwargs)

    monkeypatch.setattr(extractors, "classical_features", counted)
    cache = FeatureCache()
    segmenter = train_on_scribbles(pages, labels, "classical", feature_cache=cache)
    assert len(calls) == 1 and list(segmenter.classes_) == [1, 2]  # unscribbled pages cost nothing
    labels[1, 2::5, 2::5] = truth[1, 2::5, 2::5]
    train_on_scribbles(pages, labels, "classical", feature_cache=cache)
    assert len(calls) == 1  # more scribbles, same page: the features kept
    masks = dict(segment_pages(segmenter, pages, [2, 0]))
    assert list(masks) == [2, 0]
    for index, mask in masks.items():
        assert np.mean(mask == truth[index]) > 0.9
    with pytest.raises(ValueError, match="ViT features need a model"):
        train_on_scribbles(pages, labels, "classical+vit")
