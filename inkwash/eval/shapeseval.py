"""ShapesEval: GenEval's six tasks (Ghosh et al., 2023) plus a paraphrase task, for the Shapes world.

Owns the versioned prompt set, the rule that scores one judge reading against a prompt's spec, and the
bootstrap intervals. The prompt set is built by `build_prompts` from a fixed seed and shipped as
`shapeseval-v1.json` (a test checks the two agree, so the set cannot drift silently).

Tasks and rules (GenEval's, with shapes for COCO classes and the palette for its colours):
    single_object  "a circle"                        at least one circle
    two_object     "a circle and a square"           at least one of each
    counting       "three circles" (1-4)             exactly three circles (other shapes ignored)
    colors         "a red circle"                    at least one red circle
    position       "a circle to the left of a star"  a circle and a star in that relation (GenEval's rule)
    color_attr     "a red circle and a blue star"    a red circle and a blue star
    paraphrase     reworded prompts of the six kinds with words and templates no training caption uses;
                   scored by the rule of the kind it rewords
"overall" is the mean of the six GenEval tasks, as GenEval reports it; paraphrase is reported beside it.
"""

from __future__ import annotations

import json
import random
from functools import lru_cache
from pathlib import Path

import numpy as np

from inkwash.data.shapes import BACKGROUNDS, CANONICAL, COLOURS, RELATIONS, SHAPES, plural
from inkwash.errors import UserError

VERSION = "shapeseval-v1"
PROMPTS_FILE = Path(__file__).resolve().parent / f"{VERSION}.json"
GENEVAL_TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
TASKS = (*GENEVAL_TASKS, "paraphrase")
PER_TASK = {"single_object": 49, "two_object": 70, "counting": 84, "colors": 77, "position": 84, "color_attr": 84,
            "paraphrase": 56}  # fmt: skip
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
POSITION_THRESHOLD = 0.1  # GenEval: offsets shrink by this fraction of the two objects' summed extents

# Words and templates that no training caption uses (checked by a test against the caption generator).
PARA_SHAPES = {"circle": ["round dot", "round shape"], "square": ["block", "square tile"],
               "triangle": ["three-sided shape", "three-cornered shape"],
               "star": ["five-pointed star", "starlike shape"],
               "diamond": ["lozenge", "kite-like shape"], "hexagon": ["six-sided shape", "honeycomb cell"],
               "cross": ["plus symbol", "plus-shaped figure"]}  # fmt: skip
PARA_COLOURS = {"red": "scarlet", "green": "emerald", "blue": "cobalt", "yellow": "lemon", "purple": "plum",
                "orange": "tangerine", "pink": "rose", "cyan": "turquoise", "white": "snow white",
                "brown": "chocolate", "black": "jet black"}  # fmt: skip
PARA_RELATIONS = {"left of": "on the left-hand side of", "right of": "on the right-hand side of",
                  "above": "higher up than", "below": "lower down than"}  # fmt: skip
PARA_NUMBERS = {1: "exactly one", 2: "a pair of", 3: "exactly three", 4: "a group of four"}


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _with_bg(text: str, bg: str | None) -> str:
    return text if bg is None else f"{text} on {_a(bg)} background"


def _obj(shape: str, colour: str | None = None, count: int = 1) -> dict:
    return {"shape": shape, "colour": colour, "count": count}


class _Builder:
    """Draws the prompts of each task from one seeded random.Random, in a fixed order."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def pick(self, pool: list, n: int) -> list:
        return [pool[i] for i in sorted(self.rng.sample(range(len(pool)), n))]

    def single_object(self, n: int) -> list[tuple[str, dict]]:
        pool = [(s, z, bg) for s in SHAPES for z in (None, "large", "small") for bg in (None, *BACKGROUNDS)]
        out = []
        for s, z, bg in self.pick(pool, n):
            out.append((_with_bg(_a(f"{z} {s}" if z else s), bg), {"objects": [_obj(s)]}))
        return out

    def two_object(self, n: int) -> list[tuple[str, dict]]:
        pool = [(a, b, bg) for a in SHAPES for b in SHAPES if a != b for bg in (None, *BACKGROUNDS)]
        return [(_with_bg(f"{_a(a)} and {_a(b)}", bg), {"objects": [_obj(a), _obj(b)]}) for a, b, bg in
                self.pick(pool, n)]  # fmt: skip

    def counting(self, n: int) -> list[tuple[str, dict]]:
        pool = [(s, k, bg) for s in SHAPES for k in NUMBER_WORDS for bg in (None, *BACKGROUNDS)]
        out = []
        for s, k, bg in self.pick(pool, n):
            words = f"{NUMBER_WORDS[k]} {s if k == 1 else plural(s)}"
            out.append((_with_bg(words, bg), {"objects": [_obj(s, count=k)], "exact": True}))
        return out

    def colors(self, n: int) -> list[tuple[str, dict]]:
        pool = [(s, c) for s in SHAPES for c in COLOURS]
        return [(_a(f"{c} {s}"), {"objects": [_obj(s, c)]}) for s, c in self.pick(pool, n)]

    def position(self, n: int) -> list[tuple[str, dict]]:
        pool = [(a, rel, b) for a in SHAPES for b in SHAPES if a != b for rel in RELATIONS]
        return [(f"{_a(a)} {CANONICAL['relation'][rel]} {_a(b)}",
                 {"objects": [_obj(a), _obj(b)], "relation": rel}) for a, rel, b in self.pick(pool, n)]  # fmt: skip

    def color_attr(self, n: int) -> list[tuple[str, dict]]:
        out, seen = [], set()
        while len(out) < n:
            s1, s2 = self.rng.sample(SHAPES, 2)
            c1, c2 = self.rng.sample(list(COLOURS), 2)
            if (s1, c1, s2, c2) in seen:
                continue
            seen.add((s1, c1, s2, c2))
            out.append((f"{_a(f'{c1} {s1}')} and {_a(f'{c2} {s2}')}", {"objects": [_obj(s1, c1), _obj(s2, c2)]}))
        return out

    def paraphrase(self, n: int) -> list[tuple[str, dict]]:
        out, seen = [], set()
        while len(out) < n:
            text, spec = self.reworded(GENEVAL_TASKS[len(out) % len(GENEVAL_TASKS)])
            if text not in seen:
                seen.add(text)
                out.append((text, spec))
        return out

    def reworded(self, kind: str) -> tuple[str, dict]:
        """One prompt of task `kind` in words and templates that no training caption uses."""
        rng = self.rng
        shp = lambda s: rng.choice(PARA_SHAPES[s])  # noqa: E731
        a, b = rng.sample(SHAPES, 2)
        c1, c2 = rng.sample(list(COLOURS), 2)
        if kind == "single_object":
            text = rng.choice(["there is {} in the picture", "draw {}", "a picture showing just {}"])
            return text.format(_a(shp(a))), {"objects": [_obj(a)], "of": kind}
        if kind == "two_object":
            text = rng.choice(["{} next to {}", "{} together with {}", "a scene containing {} as well as {}"])
            return text.format(_a(shp(a)), _a(shp(b))), {"objects": [_obj(a), _obj(b)], "of": kind}
        if kind == "counting":
            k, noun = rng.choice(list(NUMBER_WORDS)), shp(a)
            text = f"{PARA_NUMBERS[k]} {noun if k == 1 else plural(noun)}"
            return text, {"objects": [_obj(a, count=k)], "exact": True, "of": kind}
        if kind == "colors":
            text = rng.choice(["{s} coloured {c}", "{s} that is {c}", "{s} painted {c}"])
            return text.format(s=_a(shp(a)), c=PARA_COLOURS[c1]), {"objects": [_obj(a, c1)], "of": kind}
        if kind == "position":
            rel = rng.choice(RELATIONS)
            text = f"{_a(shp(a))} placed {PARA_RELATIONS[rel]} {_a(shp(b))}"
            return text, {"objects": [_obj(a), _obj(b)], "relation": rel, "of": kind}
        text = rng.choice(["{} in {} and {} in {}", "{} coloured {} beside {} coloured {}"])
        text = text.format(_a(shp(a)), PARA_COLOURS[c1], _a(shp(b)), PARA_COLOURS[c2])
        return text, {"objects": [_obj(a, c1), _obj(b, c2)], "of": kind}


def build_prompts(version: str = VERSION) -> list[dict]:
    """The prompt set, built afresh: [{"id", "task", "prompt", "spec"}], tasks in TASKS order."""
    if version != VERSION:
        raise UserError(f"unknown ShapesEval version {version!r}; this inkwash has {VERSION}")
    builder = _Builder(random.Random(version))
    prompts = []
    for task in TASKS:
        for i, (text, spec) in enumerate(getattr(builder, task)(PER_TASK[task])):
            prompts.append({"id": f"{task}-{i:03d}", "task": task, "prompt": text, "spec": spec})
    return prompts


@lru_cache(maxsize=1)
def _shipped() -> tuple:
    return tuple(json.loads(PROMPTS_FILE.read_text())["prompts"])


def load_prompts(tasks: list[str] | tuple[str, ...] | None = None) -> list[dict]:
    """The shipped prompt set, optionally only some tasks (each prompt keeps its place `index` in the set)."""
    unknown = sorted(set(tasks or ()) - set(TASKS))
    if unknown:
        raise UserError(f"unknown ShapesEval task {unknown[0]!r}; the tasks are {', '.join(TASKS)}")
    prompts = [dict(p, index=i) for i, p in enumerate(_shipped())]
    return [p for p in prompts if tasks is None or p["task"] in tasks]


# ---------------------------------------------------------------------------------------------- scoring


def _get(o, key):
    return o[key] if isinstance(o, dict) else getattr(o, key)


def relations_between(a, b) -> set[str]:
    """GenEval's relative position of read objects a and b: offsets shrink by POSITION_THRESHOLD of the summed
    extents; a relation holds where the shrunk offset's direction is within 60 degrees of its axis."""
    ca, cb = np.asarray(_get(a, "centre"), float), np.asarray(_get(b, "centre"), float)
    dims = 2 * (float(_get(a, "half_extent")) + float(_get(b, "half_extent")))
    offset = ca - cb
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * dims, 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rel = set()
    if dx < -0.5:
        rel.add("left of")
    if dx > 0.5:
        rel.add("right of")
    if dy < -0.5:
        rel.add("above")
    if dy > 0.5:
        rel.add("below")
    return rel


def score(spec: dict, objects: list) -> bool:
    """Whether the read objects (ReadObject or their dicts) satisfy a prompt's spec."""
    found = []
    for want in spec["objects"]:
        same_shape = [o for o in objects if _get(o, "shape") == want["shape"]]
        match = [o for o in same_shape if want["colour"] is None or _get(o, "colour") == want["colour"]]
        if len(match) < want["count"] or (spec.get("exact") and len(same_shape) != want["count"]):
            return False
        found.append(match)
    rel = spec.get("relation")
    if rel is not None:
        return any(rel in relations_between(a, b) for a in found[0] for b in found[1])
    return True


def bootstrap(correct: dict[str, np.ndarray], n: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Scores with percentile intervals. `correct[task]` is bool [prompts, images]; prompts are resampled
    within each task (images of one prompt stay together). Overall = mean of the GenEval tasks present.
    `correct` may also hold per-image differences of two runs (`paired_difference`)."""
    rng = np.random.default_rng(seed)
    tasks = [t for t in TASKS if t in correct]
    means = {t: correct[t].mean() for t in tasks}
    boots = {t: np.array([correct[t][rng.integers(0, len(correct[t]), len(correct[t]))].mean() for _ in range(n)])
             for t in tasks}  # fmt: skip
    core = [t for t in tasks if t in GENEVAL_TASKS]
    if core:
        means["overall"] = float(np.mean([means[t] for t in core]))
        boots["overall"] = np.mean([boots[t] for t in core], axis=0)
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    out = {}
    for t in (["overall"] if core else []) + tasks:
        lo, hi = np.percentile(boots[t], q)
        out[t] = {"mean": float(means[t]), "lo": float(lo), "hi": float(hi)}
        if t in correct:
            out[t].update(prompts=int(correct[t].shape[0]), images=int(correct[t].size))
    return out


def paired_difference(
    a: dict[str, np.ndarray], b: dict[str, np.ndarray], n: int = 1000, seed: int = 0, level: float = 0.95
) -> dict:
    """Score of `b` minus score of `a` with a paired percentile interval, for two evaluations of the same prompts
    and seeds (a model with and without a cache, say). Each bootstrap draw resamples prompts within each task and
    uses the same draw for both runs, so what the two share (which prompts are hard) cancels and the interval is
    far narrower than the two separate intervals suggest. Also the share of images whose verdict is unchanged."""
    tasks = [t for t in TASKS if t in a and t in b]
    for t in tasks:
        if a[t].shape != b[t].shape:
            raise ValueError(f"{t}: {a[t].shape} and {b[t].shape} images; a paired comparison needs the same ones")
    # the bootstrap of the per-image differences: one draw of prompts serves both runs
    out = bootstrap({t: b[t].astype(float) - a[t].astype(float) for t in tasks}, n=n, seed=seed, level=level)
    same = sum(int((a[t] == b[t]).sum()) for t in tasks)
    out["agree"] = same / sum(a[t].size for t in tasks)
    return out


def write_prompts_file(path: Path = PROMPTS_FILE) -> Path:
    """(Re)write the shipped prompt file from `build_prompts` (run when making a new version)."""
    prompts = build_prompts()
    lines = ",\n".join("  " + json.dumps(p) for p in prompts)  # one prompt per line: readable diffs
    head = json.dumps({"version": VERSION, "tasks": list(TASKS), "count": len(prompts)})[:-1]
    path.write_text(f'{head}, "prompts": [\n{lines}\n]}}\n')
    return path
