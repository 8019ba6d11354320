"""The annotation page end to end in a real headless Chromium (Debian's /usr/bin/chromium driven by Playwright;
no browser is downloaded): an annotator completes a tournament by keyboard only, skipping one pair and undoing
one judgment, and the exported levels equal those computed from the annotator's own log. A screenshot of the
page is saved under the test's tmp dir (its path is printed: `pytest -rP` shows it, and the JUnit XML report
holds it as the property `screenshot`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from annotate.__main__ import main
from ernie_jax.aesthetics import ranking
from tests.annotate_servers import Service, create_campaign, make_images, replay_logs

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
KEYS = {"left": "ArrowLeft", "right": "ArrowRight", "tie": "ArrowDown", "skip": "s"}
NUM_ITEMS, ROUNDS = 6, 3


@pytest.fixture
def browser_page(tmp_path):
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: as root, `apt-get install -y --no-install-recommends chromium` "
                    "(.ci/run does); the page test never downloads a browser")
    from playwright.sync_api import sync_playwright

    profile = tmp_path / "chromium-profile"
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1366, "height": 768})
        try:
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()
    shutil.rmtree(profile, ignore_errors=True)


def _state(page) -> dict:
    return page.evaluate("""() => ({state: document.body.dataset.state, pair: document.body.dataset.pairId,
        left: Number(document.getElementById('left').dataset.imageId),
        right: Number(document.getElementById('right').dataset.imageId),
        round: document.getElementById('round').textContent})""")


def _press(page, key: str, shown_pair: str | None) -> dict:
    """Presses KEY and waits until the page shows another pair (or the same pair, for undo) and is idle."""
    page.keyboard.press(key)
    page.wait_for_function("""(previous) => {
        const state = document.body.dataset.state;
        return state === 'done' || (state === 'ready' && document.body.dataset.pairId !== previous);
    }""", arg=shown_pair, timeout=20_000)
    return _state(page)


def test_an_annotator_completes_a_tournament_by_keyboard(browser_page, tmp_path, record_property):
    page = browser_page
    make_images(tmp_path / "images", NUM_ITEMS, size=24)
    db = str(tmp_path / "annotations.db")
    token = create_campaign(db, tmp_path / "images", "study", ["ann"], ROUNDS, tmp_path)["ann"]
    service = Service(db, tmp_path / "serve.log").start()
    requests, preloads = [], []
    page.on("request", lambda request: requests.append(request.url))

    def remember_preloads(response):
        if "/api/" in response.url and response.ok:
            body = response.json()
            preloads.extend((body.get("next") or body).get("preload", []))

    page.on("response", remember_preloads)
    try:
        page.goto(f"{service.url}/#token={token}")
        page.wait_for_function("document.body.dataset.state === 'ready'", timeout=20_000)
        shown = _state(page)
        assert shown["round"] == f"Round 1 of {ROUNDS}" and "token" not in page.url
        for side in ("left", "right"):
            box = page.locator(f"#{side}").bounding_box()
            assert box["width"] > 0.45 * 1366 and box["height"] > 0.75 * 768, (side, box)
        screenshot = tmp_path / "annotation_page.png"
        page.screenshot(path=str(screenshot))
        print(f"screenshot of the annotation page: {screenshot}")  # shown with pytest -rP
        record_property("screenshot", str(screenshot))

        log, skipped, undone = [], False, False
        while shown["state"] != "done":
            if not skipped:  # skip the first pair: it comes back at the end of round 1
                skipped_pair, skipped = (0, shown["left"], shown["right"]), True
                shown = _press(page, KEYS["skip"], shown["pair"])
                continue
            choice = "left" if shown["left"] < shown["right"] else "right"
            previous = shown
            shown = _press(page, KEYS[choice], shown["pair"])
            log.append((int(previous["round"].split()[1]) - 1, previous["left"], previous["right"], choice))
            if not undone and len(log) == 1:  # undo it, then judge that pair the other way
                shown = _press(page, "z", shown["pair"])
                assert shown["pair"] == previous["pair"], "undo shows the undone pair again"
                log.pop()
                undone = True
                other = "right" if choice == "left" else "left"
                shown = _press(page, KEYS[other], shown["pair"])
                log.append((int(previous["round"].split()[1]) - 1, previous["left"], previous["right"], other))
        assert "complete" in page.locator("#message").text_content()
    finally:
        service.stop()
    assert len(log) == ROUNDS * NUM_ITEMS // 2
    assert skipped_pair in [game[:3] for game in log]  # judged later in round 1
    assert all(url.startswith(service.url) for url in requests), [u for u in requests if not u.startswith(service.url)]
    requested = set(requests)
    assert preloads and all(f"{service.url}{url}" in requested for url in preloads)

    tournament = replay_logs(db, {"ann": log})["ann"]
    out = tmp_path / "levels.json"
    assert main(["export", "--db", db, "--name", "study", "--out", str(out)]) == 0
    exported = json.loads(out.read_text())
    index = {item: position for position, item in enumerate(tournament.item_ids)}
    scores = ranking.bradley_terry(NUM_ITEMS, [(index[a], index[b], c) for _, a, b, c in log]).scores
    assert [row["ann:level"] for row in exported["items"]] == list(ranking.levels_from_scores(scores, 10))
    assert [row["level"] for row in exported["items"]] == list(ranking.levels_from_scores(scores, 10))
