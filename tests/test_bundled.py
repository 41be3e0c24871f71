"""The bundled models draw what they are asked: the judge reads the shape and colour of simple prompts."""

from __future__ import annotations

import pytest

from inkwash.eval.judge import Judge
from inkwash.formats.checkpoint import file_sha256
from inkwash.pipeline import BUNDLED_TEACHER, Pipeline, default_model_path

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [
    ("a red circle", "circle", "red"),
    ("a blue square", "square", "blue"),
    ("a green triangle", "triangle", "green"),
]


@pytest.fixture(scope="module")
def judge():
    return Judge()


@pytest.mark.parametrize("which", ["default", "teacher"])
def test_bundled_models_draw_the_shape_and_colour_asked_for(which, judge):
    """16 seeds per prompt at the model's own settings; measured 15-16 of 16 for both (docs/results.md)."""
    pipe = Pipeline.from_file(default_model_path() if which == "default" else BUNDLED_TEACHER)
    for prompt, shape, colour in PROMPTS:
        readings = judge(pipe.generate(prompt, n=16, seed=0))
        hits = sum(any(o.shape == shape and o.colour == colour for o in r.objects) for r in readings)
        assert hits >= 12, f"{which}: {prompt!r} drawn {hits}/16 times"


def test_the_default_is_the_few_step_student_of_the_bundled_teacher():
    """`inkwash generate` without flags samples the LCM student in its own 4 steps, no CFG (guidance-distilled)."""
    pipe = Pipeline.from_file(default_model_path())
    s = pipe.settings()
    assert (s.sampler, s.steps, s.schedule) == ("lcm", 4, "lcm") and pipe.guidance_distilled
    assert pipe.meta["distill"]["method"] == "lcm"
    assert pipe.meta["distill"]["teacher_sha256"] == file_sha256(BUNDLED_TEACHER)
    teacher = Pipeline.from_file(BUNDLED_TEACHER)
    assert teacher.settings().steps == 20 and not teacher.guidance_distilled
