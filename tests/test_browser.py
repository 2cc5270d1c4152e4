"""The Space in a real browser: headless Chromium (Debian's package) types a plot, uploads a poster, clicks, and
reads the genres off the page. Saves a screenshot (also copied to artifacts/screenshot-app.png).

Needs `chromium` + `chromedriver` (`apt-get install chromium chromium-driver`; `make test` installs them as root)
and `selenium` (`pip install -e '.[dev]'`). Browsers cannot be downloaded here, so Selenium is given the Debian
driver and never asked to fetch one.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from app_helpers import LABELS, REPO, shared_app_server, start_app

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
INSTALL = "install it with `apt-get install -y chromium chromium-driver` (as root) and `pip install selenium`"
PLOT = "A young woman and her dog cross a haunted forest to rescue her brother from a witch."
TIMEOUT = 60


def _missing() -> str | None:
    if CHROMIUM is None or CHROMEDRIVER is None:
        return f"BROWSER TEST SKIPPED: no chromium/chromedriver on PATH; {INSTALL}"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return f"BROWSER TEST SKIPPED: selenium is not installed; {INSTALL}"
    return None


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    reason = _missing()
    if reason:
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not try to download a browser or driver
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-extensions", "--window-size=1400,1300",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(TIMEOUT)
    yield driver
    driver.quit()


@pytest.fixture
def page(browser, tmp_path_factory):
    """The app freshly loaded (no toast or output left from an earlier test)."""
    server = shared_app_server(tmp_path_factory)
    browser.get(server.url)
    return browser


def _wait(driver, condition, what: str):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, TIMEOUT, poll_frequency=0.2).until(condition)
    except TimeoutException:
        pytest.fail(f"timed out waiting for {what}; page text:\n{driver.find_element('tag name', 'body').text[:2000]}")


def _element(driver, css: str):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    return _wait(driver, ec.presence_of_element_located((By.CSS_SELECTOR, css)), css)


def test_refused_input_shows_the_error_and_clears_the_last_answer(page):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    _element(page, "#plot textarea").send_keys(PLOT)
    _element(page, "#predict").click()
    _wait(page, lambda d: "Predicted genres" in d.find_element(By.CSS_SELECTOR, "#verdict").text, "a first answer")
    _element(page, "#plot textarea").send_keys(Keys.CONTROL, "a", Keys.DELETE)  # as a user would (fires input events)
    _element(page, "#predict").click()
    _wait(page, lambda d: "Nothing to classify" in d.find_element(By.TAG_NAME, "body").text, "the error message")
    assert "Predicted genres" not in page.find_element(By.CSS_SELECTOR, "#verdict").text


def test_api_page_documents_predict(page):
    from selenium.webdriver.common.by import By

    link = _wait(
        page,
        lambda d: next((e for e in d.find_elements(By.CSS_SELECTOR, "footer a, footer button") if "API" in e.text), None),
        "the 'Use via API' link",
    )
    link.click()
    text = _wait(
        page, lambda d: (t := d.find_element(By.TAG_NAME, "body").text) and "/model_info" in t and t, "the API page"
    )
    assert 'api_name="/predict"' in text and "plot" in text and "poster" in text
    assert "Predict a movie's genres" in text


def test_type_plot_upload_poster_and_read_the_genres(page, tmp_path):
    from selenium.webdriver.common.by import By

    poster = tmp_path / "poster.png"
    img = Image.new("RGB", (200, 300), (25, 40, 90))
    img.paste((230, 200, 40), (40, 60, 160, 180))
    img.save(poster)

    _element(page, "#plot textarea").send_keys(PLOT)
    _element(page, "#poster input[type=file]").send_keys(str(poster))
    _wait(page, lambda d: d.find_elements(By.CSS_SELECTOR, "#poster img"), "the poster preview")
    _element(page, "#predict").click()
    verdict = _wait(
        page,
        lambda d: (t := d.find_element(By.CSS_SELECTOR, "#verdict").text) and "Predicted genres" in t and t,
        "the predicted genres",
    )
    line = next(x for x in verdict.splitlines() if x.startswith("Predicted genres:"))
    genres = [g.strip() for g in line.split(":", 1)[1].split(",")]
    assert genres and set(genres) <= set(LABELS)
    assert "Action" in genres and "Comedy" not in genres  # the bundle's per-genre thresholds (0.0 and 1.0)
    assert "the plot and the poster" in verdict

    top = page.find_element(By.CSS_SELECTOR, "#top-genres").text
    assert any(g in top for g in LABELS)
    table = _wait(
        page, lambda d: (t := d.find_element(By.CSS_SELECTOR, "#by-modality").text) and "Horror" in t and t,
        "the per-modality table",
    )
    assert "Poster only" in table and "Plot only" in table and "%" in table
    assert "/tmp" not in page.find_element(By.TAG_NAME, "body").text  # no server path on the page

    shot = tmp_path / "screenshot-app.png"
    assert page.save_screenshot(str(shot))
    assert Image.open(shot).size[0] >= 1000
    artifacts = REPO / "artifacts"
    artifacts.mkdir(exist_ok=True)
    shutil.copy(shot, artifacts / "screenshot-app.png")
    print(f"screenshot: {shot} (copied to {artifacts / 'screenshot-app.png'})")


def _shoot(page, tmp_path, name: str) -> None:
    from selenium.webdriver.common.by import By

    page.set_window_size(1400, 2400)  # the explanation sits below the scores: room for all of it in the shot
    page.find_element(By.CSS_SELECTOR, "#explain-words").location_once_scrolled_into_view
    shot = tmp_path / name
    assert page.save_screenshot(str(shot))
    artifacts = REPO / "artifacts"
    artifacts.mkdir(exist_ok=True)
    shutil.copy(shot, artifacts / name)
    print(f"screenshot: {shot} (copied to {artifacts / name})")


def test_explanations_show_highlighted_words_and_the_poster_heat_map(page, tmp_path):
    from selenium.webdriver.common.by import By

    poster = tmp_path / "poster.png"
    img = Image.new("RGB", (200, 300), (120, 20, 20))
    img.paste((240, 240, 240), (30, 40, 170, 150))
    img.save(poster)

    # ticked for people once the page has loaded (the API's default stays off)
    _wait(page, lambda d: d.find_element(By.CSS_SELECTOR, "#explain input[type=checkbox]").is_selected(),
          "the Explain box ticked")
    _element(page, "#plot textarea").send_keys(PLOT)
    _element(page, "#poster input[type=file]").send_keys(str(poster))
    _wait(page, lambda d: d.find_elements(By.CSS_SELECTOR, "#poster img"), "the poster preview")
    _element(page, "#predict").click()
    _wait(page, lambda d: "Predicted genres" in d.find_element(By.CSS_SELECTOR, "#verdict").text, "the answer")
    words = _wait(
        page, lambda d: (t := d.find_element(By.CSS_SELECTOR, "#explain-words").text) and "haunted" in t and t,
        "the highlighted plot",
    )
    assert "witch" in words and "forest" in words
    # the scored words are drawn as coloured spans (a HighlightedText with a confidence per word)
    spans = page.find_elements(By.CSS_SELECTOR, "#explain-words .token")
    assert len(spans) > 5
    coloured = [s.text for s in spans if "highlighted" in (s.get_attribute("class") or "")]
    assert "haunted" in coloured and "witch" in coloured  # words the tiny bundle's lexical branch scores
    heat = _wait(page, lambda d: d.find_elements(By.CSS_SELECTOR, "#explain-poster img"), "the poster heat map")
    assert heat[0].get_attribute("src")
    genre = _element(page, "#explain-genre input").get_attribute("value")
    assert genre in LABELS

    _shoot(page, tmp_path, "screenshot-explain.png")


def test_a_real_movie_explained_by_the_trained_model(browser, shared_data, tmp_path):
    """The Conjuring (TMDb plot and poster) through the trained default bundle, when this checkout has one."""
    import json

    from selenium.webdriver.common.by import By

    model = REPO / "runs" / "fusion" / "model"
    if not (model / "model.safetensors").is_file():
        pytest.skip(f"no trained model at {model} (accelerate launch training/train_fusion.py makes it)")
    source = shared_data / "tmdb5000" / "movies.jsonl"
    movie = next(m for m in map(json.loads, source.read_text(encoding="utf-8").splitlines())
                 if m.get("title") == "The Conjuring")
    server = start_app(model, tmp_path)
    try:
        browser.get(server.url)
        _wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#explain input[type=checkbox]").is_selected(),
              "the Explain box ticked")
        _element(browser, "#title input").send_keys(movie["title"])
        _element(browser, "#plot textarea").send_keys(movie["plot"])
        _element(browser, "#poster input[type=file]").send_keys(str(source.parent / movie["poster_file"]))
        _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#poster img"), "the poster preview")
        _element(browser, "#predict").click()
        verdict = _wait(browser, lambda d: (t := d.find_element(By.CSS_SELECTOR, "#verdict").text)
                        and "Predicted genres" in t and t, "the answer")
        assert "Horror" in verdict
        _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#explain-words .token.highlighted"),
              "the highlighted plot")
        _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#explain-poster img"), "the poster heat map")
        # It shows a TMDb poster (studio artwork): artifacts/ is git-ignored and this one is never committed.
        _shoot(browser, tmp_path, "screenshot-explain-real.png")
    finally:
        server.stop()
