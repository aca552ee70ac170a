"""Prompt following: the reader gets rendered pictures right, and the score separates matched from shuffled captions."""

import pytest
import torch
from PIL import Image, ImageDraw

from transfusion.data.embedded.shapes import (BACKGROUND, COLOURS, POSITIONS, SHAPES, SIZES, ShapeAttributes,
                                              ShapesDataset, draw)
from transfusion.evaluation.follow import ATTRIBUTES, FollowScore, caption_scores, confusion_markdown, read_shapes
from transfusion.images import to_tensor


@pytest.mark.parametrize("image_size", [32, 64])
@pytest.mark.slow
def test_reader_reads_rendered_pictures(image_size):
    data = ShapesDataset(720, image_size, seed=11)  # jittered, every attribute combination about 4 times
    wrong = {a: 0 for a in ATTRIBUTES}
    objects = []
    for i in range(len(data)):
        item = data[i]
        reading = read_shapes(item["image"])
        objects.append(reading["objects"])
        for a in ATTRIBUTES:
            wrong[a] += reading[a] != getattr(item["attributes"], a)
    assert all(n <= 0.01 * len(data) for n in wrong.values()), wrong  # >= 99% on every attribute
    assert objects == [1] * len(data)


def test_reader_counts_objects_and_blank_pictures():
    blank = to_tensor(Image.new("RGB", (32, 32), BACKGROUND))
    assert read_shapes(blank) == {"objects": 0, "size": None, "colour": None, "shape": None, "position": None}
    two = draw(ShapeAttributes("large", "red", "square", "top left"), 32)
    ImageDraw.Draw(two).ellipse([22, 22, 28, 28], fill=COLOURS["blue"])  # a small second blob, bottom right
    reading = read_shapes(to_tensor(two))
    assert reading["objects"] == 2
    assert (reading["colour"], reading["shape"], reading["position"]) == ("red", "square", "top left")  # the largest
    speck = to_tensor(Image.new("RGB", (32, 32), BACKGROUND))
    speck[:, 5, 5] = 1.0  # one white pixel: below min_pixels, not an object
    assert read_shapes(speck)["objects"] == 0


@pytest.mark.slow
def test_follow_score_matched_is_perfect_and_shuffled_is_chance():
    data = ShapesDataset(600, 32, seed=3)
    images = torch.stack([data[i]["image"] for i in range(len(data))])
    captions = [data[i]["captions"][i % 4] for i in range(len(data))]
    matched = FollowScore()
    matched.update(images, captions)
    rates = matched.compute()
    assert rates["all"] >= 0.99 and rates["one_object"] == 1.0 and rates["blank"] == 0.0
    shuffled = FollowScore()
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0)).tolist()
    shuffled.update(images, [captions[j] for j in order])
    rates = shuffled.compute()
    chance = {"size": 1 / len(SIZES), "colour": 1 / len(COLOURS), "shape": 1 / len(SHAPES), "position": 1 / len(POSITIONS)}
    for a, p in chance.items():  # binomial, n = 600: 4 standard deviations
        assert abs(rates[a] - p) < 4 * (p * (1 - p) / len(data)) ** 0.5, (a, rates[a], p)
    assert rates["all"] < 0.03  # chance: 1/180
    assert rates["one_object"] == 1.0  # a wrong caption does not change how many objects there are


def test_confusion_table_counts_asked_against_read():
    image = to_tensor(draw(ShapeAttributes("small", "yellow", "circle", "centre"), 32))
    score = FollowScore()
    score.update(torch.stack([image, image]), ["a small yellow circle in the centre", "a small white circle in the centre"])
    assert score.confusion("colour") == {("yellow", "yellow"): 1, ("white", "yellow"): 1}
    table = confusion_markdown(score, "colour")
    assert "| white |" in table and table.count("\n") == 2 + len(COLOURS) - 1


def test_follow_score_rejects_captions_without_attributes():
    with pytest.raises(ValueError, match="names no"):
        FollowScore().update(torch.zeros(1, 3, 32, 32), ["a photo of a dog"])


def test_caption_scores_per_attribute():
    rates = caption_scores(["a large red circle in the centre", "there is a small blue square at the top left", ""],
                           ["a large red circle in the centre", "a small blue circle in the top left",
                            "a small blue circle in the top left"])
    assert rates["all"] == pytest.approx(1 / 3)
    assert rates["shape"] == pytest.approx(1 / 3) and rates["colour"] == pytest.approx(2 / 3)
