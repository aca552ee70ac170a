"""GenEval's rules on hand-made detections, and the pixel reader as its detector on rendered scenes."""

import random

import pytest
import torch

from transfusion.data.embedded.scenes import TASKS, ScenesDataset, draw_scene, relative_position
from transfusion.evaluation.geneval import GenEvalScore, check_metadata, detect, evaluate
from transfusion.images import to_tensor


def obj(colour="red", box=(0, 0, 10, 10)):
    return {"colour": colour, "box": box}


def record(tag, include, exclude=()):
    return {"tag": tag, "include": list(include), "exclude": list(exclude), "prompt": tag}


def test_position_margin_is_genevals():
    b = (0, 0, 10, 10)  # two 10-wide boxes: the x offset shrinks by 0.1 * (10 + 10) = 2, and must stay above half of it
    assert relative_position((-3.9, 0, 6.1, 10), b) == set()  # |dx| = 3.9: 1.9 / 3.9 < 0.5
    assert relative_position((-4.1, 0, 5.9, 10), b) == {"left of"}  # 2.1 / 4.1 > 0.5
    assert relative_position((4.1, 0, 14.1, 10), b) == {"right of"}
    assert relative_position((0, -20, 10, -10), b) == {"above"}  # y grows downwards, as in pictures
    assert relative_position((0, 20, 10, 30), b) == {"below"}
    assert relative_position((-10, -10, 0, 0), b) == {"left of", "above"}  # a diagonal: both
    assert relative_position((0.5, 0.5, 10.5, 10.5), b) == set()  # overlapping: no relation
    assert relative_position((-4.1, 0, 5.9, 10), b, threshold=0.2) == set()  # a wider margin: too close now


def test_counting_is_exact():
    three = record("counting", [{"class": "triangle", "count": 3}], [{"class": "triangle", "count": 4}])
    for n, right in ((2, False), (3, True), (4, False), (5, False)):
        assert evaluate({"triangle": [obj()] * n}, three)[0] is right, n
    assert evaluate({"triangle": [obj()] * 3, "circle": [obj()] * 4}, three)[0]  # other classes do not count
    correct, reasons = evaluate({"triangle": [obj()] * 4}, three)
    assert not correct and reasons == ["expected triangle<4, found 4"]


def test_two_objects_need_both_and_allow_more():
    two = record("two_object", [{"class": "circle", "count": 1}, {"class": "square", "count": 1}])
    assert evaluate({"circle": [obj()], "square": [obj()]}, two)[0]
    assert evaluate({"circle": [obj(), obj()], "square": [obj()], "triangle": [obj()]}, two)[0]
    assert not evaluate({"circle": [obj(), obj()]}, two)[0]
    assert not evaluate({}, record("single_object", [{"class": "circle", "count": 1}]))[0]


def test_colour_is_read_on_the_first_objects_only():
    red_circle = record("colors", [{"class": "circle", "count": 1, "color": "red"}])
    assert evaluate({"circle": [obj("red")]}, red_circle)[0]
    assert not evaluate({"circle": [obj("blue")]}, red_circle)[0]
    assert not evaluate({"circle": [obj("blue"), obj("red")]}, red_circle)[0]  # the most confident one is blue
    assert evaluate({"circle": [obj("red"), obj("blue")]}, red_circle)[0]


def test_colour_attribution_binds_each_colour_to_its_object():
    attr = record("color_attr", [{"class": "circle", "count": 1, "color": "red"},
                                 {"class": "square", "count": 1, "color": "blue"}])
    assert evaluate({"circle": [obj("red")], "square": [obj("blue")]}, attr)[0]
    correct, reasons = evaluate({"circle": [obj("blue")], "square": [obj("red")]}, attr)  # both colours, swapped
    assert not correct and len(reasons) == 2


def test_position_points_at_the_matched_reference():
    left = record("position", [{"class": "square", "count": 1}, {"class": "circle", "count": 1,
                                                                 "position": ["left of", 0]}])
    square, west, east = obj(box=(20, 0, 30, 10)), obj(box=(0, 0, 10, 10)), obj(box=(40, 0, 50, 10))
    assert evaluate({"square": [square], "circle": [west]}, left)[0]
    assert not evaluate({"square": [square], "circle": [east]}, left)[0]
    correct, reasons = evaluate({"circle": [west]}, left)  # no square: the circle has nothing to be left of
    assert not correct and reasons == ["expected square>=1, found 0", "no target for circle to be left of"]


def test_overall_is_the_mean_over_tasks_not_over_pictures():
    score = GenEvalScore()
    score.results = [{"tag": "counting", "correct": True}] * 3 + [{"tag": "colors", "correct": False}]
    assert score.compute() == {"counting": 1.0, "colors": 0.0, "overall": 0.5}  # per picture it would be 0.75


def test_bad_metadata_is_named():
    with pytest.raises(ValueError, match="needs 'tag' and 'include'"):
        check_metadata({"prompt": "x"})
    with pytest.raises(ValueError, match=r"include\[0\] needs a 'class' and a 'count'"):
        check_metadata({"tag": "t", "include": [{"class": "circle"}]})
    with pytest.raises(ValueError, match="must point to an earlier include"):
        check_metadata({"tag": "t", "include": [{"class": "circle", "count": 1, "position": ["above", 0]}]})


def test_detector_reads_a_hand_placed_scene():
    objects = [{"shape": "circle", "colour": "red", "cx": 0.25, "cy": 0.3, "r": 0.13},
               {"shape": "triangle", "colour": "blue", "cx": 0.75, "cy": 0.3, "r": 0.13},
               {"shape": "triangle", "colour": "white", "cx": 0.5, "cy": 0.75, "r": 0.15}]
    found = detect(to_tensor(draw_scene(objects, 32)))
    assert {k: sorted(o["colour"] for o in v) for k, v in found.items()} == {"circle": ["red"],
                                                                             "triangle": ["blue", "white"]}
    assert relative_position(found["circle"][0]["box"], found["triangle"][1]["box"]) == {"left of"}


def _scenes(split, seed, n=120):
    data = ScenesDataset(n, 32, seed=seed, split=split)
    items = [data[i] for i in range(n)]
    return torch.stack([x["image"] for x in items]), [x["metadata"] for x in items]


def test_reader_scores_every_task_on_real_scenes_and_shuffled_prompts_at_chance(one_thread):
    images, metadata = _scenes("heldout", 2)
    train_images, train_metadata = _scenes("train", 0, 60)
    score = GenEvalScore()
    score.update(torch.cat([images, train_images]), metadata + train_metadata)
    rates = score.compute()
    assert set(rates) == {*TASKS, "overall"}
    assert all(rates[t] >= 0.99 for t in TASKS), rates

    found = [detect(image) for image in images]  # chance: every picture against every prompt
    chance = GenEvalScore()
    chance.results = [{"tag": m["tag"], "correct": evaluate(f, m)[0]} for f in found for m in metadata]
    order = list(range(len(metadata)))
    random.Random(0).shuffle(order)
    shuffled = GenEvalScore()
    shuffled.results = [{"tag": m["tag"], "correct": evaluate(found[j], m)[0]} for j, m in zip(order, metadata)]
    assert abs(shuffled.compute()["overall"] - chance.compute()["overall"]) < 0.1
    assert chance.compute()["overall"] < 0.3
