"""The web studio, driven in a real browser (Debian's Chromium through Playwright) against the real server.

Skipped where /usr/bin/chromium or Playwright is missing, unless INKWASH_REQUIRE_BROWSER=1 (as in CI):
then that is a failure.
"""

import contextlib
import json
import os
import socket
import threading
import time
import urllib.request

import pytest

CHROMIUM = "/usr/bin/chromium"
REQUIRED = os.environ.get("INKWASH_REQUIRE_BROWSER") == "1"

if not os.path.exists(CHROMIUM):
    if REQUIRED:
        pytest.fail(f"INKWASH_REQUIRE_BROWSER=1 but {CHROMIUM} is missing", pytrace=False)
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)", allow_module_level=True)
try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:
    if REQUIRED:
        raise
    pytest.skip("playwright is not installed", allow_module_level=True)

import uvicorn  # noqa: E402

from inkwash.serve.app import create_app  # noqa: E402

LAUNCH_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
TIMEOUT_MS = 15_000
expect.set_options(timeout=TIMEOUT_MS)
STEPS = 60  # enough denoising steps (about a second for the tiny model) to watch the progress bar move


@contextlib.contextmanager
def serving(app):
    """`app` under uvicorn in a thread, on a free port of 127.0.0.1; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1, ws="none"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="module")
def server(model_file, tmp_path_factory):
    with serving(create_app(models=[model_file], data_dir=tmp_path_factory.mktemp("serve"))) as base:
        yield base


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        yield b
        b.close()


def new_page(browser, base):
    """A fresh page in a fresh context; `page.problems` collects console errors, uncaught exceptions and
    requests that leave the server (the studio must work offline)."""
    context = browser.new_context()
    context.set_default_timeout(TIMEOUT_MS)
    pg = context.new_page()
    problems = []

    def on_console(message):
        if message.type == "error":
            problems.append(f"console.error: {message.text}")

    def on_request(request):
        if not request.url.startswith((base, "data:")):
            problems.append(f"request off the server: {request.url}")

    pg.on("console", on_console)
    pg.on("pageerror", lambda e: problems.append(f"uncaught: {e}"))
    pg.on("request", on_request)
    pg.base, pg.problems = base, problems
    return pg


@pytest.fixture
def page(browser, server):
    """A fresh page; at the end, no console errors, no uncaught exceptions, and no request off the server."""
    pg = new_page(browser, server)
    yield pg
    pg.context.close()
    assert pg.problems == []


def api(base, method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def finished_job(base, body):
    job = api(base, "POST", "/v1/jobs", body)
    deadline = time.monotonic() + 30
    while job["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, "the job did not finish"
        time.sleep(0.05)
        job = api(base, "GET", f"/v1/jobs/{job['id']}")
    assert job["status"] == "succeeded", job
    return job


def wait_images_loaded(page, selector, count):
    """Wait until `count` images match `selector`, all of them decoded from /v1/images/files/."""
    page.wait_for_function(
        """([sel, n]) => {
            const imgs = [...document.querySelectorAll(sel)];
            const ok = (i) => i.complete && i.naturalWidth > 0 && i.src.includes('/v1/images/files/');
            return imgs.length === n && imgs.every(ok);
        }""",
        arg=[selector, count],
    )


def setting(page, name):
    return page.locator(f'#result-settings dd[data-setting="{name}"]').inner_text()


def test_page_loads_without_console_errors(page):
    page.goto(page.base + "/")
    expect(page.locator("#view-generate")).to_be_visible()
    expect(page.locator("#sampler option").first).to_be_attached()
    for tab, view in (("gallery", "#view-gallery"), ("arena", "#view-arena"), ("generate", "#view-generate")):
        page.click(f'a.tab[href="#{tab}"]')
        expect(page.locator(view)).to_be_visible()
    expect(page.locator("#error")).to_be_hidden()
    # the form starts from the model's defaults
    model = api(page.base, "GET", "/v1/models")["data"][0]
    assert page.input_value("#sampler") == model["defaults"]["sampler"]
    assert int(page.input_value("#steps")) == model["defaults"]["steps"]
    assert page.input_value("#size") == str(model["image_size"])


def test_generate_shows_progress_then_the_image_and_its_settings(page):
    page.goto(page.base + "/#generate")
    expect(page.locator("#sampler option").first).to_be_attached()
    # record every value the progress bar and the preview take
    page.evaluate("""() => {
        window.seen = {progress: [], previews: 0};
        const bar = document.getElementById('progress'), img = document.getElementById('preview');
        new MutationObserver(() => window.seen.progress.push([bar.value, bar.max]))
            .observe(bar, {attributes: true, attributeFilter: ['value']});
        new MutationObserver(() => { if (img.src.startsWith('data:image/png')) window.seen.previews++; })
            .observe(img, {attributes: true, attributeFilter: ['src']});
    }""")
    page.fill("#prompt", "a red circle")
    page.fill("#negative", "blurry")
    page.fill("#steps", str(STEPS))
    page.fill("#seed", "1234")
    page.fill("#n", "2")
    page.click("#generate-btn")
    expect(page.locator("#cancel-btn")).to_be_visible()
    expect(page.locator("#result img.result-image")).to_have_count(2)
    wait_images_loaded(page, "#result img.result-image", 2)
    expect(page.locator("#cancel-btn")).to_be_hidden()

    seen = page.evaluate("window.seen")
    steps = [v for v, m in seen["progress"] if m == STEPS]
    assert steps[-1] == STEPS, seen
    assert any(0 < v < STEPS for v in steps), f"the progress bar never showed a step in between: {seen}"
    assert steps == sorted(steps)
    assert seen["previews"] >= 1
    assert page.get_attribute("#preview", "src").startswith("data:image/png;base64,")

    assert setting(page, "prompt") == "a red circle"
    assert setting(page, "negative") == "blurry"
    assert setting(page, "steps") == str(STEPS)
    assert setting(page, "sampler") == page.input_value("#sampler")
    seeds = [int(s) for s in setting(page, "seed").split(",")]
    assert len(seeds) == 2 and seeds[0] == 1234
    for src in page.locator("#result img.result-image").evaluate_all("imgs => imgs.map(i => i.getAttribute('src'))"):
        assert src.startswith("/v1/images/files/")


def test_gallery_reuse_fills_the_form(page):
    job = finished_job(page.base, {"prompt": "a blue square on the left", "steps": 5, "seed": 777, "guidance": 3.5})
    page.goto(page.base + "/#gallery")
    card = page.locator(f'.gallery-card[data-job="{job["id"]}"]')
    expect(card).to_be_visible()
    assert page.locator(".gallery-card").first.get_attribute("data-job") == job["id"], "newest first"
    expect(card).to_contain_text("a blue square on the left")
    wait_images_loaded(page, f'.gallery-card[data-job="{job["id"]}"] img', 1)
    card.locator(".reuse-btn").click()
    expect(page.locator("#view-generate")).to_be_visible()
    assert page.url.endswith("#generate")
    assert page.input_value("#prompt") == "a blue square on the left"
    assert page.input_value("#steps") == "5"
    assert page.input_value("#seed") == "777"
    assert float(page.input_value("#guidance")) == 3.5
    assert page.input_value("#sampler") == job["request"]["sampler"]


def test_arena_match_vote_updates_ranking(page):
    page.goto(page.base + "/#arena")
    expect(page.locator("#arena-prompt")).to_be_visible()
    page.fill("#arena-prompt", "a green triangle")
    page.click("#arena-fight")
    expect(page.locator("#vote-left")).to_be_enabled()
    expect(page.locator("#vote-right")).to_be_enabled()
    expect(page.locator("#vote-tie")).to_be_enabled()
    wait_images_loaded(page, "#arena-match img.arena-image.final", 2)
    before = page.locator("#ranking tbody").inner_text()

    page.click("#vote-left")
    left = page.locator("#arena-left .contestant-name")
    expect(left).to_have_class("contestant-name winner")
    name = left.inner_text()
    right = page.locator("#arena-right .contestant-name").inner_text()
    assert name and right and name != right
    row = page.locator(f'#ranking tr[data-name="{name}"]')
    expect(row).to_be_visible()
    wins = int(row.locator("td.record").inner_text().split("/")[0])
    assert wins >= 1
    assert float(row.locator("td.rating").inner_text()) > 1000
    assert page.locator("#ranking tbody").inner_text() != before
    expect(page.locator("#vote-left")).to_be_disabled()


def test_a_class_conditional_model_takes_a_class_instead_of_a_prompt(browser, class_model_file, tmp_path):
    """With an ImageNet-style model the form shows a class field in place of the prompts, and the result and the
    gallery say which class was drawn."""
    with serving(create_app(models=[class_model_file], data_dir=tmp_path)) as base:
        pg = new_page(browser, base)
        pg.goto(base + "/#generate")
        expect(pg.locator("#class-field")).to_be_visible()
        expect(pg.locator("#prompt-field")).to_be_hidden()
        assert pg.get_attribute("#class-label", "max") == "9"
        pg.fill("#class-label", "7")
        pg.fill("#seed", "5")
        pg.click("#generate-btn")
        wait_images_loaded(pg, "#result img.result-image", 1)
        assert setting(pg, "class") == "7"
        pg.goto(base + "/#gallery")
        expect(pg.locator(".card-prompt").first).to_have_text("class 7")
        pg.context.close()
        assert pg.problems == []


def test_api_key_is_asked_for_stored_and_sent(browser, model_file, tmp_path):
    app = create_app(models=[model_file], data_dir=tmp_path, api_keys=("sekret",))
    with serving(app) as base:
        page = new_page(browser, base)
        page.goto(base + "/#generate")
        expect(page.locator("#api-key")).to_be_visible()
        expect(page.locator("#error")).to_contain_text("API key")
        page.fill("#api-key", "sekret")
        page.click("#api-key-save")
        expect(page.locator("#sampler option").first).to_be_attached()
        expect(page.locator("#api-key")).to_be_hidden()
        assert page.evaluate("localStorage.getItem('inkwash.apiKey')") == "sekret"
        page.fill("#prompt", "a circle")
        page.fill("#steps", "4")
        page.click("#generate-btn")
        wait_images_loaded(page, "#result img.result-image", 1)  # the image URL carries ?key=
        assert page.get_attribute("#result img.result-image", "src").endswith("?key=sekret")
        page.reload()  # the key is remembered
        expect(page.locator("#sampler option").first).to_be_attached()
        expect(page.locator("#api-key")).to_be_hidden()
        page.context.close()
    # the only errors were the refused requests before the key was given
    assert page.problems and all("401" in p for p in page.problems), page.problems
