"""/docs in a real browser: headless Chromium (Debian's package) opens Swagger UI from real gunicorn, which serves
Swagger UI's files itself (no CDN), shows the model's operations, and "Try it out" on /predict gets a 200, with
and without API keys."""

from __future__ import annotations

import pytest

from tests.support.browser import Page, chromium
from tests.support.server import run_service

pytestmark = pytest.mark.slow  # headless Chromium

KEY = "docs-key-8fK2mQ7vZ1xT4nR6"
PREDICT = '[id^="operations-"][id$="-predict"]'  # Swagger UI's block of the operation with operationId "predict"


def open_docs(page: Page, url: str) -> list[str]:
    """Open /docs and wait for Swagger UI to render the document; the paths of the operations it shows."""
    page.goto(url + "/docs")
    page.wait("document.querySelectorAll('.opblock').length > 5", what="Swagger UI to render the operations")
    return page.evaluate(
        "[...document.querySelectorAll('.opblock-summary-path')].map(e => e.getAttribute('data-path') || e.innerText)"
    )


def try_predict(page: Page) -> str:
    """Expand /predict, press "Try it out" then "Execute" with the example body; the status Swagger UI shows."""
    if not page.evaluate(f"!!document.querySelector('{PREDICT} .try-out__btn')"):
        page.click(f"{PREDICT} .opblock-summary-control")
        page.click(f"{PREDICT} .try-out__btn")
    body = page.wait(f"document.querySelector('{PREDICT} textarea.body-param__text')?.value")
    assert '"features"' in body  # the example is typed from the model's input
    if page.evaluate(f"!!document.querySelector('{PREDICT} .btn-clear')"):  # the previous answer: cleared first
        page.click(f"{PREDICT} .btn-clear")
        page.wait(f"!document.querySelector('{PREDICT} .live-responses-table')", what="the old response to go")
    page.click(f"{PREDICT} .execute")
    return page.wait(f"document.querySelector('{PREDICT} .live-responses-table tbody .response-col_status')?.innerText",
                     what="the response to show")  # fmt: skip


@pytest.fixture(scope="module")
def browser():
    with chromium() as page:
        yield page


def test_docs_render_from_the_service_itself_and_try_it_out_gets_200(browser, demo_model, tmp_path):
    with run_service(str(demo_model), tmp_path) as service:
        service.wait_state("ready")
        browser.requested.clear()
        paths = open_docs(browser, service.url)
        assert {"/predict", "/v2/models/{name}/infer", "/health", "/metadata"} <= set(paths), paths
        status = try_predict(browser)
        assert status.strip().startswith("200"), status
        outputs = browser.evaluate(
            f"document.querySelector('{PREDICT} .live-responses-table tbody .response-col_description').innerText")
        assert '"logits"' in outputs and '"probabilities"' in outputs
    elsewhere = [url for url in browser.requested if not url.startswith((service.url, "data:"))]
    assert not elsewhere, elsewhere  # Swagger UI's files came from the service, nothing from a CDN
    assert f"{service.url}/docs/static/swagger-ui-bundle.js" in browser.requested


def test_with_api_keys_the_page_opens_and_try_it_out_sends_the_key_entered_in_authorize(browser, demo_model, tmp_path):
    with run_service(str(demo_model), tmp_path, API_KEYS=KEY) as service:
        service.wait_state("ready")
        open_docs(browser, service.url)
        assert try_predict(browser).strip().startswith("401")  # no key yet
        browser.click(".auth-wrapper .authorize")
        browser.type_into(".auth-container input", KEY)  # the first scheme: bearer
        browser.click(".auth-container .modal-btn.authorize")
        browser.click(".auth-btn-wrapper .btn-done")
        status = try_predict(browser)
        assert status.strip().startswith("200"), status
