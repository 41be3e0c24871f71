"""ShapesEval: the shipped prompt set, its scoring rules, bootstrap intervals."""

import re
from collections import Counter

import numpy as np
import pytest

from inkwash.data.shapes import SYNONYMS, ShapesDataset
from inkwash.errors import UserError
from inkwash.eval.judge import ReadObject
from inkwash.eval.shapeseval import (
    GENEVAL_TASKS,
    PARA_COLOURS,
    PARA_RELATIONS,
    PARA_SHAPES,
    TASKS,
    bootstrap,
    build_prompts,
    load_prompts,
    paired_difference,
    relations_between,
    score,
)


def obj(shape, colour="red", centre=(16, 16), half=3.0):
    return ReadObject(shape, colour, "small", centre, half, 28.0, 0.99, 0.0)


def test_shipped_file_is_the_built_set():
    shipped = [{k: v for k, v in p.items() if k != "index"} for p in load_prompts()]
    assert shipped == build_prompts()  # regenerate with shapeseval.write_prompts_file() for a new version


def test_prompt_set_size_and_coverage():
    prompts = load_prompts()
    assert len(prompts) >= 500
    counts = Counter(p["task"] for p in prompts)
    assert set(counts) == set(TASKS) and min(counts.values()) >= 49
    assert len({p["id"] for p in prompts}) == len(prompts)
    assert len({p["prompt"] for p in prompts}) == len(prompts)
    numbers = Counter(p["spec"]["objects"][0]["count"] for p in prompts if p["task"] == "counting")
    assert set(numbers) == {1, 2, 3, 4}
    relations = Counter(p["spec"]["relation"] for p in prompts if p["task"] == "position")
    assert set(relations) == {"left of", "right of", "above", "below"}
    assert set(Counter(p["spec"]["of"] for p in prompts if p["task"] == "paraphrase")) == set(GENEVAL_TASKS)
    assert [p["task"] for p in load_prompts(["counting"])] == ["counting"] * counts["counting"]
    with pytest.raises(UserError, match="unknown ShapesEval task"):
        load_prompts(["colours"])


def test_paraphrase_words_never_appear_in_training_captions():
    captions = " | ".join(ShapesDataset(32, seed=0).scene(i)[1] for i in range(20000))
    varied = ShapesDataset(32, seed=0, omit_colour=0.5, omit_size=0.5, say_one=0.5)  # the caption variants
    captions += " | " + " | ".join(varied.scene(i)[1] for i in range(20000))
    words = [w for ws in PARA_SHAPES.values() for w in ws] + list(PARA_COLOURS.values()) + list(PARA_RELATIONS.values())
    for w in words:
        assert not re.search(rf"\b{re.escape(w)}\b", captions), w
        assert all(w not in alts for alts in SYNONYMS.values())
    for p in load_prompts(["paraphrase"]):
        assert p["prompt"] not in captions


def test_scoring_rules():
    spec = {"objects": [{"shape": "circle", "colour": None, "count": 1}]}
    assert score(spec, [obj("circle"), obj("star")]) and not score(spec, [obj("star")])
    count3 = {"objects": [{"shape": "circle", "colour": None, "count": 3}], "exact": True}
    assert score(count3, [obj("circle")] * 3 + [obj("star")])
    assert not score(count3, [obj("circle")] * 2) and not score(count3, [obj("circle")] * 4)
    red = {"objects": [{"shape": "circle", "colour": "red", "count": 1}]}
    assert score(red, [obj("circle", "blue"), obj("circle", "red")]) and not score(red, [obj("circle", "blue")])
    attr = {
        "objects": [{"shape": "circle", "colour": "red", "count": 1}, {"shape": "star", "colour": "blue", "count": 1}]
    }
    assert score(attr, [obj("circle", "red"), obj("star", "blue")])
    assert not score(attr, [obj("circle", "blue"), obj("star", "red")])  # swapped colours: the binding failure
    left = {"objects": [{"shape": "circle", "colour": None, "count": 1}, {"shape": "star", "colour": None, "count": 1}],
            "relation": "left of"}  # fmt: skip
    assert score(left, [obj("circle", centre=(5, 16)), obj("star", centre=(25, 16))])
    assert not score(left, [obj("circle", centre=(25, 16)), obj("star", centre=(5, 16))])
    assert score(left, [obj("circle", centre=(25, 16)), obj("circle", centre=(5, 16)), obj("star", centre=(15, 16))])


def test_geneval_relative_position():
    a, b = obj("circle", centre=(5, 10)), obj("star", centre=(25, 12))
    assert relations_between(a, b) == {"left of"} and relations_between(b, a) == {"right of"}
    assert relations_between(obj("circle", centre=(10, 2)), obj("star", centre=(10, 30))) == {"above"}
    diag = relations_between(obj("circle", centre=(0, 0)), obj("star", centre=(20, 20)))
    assert diag == {"left of", "above"}  # GenEval: a relation holds within 60 degrees of its axis
    steep = relations_between(obj("circle", centre=(0, 0)), obj("star", centre=(8, 30)))
    assert steep == {"above"}
    assert relations_between(obj("circle", centre=(10, 10)), obj("star", centre=(10.5, 10))) == set()  # overlap


def test_bootstrap_interval_matches_the_normal_approximation():
    rng = np.random.default_rng(0)
    correct = {t: rng.random((400, 1)) < 0.5 for t in ("counting", "colors")}
    s = bootstrap(correct, n=2000)
    for t in ("counting", "colors"):
        p = correct[t].mean()
        width = 2 * 1.96 * np.sqrt(p * (1 - p) / 400)
        assert s[t]["lo"] < p < s[t]["hi"]
        assert abs((s[t]["hi"] - s[t]["lo"]) - width) < 0.15 * width
        assert s[t]["prompts"] == 400 and s[t]["images"] == 400
    assert s["overall"]["mean"] == pytest.approx(np.mean([correct[t].mean() for t in correct]))
    assert s["overall"]["hi"] - s["overall"]["lo"] < s["counting"]["hi"] - s["counting"]["lo"]


def test_bootstrap_overall_leaves_paraphrase_out():
    correct = {"colors": np.ones((10, 4), bool), "paraphrase": np.zeros((10, 4), bool)}
    s = bootstrap(correct, n=100)
    assert s["overall"]["mean"] == 1.0 and s["paraphrase"]["mean"] == 0.0 and s["colors"]["images"] == 40


def test_paired_difference_matches_the_normal_approximation_and_beats_two_separate_intervals():
    rng = np.random.default_rng(1)
    a = {t: rng.random((400, 2)) < 0.5 for t in ("counting", "colors")}
    flip = {t: rng.random((400, 2)) < 0.1 for t in a}  # b: a with 10% of verdicts flipped
    b = {t: a[t] ^ flip[t] for t in a}
    d = paired_difference(a, b, n=2000)
    for t in a:
        per_prompt = (b[t].astype(float) - a[t]).mean(axis=1)
        assert d[t]["mean"] == pytest.approx(per_prompt.mean())
        width = 2 * 1.96 * per_prompt.std() / np.sqrt(400)
        assert d[t]["lo"] < d[t]["mean"] < d[t]["hi"]
        assert abs((d[t]["hi"] - d[t]["lo"]) - width) < 0.15 * width
        separate = bootstrap(a, n=500)[t]
        assert d[t]["hi"] - d[t]["lo"] < 0.75 * (separate["hi"] - separate["lo"])
    assert d["agree"] == pytest.approx(1 - np.mean([flip[t].mean() for t in a]))
    assert d["overall"]["mean"] == pytest.approx(np.mean([d[t]["mean"] for t in a]))


def test_paired_difference_of_a_run_with_itself_is_exactly_zero_and_mismatched_runs_are_refused():
    a = {"colors": np.random.default_rng(2).random((30, 4)) < 0.5}
    d = paired_difference(a, a, n=100)
    assert (d["colors"]["mean"], d["colors"]["lo"], d["colors"]["hi"], d["agree"]) == (0.0, 0.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="same ones"):
        paired_difference(a, {"colors": a["colors"][:20]})
