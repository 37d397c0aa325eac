"""The dashboard at / in a real headless Chromium (Playwright driving Debian's ``chromium``), against a real
``polyak serve`` whose jobs run in its own process (``num_workers: 0``: no Ray).

Every page a test opens is watched: each request must stay on the server's origin, and no console error or
page error may appear except the "Failed to load resource" line Chromium logs for an HTTP error status the
test provokes on purpose (the 422 of a bad spec, the 401 before a token). Screenshots of every view go to
``$POLYAK_ARTIFACTS`` (default ``test-artifacts/``); with ``POLYAK_UPDATE_DOCS=1`` the job and compare views
are also written to ``docs/`` for the README.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
import yaml
from conftest import LOCAL_IRIS, deep_merge
from test_service import REPO, SLOW, Server

from polyak import JobState

ARTIFACTS = Path(os.environ.get("POLYAK_ARTIFACTS", REPO / "test-artifacts")) / "dashboard"
DOCS = REPO / "docs"
DASHBOARD = REPO / "service" / "server" / "dashboard"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
TOKEN = "dashboard-secret-7f3a"
RUNNING_FOREVER = deep_merge(LOCAL_IRIS, {**SLOW, "data": {"name": "digits", "validation_fraction": 0.2}})
RESOURCE_ERROR = re.compile(r"Failed to load resource: the server responded with a status of (\d+)")


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("the dashboard tests drive Debian's Chromium, which is not on PATH: apt-get install chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("dashboard") / "data", "--max-concurrent-jobs", "3").start()
    yield s
    s.stop_or_kill()


class Watched:
    """A page whose requests, HTTP errors and console are recorded, checked by ``check`` after the test."""

    def __init__(self, browser, base: str, viewport: dict):
        self.base = base
        self.context = browser.new_context(viewport=viewport, accept_downloads=True)
        self.page = self.context.new_page()
        self.requests, self.errors, self.statuses = [], [], []
        self.allowed: set[int] = set()
        self.page.on("request", lambda r: self.requests.append(r))
        self.page.on("response", lambda r: self.statuses.append((r.status, r.url)) if r.status >= 400 else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        self.page.on("console", self._console)

    def _console(self, message) -> None:
        if message.type != "error":
            return
        expected = RESOURCE_ERROR.match(message.text)
        if not (expected and int(expected[1]) in self.allowed):
            self.errors.append(f"console error: {message.text} at {message.location}")

    def goto(self, fragment: str = "") -> None:
        self.page.goto(f"{self.base}/{fragment}")

    def shot(self, name: str, docs_name: str | None = None, full_page: bool = False) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        DOCS.mkdir(exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=full_page)
        if docs_name and os.environ.get("POLYAK_UPDATE_DOCS") == "1":
            self.page.screenshot(path=str(DOCS / docs_name))

    def check(self) -> None:
        origin = urlsplit(self.base)[:2]
        # A blob: URL (a weights download) carries the page's origin after its scheme.
        foreign = [r.url for r in self.requests if urlsplit(r.url.removeprefix("blob:"))[:2] != origin]
        assert not foreign, f"requests left the origin {self.base}: {foreign}"
        unexpected = [(s, u) for s, u in self.statuses if s not in self.allowed]
        assert not unexpected, f"unexpected HTTP errors: {unexpected}"
        assert not self.errors, "\n".join(self.errors)


@pytest.fixture
def watched(browser, server):
    w = Watched(browser, server.url, DESKTOP)
    yield w
    w.context.close()
    w.check()


def submit(server, spec: dict, **changes) -> str:
    return server.client().submit(deep_merge(spec, changes)).id


def row(page, job_id: str):
    return page.locator(f'#jobs tr[data-job="{job_id}"]')


def test_jobs_view_is_live_filters_and_cancels(server, watched):
    c = server.client()
    done = submit(server, LOCAL_IRIS, name="iris-done", group="dash-a")
    c.job(done).wait(timeout=60)
    page = watched.page
    watched.goto()
    page.wait_for_selector(f'#jobs tr[data-job="{done}"]')
    assert "✓ succeeded" in row(page, done).inner_text()
    assert "iris-done" in row(page, done).inner_text() and "dash-a" in row(page, done).inner_text()
    page.evaluate("window.notReloaded = true")

    # Submitted after the page loaded: the row appears and its state moves on without a reload.
    live = submit(server, RUNNING_FOREVER, name="slow-live", group="dash-b")
    page.wait_for_function(
        "id => document.querySelector(`#jobs tr[data-job='${id}']`)?.dataset.state === 'running'", arg=live,
        timeout=30_000)
    epoch_cell = row(page, live).locator("td").nth(7)
    page.wait_for_function("cell => /^[1-9]/.test(cell.textContent)", arg=epoch_cell.element_handle(), timeout=30_000)
    watched.shot("jobs")

    page.get_by_role("button", name=f"cancel job {live}").click()
    page.wait_for_function(
        "id => document.querySelector(`#jobs tr[data-job='${id}']`)?.dataset.state === 'cancelled'", arg=live,
        timeout=30_000)
    assert "■ cancelled" in row(page, live).inner_text()
    assert c.get(live).state == JobState.CANCELLED
    assert row(page, live).get_by_role("button").count() == 0  # no cancel button once terminal

    page.select_option("#filter-state", "cancelled")
    page.wait_for_function("id => !document.querySelector(`#jobs tr[data-job='${id}']`)", arg=done)
    states = page.eval_on_selector_all("#jobs tbody tr", "rows => rows.map(r => r.dataset.state)")
    assert states and set(states) == {"cancelled"}
    page.select_option("#filter-state", "")
    page.fill("#filter-group", "dash-a")
    page.wait_for_function("id => !document.querySelector(`#jobs tr[data-job='${id}']`)", arg=live)
    assert page.eval_on_selector_all("#jobs tbody tr", "rows => rows.map(r => r.dataset.job)") == [done]
    page.fill("#filter-group", "")
    assert page.evaluate("window.notReloaded") is True


def test_job_view_grows_as_epochs_end_and_cancels(server, watched):
    c = server.client()
    spec = deep_merge(RUNNING_FOREVER, {"name": "slow-view",
                                        "stopping": {"weight_change_tol": 1e-9, "grad_tol": 1e-9}})
    job_id = submit(server, spec)
    page = watched.page
    watched.goto(f"#/jobs/{job_id}")
    points = "() => Number(document.querySelector('[data-chart=loss]')?.dataset.points ?? 0)"
    page.wait_for_function(f"({points})() >= 1", timeout=30_000)
    seen = page.evaluate(points)
    page.wait_for_function(f"({points})() > {seen}", timeout=30_000)  # an epoch ended: the chart grew

    # Fix 1 and Fix 1': each curve is drawn against its threshold (a second series).
    for chart in ("weight-change", "gradient"):
        assert page.get_attribute(f"[data-chart={chart}]", "data-series") == "2"
        assert not page.is_hidden(f"[data-chart={chart}]")
    assert not page.is_hidden("[data-chart=accuracy]")  # there is validation data
    assert page.is_hidden("[data-chart=staleness]")  # a sync job has none
    criteria = page.eval_on_selector_all("#criteria tbody tr", "rows => rows.map(r => r.innerText)")
    names = [r.split("\t")[0] for r in criteria]
    assert names == [cr.name for cr in c.get(job_id).metrics.criteria]
    assert {"weight_change", "gradient", "max_epochs"} <= set(names)
    assert all("not met" in r for r in criteria)
    watched.shot("job-running", full_page=True)

    page.get_by_role("button", name="Cancel job").click()
    page.wait_for_selector("h1 >> text=cancelled", timeout=30_000)
    assert c.get(job_id).state == JobState.CANCELLED
    streams = [r.url for r in watched.requests if "/events" in r.url]
    assert streams and streams[0].endswith(f"/jobs/{job_id}/events?after=0")


def test_finished_job_view_criteria_spec_and_weights(server, watched):
    """The README's job view: digits, stopped by the weight-change criterion (Fix 1)."""
    c = server.client()
    spec = deep_merge(yaml.safe_load((REPO / "examples" / "digits.yaml").read_text()), {
        "cluster": {"num_workers": 0},
        "stopping": {"max_epochs": 30, "weight_change_tol": 0.02, "grad_tol": 0.01},
    })
    job_id = c.submit(spec).id
    info = c.job(job_id).wait(timeout=120)
    assert info.state == JobState.SUCCEEDED and info.stop_reason.value == "weight_change"
    page = watched.page
    watched.goto(f"#/jobs/{job_id}")
    page.wait_for_selector("h1 >> text=succeeded")
    page.wait_for_function(f"document.querySelector('[data-chart=loss]').dataset.points === '{info.epoch}'")

    # The criteria table is the last epoch's, and the spec shown parses back (PyYAML) into the job's spec.
    rows = page.eval_on_selector_all("#criteria tbody tr", "rows => rows.map(r => r.innerText.split('\\t'))")
    assert [(r[0], r[3].endswith(" met") and not r[3].endswith("not met")) for r in rows] == [
        (cr.name, cr.met) for cr in info.metrics.criteria]
    assert yaml.safe_load(page.inner_text("#spec-yaml")) == info.spec.model_dump(mode="json")
    watched.shot("job", docs_name="dashboard-job.png")

    for which in ("last", "best"):
        with page.expect_download() as download:
            page.get_by_role("button", name=f"Download {which} weights").click()
        saved = Path(download.value.path())
        assert download.value.suggested_filename == f"{job_id}-{which}.npz"
        assert saved.read_bytes() == httpx.get(f"{server.url}/jobs/{job_id}/weights?which={which}").content
        with np.load(saved, allow_pickle=False) as w:
            assert [w[k].shape for k in ("W1", "b1", "W2", "b2")] == [(64, 64), (64,), (10, 64), (10,)]


def test_submit_shows_field_errors_then_opens_the_job(server, watched, tmp_path):
    watched.allowed.add(422)
    page = watched.page
    watched.goto("#/submit")
    bad = yaml.safe_dump(deep_merge(LOCAL_IRIS, {"stopping": {"max_epochs": -1}, "optimizer": {"lr": "fast"}}))
    spec_file = tmp_path / "bad.yaml"
    spec_file.write_text(bad)
    page.set_input_files("#spec-file", str(spec_file))
    page.wait_for_function("text => document.querySelector('#spec-text').value === text", arg=bad)
    page.get_by_role("button", name="Submit job").click()
    page.wait_for_selector("#spec-errors li")

    answer = httpx.post(f"{server.url}/jobs", content=bad, headers={"Content-Type": "application/yaml"})
    assert answer.status_code == 422
    shown = page.eval_on_selector_all("#spec-errors li", "items => items.map(li => li.innerText)")
    assert shown == [f"{e['field']}: {e['message']}" for e in answer.json()["errors"]]
    assert any(s.startswith("stopping.max_epochs: ") for s in shown)
    assert any(s.startswith("optimizer.lr: ") for s in shown)
    assert page.get_attribute("#spec-text", "aria-invalid") == "true"
    watched.shot("submit-errors")

    page.fill("#spec-text", yaml.safe_dump(deep_merge(LOCAL_IRIS, {"name": "from-the-page"})))
    page.get_by_role("button", name="Submit job").click()
    page.wait_for_url(re.compile(r"#/jobs/\w+$"))
    job_id = page.url.rsplit("/", 1)[1]
    assert server.client().get(job_id).name == "from-the-page"
    page.wait_for_selector("h1 >> text=from-the-page")


def test_compare_heavy_ball_against_gd(server, watched):
    c = server.client()
    examples = {name: yaml.safe_load((REPO / "examples" / f"quadratic_{name}.yaml").read_text())
                for name in ("heavy_ball", "gd")}
    ids = {name: c.submit({**spec, "group": "hb-vs-gd"}).id for name, spec in examples.items()}
    last_step = {}
    for name, job_id in ids.items():
        assert c.job(job_id).wait(timeout=120).state == JobState.SUCCEEDED
        last_step[name] = c.metrics(job_id)[-1].step
    assert last_step["heavy_ball"] < last_step["gd"]

    page = watched.page
    watched.goto("#/compare?group=hb-vs-gd")
    page.wait_for_selector("[data-chart=compare]:not([hidden])")
    assert page.get_attribute("[data-chart=compare]", "data-series") == "2"
    steps = {r["job"]: int(r["steps"]) for r in page.eval_on_selector_all(
        "#compare-table tbody tr", "rows => rows.map(r => r.dataset)")}
    assert steps == {ids["heavy_ball"]: last_step["heavy_ball"], ids["gd"]: last_step["gd"]}
    # x is the step: the union of both jobs' steps, so the longer run sets the axis.
    assert page.get_attribute("[data-chart=compare]", "data-points") == str(last_step["gd"])
    dashes = page.eval_on_selector_all("#compare-table .swatch", "s => s.map(x => x.dataset.dash)")
    assert len(set(dashes)) == 2  # told apart by line pattern, not colour alone
    watched.shot("compare", docs_name="dashboard-compare.png")

    # Picked in the jobs view instead.
    watched.goto()
    for job_id in ids.values():
        page.get_by_role("checkbox", name=f"select job {job_id} to compare").check()
    page.get_by_role("button", name="Compare selected (2)").click()
    page.wait_for_url(re.compile(r"#/compare\?ids="))
    assert set(page.url.split("ids=")[1].split(",")) == set(ids.values())
    page.wait_for_selector("[data-chart=compare]:not([hidden])")
    assert page.get_attribute("[data-chart=compare]", "data-series") == "2"


def test_token_is_asked_once_and_sent_as_a_header(browser, tmp_path):
    server = Server(tmp_path / "data", "--token", TOKEN).start()
    w = Watched(browser, server.url, DESKTOP)
    w.allowed.add(401)
    try:
        job_id = server.client(token=TOKEN).submit(deep_merge(LOCAL_IRIS, {"name": "guarded"})).id
        page = w.page
        assert page.goto(f"{server.url}/").status == 200  # the page loads to ask; only the JSON API checks
        page.wait_for_selector("#token-dialog[open]")
        page.fill("#token-input", "not-it")
        page.get_by_role("button", name="Use token").click()
        page.wait_for_selector("#token-dialog[open] >> text=wrong bearer token")
        page.fill("#token-input", TOKEN)
        page.get_by_role("button", name="Use token").click()
        page.wait_for_selector(f'#jobs tr[data-job="{job_id}"]')
        assert page.is_hidden("#token-dialog")

        page.click(f'#jobs a[href="#/jobs/{job_id}"]')  # the live stream also carries the header
        page.wait_for_function("Number(document.querySelector('[data-chart=loss]')?.dataset.points ?? 0) > 0")
        w.shot("token-job")
        api = [r for r in w.requests if urlsplit(r.url).path.startswith("/jobs")]
        assert any("/events" in r.url for r in api)
        assert all(r.response().status == 401 or r.headers.get("authorization") == f"Bearer {TOKEN}" for r in api)
        assert not [r.url for r in w.requests if TOKEN in r.url]
        assert page.evaluate("sessionStorage.getItem('polyak.token')") == TOKEN
    finally:
        w.context.close()
        server.stop_or_kill()
    w.check()


def test_the_live_stream_carries_the_bearer_header_and_the_token_is_in_no_url(browser, tmp_path):
    """The job view's event stream, its request recorded as the page sends it, against a ``polyak serve --token``:
    it carries ``Authorization: Bearer <token>`` and is answered 200 (asserted on the request itself, not inferred
    from a chart that would otherwise never fill), epochs arrive over it live, and the token is in no URL."""
    server = Server(tmp_path / "data", "--token", TOKEN).start()
    w = Watched(browser, server.url, DESKTOP)  # no 401 allowed: the tab holds the token from the start
    try:
        c = server.client(token=TOKEN)
        job_id = c.submit(deep_merge(RUNNING_FOREVER, {"name": "streamed"})).id
        # Where the token dialog keeps it; guarded: the page's first document, about:blank, has no storage.
        w.context.add_init_script(f"try {{ sessionStorage.setItem('polyak.token', {json.dumps(TOKEN)}); }} "
                                  "catch (e) {}")
        events_path = f"/jobs/{job_id}/events"
        with w.page.expect_request(lambda r: urlsplit(r.url).path == events_path, timeout=30_000) as sent:
            w.goto(f"#/jobs/{job_id}")
        stream = sent.value
        assert stream.headers.get("authorization") == f"Bearer {TOKEN}", stream.headers
        assert stream.headers.get("accept") == "text/event-stream"
        assert stream.response().status == 200

        points = "() => Number(document.querySelector('[data-chart=loss]')?.dataset.points ?? 0)"
        w.page.wait_for_function(f"({points})() >= 1", timeout=30_000)
        seen = w.page.evaluate(points)
        w.page.wait_for_function(f"({points})() > {seen}", timeout=30_000)  # live epochs came over the stream
        c.cancel(job_id)
        w.page.wait_for_selector("h1 >> text=cancelled", timeout=30_000)
        streams = [r for r in w.requests if urlsplit(r.url).path == events_path]
        assert all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in streams)
        assert [r.url for r in w.requests if TOKEN in r.url] == []
    finally:
        w.context.close()
        server.stop_or_kill()
    w.check()


def test_phone_width_stacks_and_scrolls_tables_sideways(server, browser):
    submit(server, LOCAL_IRIS, name="phone")
    w = Watched(browser, server.url, PHONE)
    try:
        page = w.page
        w.goto()
        page.wait_for_selector("#jobs tbody tr")
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]  # the page itself fits
        assert page.evaluate("(el => el.scrollWidth > el.clientWidth)(document.querySelector('.table-wrap'))")
        w.shot("phone-jobs")
        job_id = page.get_attribute("#jobs tbody tr", "data-job")
        w.goto(f"#/jobs/{job_id}")
        page.wait_for_selector("[data-chart=loss]:not([hidden]) canvas")
        boxes = [page.locator(f"[data-chart={name}]").bounding_box() for name in ("loss", "schedule")]
        assert all(b["x"] + b["width"] <= PHONE["width"] for b in boxes)
        assert boxes[1]["y"] >= boxes[0]["y"] + boxes[0]["height"]  # one chart under the other
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        w.shot("phone-job", full_page=True)
    finally:
        w.context.close()
    w.check()


def test_api_docs_page_is_served_from_the_package(watched):
    watched.goto("docs")
    watched.page.wait_for_selector(".swagger-ui .info .title >> text=polyak")
    assert any(r.url.endswith("/openapi.json") for r in watched.requests)


def test_yaml_emitter_round_trips_through_pyyaml(watched):
    value = {
        "plain": "digits", "yes": "yes", "looks_numeric": "1e-8", "colon": "a: b", "empty": "", "quote": 'say "hi"',
        "unicode": "μ-Σ ✓", "null": None, "flags": [True, False], "floats": [1e-8, 1e21, -0.5, 2.0, 3],
        "nested": {"deeper": {"list": [[1, 2], {"k": "v", "m": [1]}], "none": {}, "nothing": []}},
        "records": [{"name": "a", "tol": 1e-3}, {"name": "b"}], "12": "numeric key",
    }
    watched.goto()
    text = watched.page.evaluate(
        "async v => (await import('/dashboard/yaml.js')).toYaml(v)", value)
    assert yaml.safe_load(text) == value
