"""The server: OpenAI-style API, limits, keys, progress stream, cancel, arena, and the batching engine checked
image by image against single-request renders (httpx, against the app in-process or over loopback)."""

from __future__ import annotations

import asyncio
import base64
import collections
import io
import json
import random
import threading
import time

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from inkwash.data.base import to_uint8_hwc
from inkwash.pipeline import Pipeline, png_parameters
from inkwash.sampling import SAMPLERS
from inkwash.serve.app import Limits, ServeConfig, create_app
from inkwash.serve.engine import Engine, Work, wait_idle

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def client(lively_model_file, tmp_path):
    app = create_app(
        ServeConfig(models=[lively_model_file], data_dir=tmp_path, limits=Limits(max_size=32, max_queue=64))
    )
    with TestClient(app) as c:
        yield c


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def reference(pipe: Pipeline, r: dict) -> np.ndarray:
    """The same settings rendered alone, as `inkwash generate` would."""
    settings = {k: r[k] for k in ("sampler", "steps", "guidance", "schedule", "rescale")}
    x = pipe.generate(r["prompt"], negative_prompt=r["negative_prompt"], n=r["n"], seed=r["seed"], size=r["size"],
                      **settings)  # fmt: skip
    return to_uint8_hwc(x)


# --- the API -----------------------------------------------------------------------------------------------


def test_openapi_schema_documents_the_images_api(client):
    schema = client.get("/openapi.json").json()
    body = schema["components"]["schemas"]["GenerationBody"]["properties"]
    for name in ("prompt", "n", "size", "response_format", "negative_prompt", "steps", "guidance", "sampler", "seed"):
        assert name in body
    for path in ("/v1/images/generations", "/v1/jobs", "/v1/jobs/{job_id}/events", "/v1/gallery", "/v1/arena/ranking"):
        assert path in schema["paths"]


def test_generation_returns_the_single_render_with_its_settings(client, lively_model_file):
    body = {"prompt": "a red circle", "n": 2, "seed": 11, "steps": 4, "negative_prompt": "blue", "user": "ignored"}
    r = client.post("/v1/images/generations", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert len(out["data"]) == 2 and {d["seed"] for d in out["data"]} == {11, 12}
    want = reference(Pipeline.from_file(lively_model_file), out["request"])
    for i, d in enumerate(out["data"]):
        img = decode(d["b64_json"])
        assert img.size == (16, 16)
        assert np.abs(np.asarray(img, dtype=int) - want[i].astype(int)).max() <= 2
        s = Pipeline.from_file(lively_model_file).settings(steps=4)
        assert img.info["parameters"] == png_parameters("a red circle", "blue", s, 11 + i, 16, "tiny")


def test_a_guidance_distilled_model_is_served_without_cfg_and_says_so(distilled_model_file, tmp_path):
    """An LCM student: its own sampler and steps by default, the scale goes to the network, and the PNG says
    `CFG scale: 1, Distilled CFG Scale: w` as Forge writes it."""
    app = create_app(ServeConfig(models=[distilled_model_file], data_dir=tmp_path, limits=Limits(max_size=32)))
    with TestClient(app) as c:
        out = c.post("/v1/images/generations", json={"prompt": "a red circle", "seed": 3, "guidance": 6}).json()
    pipe = Pipeline.from_file(distilled_model_file)
    assert pipe.guidance_distilled and out["request"]["sampler"] == "lcm" and out["request"]["steps"] == 2
    img = decode(out["data"][0]["b64_json"])
    assert "CFG scale: 1, Distilled CFG Scale: 6.0" in img.info["parameters"]
    want = reference(pipe, out["request"])
    assert np.abs(np.asarray(img, dtype=int) - want[0].astype(int)).max() <= 2
    other = to_uint8_hwc(pipe.generate("a red circle", seed=3, guidance=2.0))  # the scale reaches the network
    assert np.abs(other[0].astype(int) - want[0].astype(int)).max() > 2


def test_url_format_serves_the_png(client):
    out = client.post("/v1/images/generations", json={"prompt": "a cross", "response_format": "url"}).json()
    url = out["data"][0]["url"]
    assert url.startswith("http://") and "/v1/images/files/" in url
    r = client.get(url)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (16, 16)


def test_progress_stream_has_steps_with_previews_then_done(client):
    """Progress is sent as it changes, coalesced to at most one event per 50 ms (a client wants the latest)."""
    job = client.post("/v1/jobs", json={"prompt": "a star", "steps": 60, "sampler": "heun", "seed": 1}).json()
    assert job["status"] in ("queued", "running") and job["request"]["steps"] == 60
    with client.stream("GET", f"/v1/jobs/{job['id']}/events") as s:
        events = sse_events(s)
    assert events[-1][0] == "done" and events[-1][1]["status"] == "succeeded"
    progress = [d for e, d in events if e == "progress"]
    steps = [d["step"] for d in progress]
    assert len(steps) >= 3 and steps == sorted(set(steps)) and steps[-1] <= 60
    assert all(d["steps"] == 60 for d in progress)
    preview = [d["preview"] for d in progress if "preview" in d][-1]
    assert Image.open(io.BytesIO(base64.b64decode(preview.split(",", 1)[1]))).size == (16, 16)
    # a finished job's stream gives the final event at once
    with client.stream("GET", f"/v1/jobs/{job['id']}/events") as s:
        assert "event: done" in s.read().decode()


def sse_events(response) -> list[tuple[str, dict]]:
    events, name = [], None
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            events.append((name, json.loads(line[6:])))
    return events


def test_openai_style_stream_sends_partial_images_then_each_completed_image(client, lively_model_file):
    body = {"prompt": "a red circle", "n": 2, "seed": 9, "steps": 60, "sampler": "heun", "stream": True,
            "partial_images": 2}  # fmt: skip
    with client.stream("POST", "/v1/images/generations", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    partial = [d for e, d in events if e == "image_generation.partial_image"]
    done = [d for e, d in events if e == "image_generation.completed"]
    assert [d["partial_image_index"] for d in partial] == [0, 1]
    assert all(d["type"] == "image_generation.partial_image" and d["size"] == "16x16" for d in partial)
    assert decode(partial[0]["b64_json"]).size == (16, 16)
    assert [(d["index"], d["seed"]) for d in done] == [(0, 9), (1, 10)] and events[-1][
        0
    ] == "image_generation.completed"
    want = reference(Pipeline.from_file(lively_model_file), client.get(f"/v1/jobs/{done[0]['id']}").json()["request"])
    for i, d in enumerate(done):
        assert np.abs(np.asarray(decode(d["b64_json"]), dtype=int) - want[i].astype(int)).max() <= 2
    r = client.post("/v1/images/generations", json=body | {"partial_images": 4})
    assert r.status_code == 400 and "partial_images must be between 0 and 3" in r.json()["error"]["message"]


def test_cancel_a_queued_and_a_running_job(lively_model_file, tmp_path):
    app = create_app(ServeConfig(models=[lively_model_file], data_dir=tmp_path, max_active=1))
    with TestClient(app) as c:
        long = {"prompt": "a circle", "steps": 100, "sampler": "heun"}
        first = c.post("/v1/jobs", json=long).json()
        second = c.post("/v1/jobs", json=long).json()
        assert c.post(f"/v1/jobs/{second['id']}/cancel").json()["status"] == "cancelled"
        while c.get(f"/v1/jobs/{first['id']}").json()["progress"]["step"] < 1:
            time.sleep(0.01)
        c.post(f"/v1/jobs/{first['id']}/cancel")
        for _ in range(500):
            job = c.get(f"/v1/jobs/{first['id']}").json()
            if job["status"] != "running":
                break
            time.sleep(0.01)
        assert job["status"] == "cancelled" and job["images"] == []
        assert c.get("/v1/gallery").json()["data"] == []


def test_gallery_lists_newest_first_and_pages(client):
    ids = [client.post("/v1/images/generations", json={"prompt": f"a square {i}", "steps": 1}).json()["id"]
           for i in range(3)]  # fmt: skip
    data = client.get("/v1/gallery").json()["data"]
    assert [j["id"] for j in data] == ids[::-1]
    page = client.get("/v1/gallery", params={"limit": 1, "before": data[0]["created"]}).json()["data"]
    assert [j["id"] for j in page] == [ids[1]]


# --- limits and safety ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, status, words",
    [
        ({"prompt": "a circle", "size": "64x64"}, 400, "larger than this server's limit of 32"),
        ({"prompt": "a circle", "size": "16x32"}, 400, "only square sizes"),
        ({"prompt": "a circle", "size": "big"}, 400, "size must look like"),
        ({"prompt": "a circle", "size": 15}, 400, "multiple of 2"),
        ({"prompt": "a circle", "steps": 101}, 400, "steps must be between 1 and 100"),
        ({"prompt": "a circle", "steps": 0}, 400, "steps must be between 1 and 100"),
        ({"prompt": "a circle", "n": 9}, 400, "n must be between 1 and 8"),
        ({"prompt": "a circle", "n": "two"}, 400, "n: Input should be a valid integer"),
        ({"prompt": "x" * 1001}, 400, "prompt is longer than 1000 characters"),
        ({"prompt": "a circle", "negative_prompt": "x" * 1001}, 400, "negative_prompt is longer than 1000"),
        ({"prompt": "   "}, 400, "the prompt is empty"),
        ({"n": 1}, 400, "the prompt is empty; say what to draw"),
        ({"prompt": "a circle", "sampler": "magic"}, 400, "unknown sampler 'magic'"),
        ({"prompt": "a circle", "guidance": -1}, 400, "guidance must be between 0 and 30"),
        ({"prompt": "a circle", "seed": -5}, 400, "seed must be between 0 and"),
        ({"prompt": "a circle", "response_format": "gif"}, 400, 'response_format must be "b64_json" or "url"'),
        ({"prompt": "a circle", "model": "dall-e-3"}, 404, "model 'dall-e-3' is not served here"),
    ],
)
def test_each_mistake_is_one_clear_4xx(client, body, status, words):
    for path in ("/v1/images/generations", "/v1/jobs"):
        r = client.post(path, json=body)
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert words in err["message"] and err["type"] == "invalid_request_error"


def test_body_size_and_bad_json_are_refused(client):
    r = client.post("/v1/jobs", json={"prompt": "a" * 70_000})
    assert r.status_code == 413 and "larger than 65536 bytes" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: counted as it streams
        for _ in range(100):
            yield b" " * 1000

    r = client.post("/v1/jobs", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    r = client.post("/v1/jobs", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"] == "the request body is not valid JSON"


def test_full_queue_answers_429(lively_model_file, tmp_path):
    app = create_app(
        ServeConfig(models=[lively_model_file], data_dir=tmp_path, max_active=1, limits=Limits(max_queue=2))
    )
    long = {"prompt": "a circle", "steps": 100, "sampler": "heun"}
    with TestClient(app) as c:
        first = c.post("/v1/jobs", json=long).json()
        while c.get(f"/v1/jobs/{first['id']}").json()["status"] == "queued":
            time.sleep(0.01)
        waiting = [c.post("/v1/jobs", json=long) for _ in range(2)]
        assert all(r.status_code == 202 for r in waiting)
        r = c.post("/v1/jobs", json=long)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert "the queue is full" in r.json()["error"]["message"]
        for job in [first] + [w.json() for w in waiting]:
            c.post(f"/v1/jobs/{job['id']}/cancel")


def test_api_keys(lively_model_file, tmp_path):
    app = create_app(ServeConfig(models=[lively_model_file], data_dir=tmp_path, api_keys=("s3cret",)))
    with TestClient(app) as c:
        r = c.get("/v1/models")
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
        assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/v1/models", params={"key": "s3cret"}).status_code == 200
        assert c.get("/").status_code == 200  # the studio page itself is public; its API calls are not


def test_image_urls_cannot_escape_the_image_folder(client, tmp_path):
    job = client.post("/v1/images/generations", json={"prompt": "a cross", "response_format": "url"}).json()
    (tmp_path / "secret.png").write_bytes(b"not for you")
    jid = job["id"]
    for path in [
        f"/v1/images/files/{jid}/..%2F..%2Fsecret.png",
        f"/v1/images/files/{jid}/%2e%2e%2f%2e%2e%2fsecret.png",
        "/v1/images/files/..%2F..%2F/secret.png",
        f"/v1/images/files/{jid}/../../secret.png",
        "/v1/images/files/..%2f/inkwash.db",
        f"/v1/images/files/{jid}/0.png%00.txt",
        f"/v1/images/files/{jid}/99.png",
    ]:
        r = client.get(path)
        assert r.status_code == 404, path
        assert b"not for you" not in r.content
    assert client.get(f"/v1/images/files/{jid}/0.png").status_code == 200


# --- the arena --------------------------------------------------------------------------------------------


def test_arena_vote_updates_the_ranking(client):
    contestants = client.get("/v1/arena/contestants").json()["data"]
    assert len(contestants) == 3  # one model: itself, with fewer steps, with lower guidance
    match = client.post("/v1/arena/matches", json={"prompt": "a red circle", "seed": 4}).json()
    assert "model" not in match["left"] and "request" not in match["left"]  # blind until the vote
    early = client.post(f"/v1/arena/matches/{match['id']}/vote", json={"winner": "left"})
    if early.status_code == 409:  # asked before both images were done
        assert "both images must be finished" in early.json()["error"]["message"]
    for side in ("left", "right"):
        while client.get(f"/v1/jobs/{match[side]['id']}").json()["status"] != "succeeded":
            time.sleep(0.01)
    if early.status_code != 200:
        out = client.post(f"/v1/arena/matches/{match['id']}/vote", json={"winner": "left"}).json()
    else:
        out = early.json()
    winner = out["match"]["left"]["contestant"]
    rows = {row["name"]: row for row in out["ranking"]}
    assert rows[winner]["wins"] == 1 and rows[winner]["rating"] > 1000
    assert rows[out["match"]["right"]["contestant"]]["losses"] == 1
    assert client.get("/v1/arena/ranking").json()["data"] == out["ranking"]
    again = client.post(f"/v1/arena/matches/{match['id']}/vote", json={"winner": "right"})
    assert again.status_code == 409 and "already has a vote" in again.json()["error"]["message"]
    bad = client.post(f"/v1/arena/matches/{match['id']}/vote", json={"winner": "both"})
    assert bad.status_code == 400
    # both sides drew the same prompt and seed
    left, right = (client.get(f"/v1/jobs/{match[s]['id']}").json()["request"] for s in ("left", "right"))
    assert (left["prompt"], left["seed"]) == (right["prompt"], right["seed"]) == ("a red circle", 4)
    assert client.get("/v1/gallery").json()["data"] == []  # arena images stay out of the gallery


# --- the batching engine ----------------------------------------------------------------------------------


def random_request(rng: random.Random, i: int) -> dict:
    return {
        "prompt": rng.choice(["a red circle", "two blue squares", "a small green star on the left", "a hexagon"]),
        "negative_prompt": rng.choice(["", "", "red"]),
        "n": rng.choice([1, 1, 2]),
        "seed": 1000 + 7 * i,
        "size": rng.choice([8, 16]),
        "steps": rng.randint(1, 6),
        "guidance": rng.choice([1.0, 2.0, 4.5]),
        "sampler": rng.choice(list(SAMPLERS)),
    }


@pytest.mark.slow
def test_200_concurrent_requests_each_match_their_single_render(lively_model_file, tmp_path, free_port):
    """Continuous batching must lose nothing and mix nothing up: every image equals its single-request render
    (pixels within 2/255; batched arithmetic may differ in the last bits, a mix-up differs grossly)."""
    app = create_app(ServeConfig(models=[lively_model_file], data_dir=tmp_path, limits=Limits(max_size=32)))
    port = free_port
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    rng = random.Random(0)
    bodies = [random_request(rng, i) for i in range(200)]

    async def send_all():
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=300, limits=limits) as c:
            return await asyncio.gather(*(c.post("/v1/images/generations", json=b) for b in bodies))

    try:
        responses = asyncio.run(send_all())
    finally:
        server.should_exit = True
        thread.join(10)
    engine = app.state.service.engine
    pipe = Pipeline.from_file(lively_model_file)
    worst, calls = 0, 0
    for body, r in zip(bodies, responses):
        assert r.status_code == 200, r.text
        out = r.json()
        req = out["request"]
        assert {k: req[k] for k in body} == body
        want = reference(pipe, req)
        assert len(out["data"]) == body["n"]
        s = pipe.settings(**{k: req[k] for k in ("sampler", "steps", "guidance", "schedule", "rescale")})
        for i, d in enumerate(out["data"]):
            img = decode(d["b64_json"])
            assert d["seed"] == body["seed"] + i
            assert img.info["parameters"] == png_parameters(
                body["prompt"], body["negative_prompt"], s, body["seed"] + i, body["size"], "tiny"
            )
            worst = max(worst, int(np.abs(np.asarray(img, dtype=int) - want[i].astype(int)).max()))
        calls += body["steps"] * (2 if body["sampler"] == "heun" else 1)
    print(f"200 requests: largest pixel difference {worst}/255; {engine.forwards} forwards for {calls} single calls")
    assert worst <= 2
    assert engine.forwards < calls / 4, (engine.forwards, calls)  # the requests really were batched


def test_requests_join_and_leave_between_steps(lively_model_file):
    """A request submitted while another is mid-way joins the running batch (no waiting for it to end)."""
    pipe = Pipeline.from_file(lively_model_file)
    engine = Engine({"tiny": pipe}, max_rows=64).start()
    started, progress = {}, {"a": 0}
    done = {}

    def work(name, steps):
        return Work(name, "tiny", "a circle", "", 1, 3, 16, {"sampler": "euler", "steps": steps, "guidance": 2.0},
                    on_start=lambda: started.setdefault(name, progress["a"]),
                    on_progress=lambda i, n, x0: progress.__setitem__(name, i) if name == "a" else None,
                    on_done=lambda x: done.__setitem__(name, x))  # fmt: skip

    engine.submit(work("a", 60))
    while progress["a"] < 5:
        time.sleep(0.001)
    engine.submit(work("b", 3))
    assert wait_idle(engine)
    engine.stop()
    assert 5 <= started["b"] < 60 and set(done) == {"a", "b"}
    # b joined while a ran, and left long before a finished; both equal their single renders
    for name, steps in (("a", 60), ("b", 3)):
        want = pipe.generate("a circle", seed=3, size=16, sampler="euler", steps=steps, guidance=2.0)
        assert (done[name] - want).abs().max() < 2 / 255


def test_cached_requests_keep_their_own_cache_and_equal_their_single_renders(lively_model_file):
    """Two requests with a step cache, one without, all running at once: each cached request's forwards run
    apart (its cache follows its own steps), and every image equals `generate` with the same settings."""
    pipe = Pipeline.from_file(lively_model_file)
    engine = Engine({"tiny": pipe}, max_rows=64).start()
    done = {}
    specs = {"a": ("deepcache:2", 7), "b": ("deepcache:3:1", 5), "c": (None, 6)}
    for name, (cache, steps) in specs.items():
        settings = {"sampler": "dpmpp_2m", "steps": steps, "guidance": 2.0, "cache": cache}
        engine.submit(Work(name, "tiny", f"a circle {name}", "", 2, 5, 16, settings,
                           on_done=lambda x, name=name: done.__setitem__(name, x)))  # fmt: skip
    assert wait_idle(engine)
    engine.stop()
    assert set(done) == set(specs)
    for name, (cache, steps) in specs.items():
        want = pipe.generate(f"a circle {name}", n=2, seed=5, size=16, sampler="dpmpp_2m", steps=steps,
                             guidance=2.0, cache=cache)  # fmt: skip
        assert (done[name] - want).abs().max() < 2 / 255
        if cache:  # the cache really skipped work: uncached images differ
            plain = pipe.generate(f"a circle {name}", n=2, seed=5, size=16, sampler="dpmpp_2m", steps=steps,
                                  guidance=2.0)  # fmt: skip
            assert (done[name] - plain).abs().max() > 2 / 255


def test_serve_applies_quantization_and_a_default_cache_and_says_so(lively_model_file, tmp_path):
    """`inkwash serve --quantize int8 --cache deepcache:2`: each image equals `generate` with the same model
    quantized and the same cache, and its PNG parameters name both."""
    from inkwash.accel.fast import accelerate

    cfg = ServeConfig(models=[lively_model_file], data_dir=tmp_path, limits=Limits(max_size=32), quantize="int8",
                      cache="deepcache:2")  # fmt: skip
    with TestClient(create_app(cfg)) as c:
        out = c.post("/v1/images/generations", json={"prompt": "a red circle", "seed": 4, "steps": 6}).json()
    assert out["request"]["cache"] == "deepcache:2"
    img = decode(out["data"][0]["b64_json"])
    assert "Cache: deepcache:2" in img.info["parameters"] and "Quantize: int8" in img.info["parameters"]
    pipe = Pipeline.from_file(lively_model_file)
    accelerate(pipe, quantize_mode="int8")
    want = to_uint8_hwc(pipe.generate("a red circle", seed=4, steps=6, cache="deepcache:2"))
    assert np.abs(np.asarray(img, dtype=int) - want[0].astype(int)).max() <= 2


def test_serve_refuses_a_cache_the_model_cannot_take_in_one_sentence(lively_model_file, tmp_path):
    from inkwash.errors import UserError

    cfg = ServeConfig(models=[lively_model_file], data_dir=tmp_path, cache="fbcache:0.1")
    with pytest.raises(UserError, match="fbcache needs a transformer"):
        create_app(cfg)


def test_a_class_conditional_model_is_served_by_class_label(class_model_file, tmp_path):
    """`class_label` in place of a prompt: the image equals `generate(class_label=...)`, the PNG says `class N`,
    and each mix-up (a prompt, no label, a label out of range, a label for a text model) is one 400 sentence."""
    path = class_model_file
    app = create_app(ServeConfig(models=[path], data_dir=tmp_path / "data", limits=Limits(max_size=32)))
    with TestClient(app) as c:
        out = c.post("/v1/images/generations", json={"class_label": 7, "seed": 2}).json()
        errors = [c.post("/v1/images/generations", json=body).json()["error"] for body in
                  ({"prompt": "a circle", "class_label": 7}, {"seed": 1}, {"class_label": 10})]  # fmt: skip
    assert out["request"]["class_label"] == 7
    img = decode(out["data"][0]["b64_json"])
    assert img.info["parameters"].startswith("class 7\n")
    pipe = Pipeline.from_file(path)
    want = to_uint8_hwc(pipe.generate(None, class_label=7, seed=2))
    assert np.abs(np.asarray(img, dtype=int) - want[0].astype(int)).max() <= 2
    assert "takes no prompt" in errors[0]["message"] and errors[1]["param"] == errors[2]["param"] == "class_label"
    assert "between 0 and 9, got 10" in errors[2]["message"]


def test_a_text_model_refuses_a_class_label(client):
    r = client.post("/v1/images/generations", json={"prompt": "a circle", "class_label": 3})
    assert r.status_code == 400 and "has no class labels" in r.json()["error"]["message"]


# --- fuzzing: no request body gets a 5xx or a traceback -----------------------------------------------------

ANY = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30), st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)  # fmt: skip
VALID = {
    "n": st.integers(1, 3),
    "size": st.sampled_from(["16x16", "8x8", "auto", 16]),
    "response_format": st.sampled_from(["b64_json", "url"]),
    "negative_prompt": st.text(max_size=20),
    "steps": st.integers(1, 4),
    "guidance": st.floats(0, 30),
    "sampler": st.sampled_from(list(SAMPLERS)),
    "schedule": st.sampled_from(["trailing", "karras", "leading"]),
    "seed": st.integers(0, 2**32 - 1),
    "model": st.just("tiny"),
}
INVALID = {
    "n": st.integers(-3, 12), "size": st.sampled_from(["32x16", "0x0", "x", "99999x99999", "15"]),
    "steps": st.integers(-2, 120), "guidance": st.floats(-5, 40), "sampler": st.just("nope"),
    "schedule": st.sampled_from(["wiggly", "lcm", "shift"]), "seed": st.integers(-5, 2**33),
}  # fmt: skip


def mostly(valid, *others, every: int = 8):
    """`valid`, except one draw in `every` from the others (hypothesis's one_of dedupes repeated strategies)."""
    return st.integers(0, every - 1).flatmap(lambda k: valid if k else st.one_of(*others))


FIELDS = {k: mostly(v, INVALID.get(k, ANY), ANY) for k, v in VALID.items()}


STATUSES: list[int] = []


@settings(
    max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=st.fixed_dictionaries({"prompt": mostly(st.text(min_size=1, max_size=40), ANY)}, optional=FIELDS))
def test_fuzzed_bodies_get_a_4xx_sentence_or_a_job(client, body):
    r = client.post("/v1/jobs", content=json.dumps(body), headers={"content-type": "application/json"})  # NaN too
    STATUSES.append(r.status_code)
    assert r.status_code in (202, 400, 404), (body, r.status_code, r.text)
    if r.status_code == 202:
        client.post(f"/v1/jobs/{r.json()['id']}/cancel")
    else:
        message = r.json()["error"]["message"]
        assert message and "Traceback" not in message and "\n" not in message, message


def test_the_fuzzer_reached_both_outcomes():
    """Guards the fuzz test above against testing only one branch (it runs first in this module)."""
    if not STATUSES:
        pytest.skip("the fuzz test did not run in this session")
    assert STATUSES.count(202) >= 15 and STATUSES.count(400) >= 50, collections.Counter(STATUSES)
