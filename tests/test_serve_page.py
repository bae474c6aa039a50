"""The chat page at `/`, in headless Chromium (Debian's package, driven by Playwright's Python API).

The page is a client of the same /v1/chat/completions API: a reply streams in piece by piece, the
stop button ends it mid-reply, new chat forgets the conversation, and server errors are shown in words.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import CHROMIUM_MISSING, chromium_path

pytestmark = pytest.mark.browser

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture(scope="module")
def browser():
    chromium = chromium_path()
    if chromium is None:  # only under CI=true: elsewhere conftest skips these tests at collection
        pytest.fail(CHROMIUM_MISSING)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, paced_kit_server):
    kit_server = paced_kit_server
    context = browser.new_context()
    page = context.new_page()
    outside = []
    page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(kit_server.base) else None)
    page.goto(kit_server.base + "/")
    page.wait_for_function("document.getElementById('model-name').textContent.includes('tiny')")
    yield page
    assert outside == [], f"the page fetched something from outside the server: {outside}"
    context.close()


def set_max_tokens(page, n: int) -> None:
    page.click("#toggle-settings")
    page.fill("#max-tokens", str(n))
    page.fill("#temperature", "0")
    page.click("#toggle-settings")


def test_reply_streams_in_then_stop_and_new_chat(page):
    ARTIFACTS.mkdir(exist_ok=True)
    sent = []
    page.on("request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/chat/completions") else None)
    page.click("#toggle-settings")
    page.fill("#system-prompt", "You are terse.")
    page.click("#toggle-settings")
    set_max_tokens(page, 8)
    page.fill("#input", "Hello, who are you?")
    page.keyboard.press("Enter")
    page.wait_for_selector(".msg.assistant:not(.streaming)", timeout=60_000)
    assert page.inner_text(".msg.user .body") == "Hello, who are you?"
    first = page.locator(".msg.assistant").first
    assert first.get_attribute("data-raw")
    assert page.is_hidden("#error")
    assert sent[0]["stream"] is True
    assert sent[0]["messages"] == [{"role": "system", "content": "You are terse."},
                                   {"role": "user", "content": "Hello, who are you?"}]
    first.locator(".copy").click()
    page.wait_for_function("document.querySelector('.msg.assistant .copy').textContent === 'Copied'")

    # A long reply: watch it grow while streaming, then stop it.
    set_max_tokens(page, 200)
    page.fill("#input", "Now a long answer, please.")
    page.click("#send")
    reply = page.locator(".msg.assistant").nth(1)
    page.wait_for_function(
        "() => { const m = document.querySelectorAll('.msg.assistant')[1];"
        " return m && m.classList.contains('streaming') && (m.dataset.raw || '').length > 0; }", timeout=60_000)
    # Multi-turn: the second request carries the first exchange.
    assert [m["role"] for m in sent[1]["messages"]] == ["system", "user", "assistant", "user"]
    assert sent[1]["messages"][2]["content"] == first.get_attribute("data-raw")
    seen = len(reply.get_attribute("data-raw"))
    page.wait_for_function(
        f"() => (document.querySelectorAll('.msg.assistant')[1].dataset.raw || '').length > {seen}",
        timeout=30_000)
    assert page.is_visible("#stop") and page.is_hidden("#send")
    page.click("#stop")
    page.wait_for_selector(".msg.assistant.stopped", timeout=10_000)
    assert "(stopped)" in reply.inner_text()
    assert page.is_visible("#send")
    page.screenshot(path=str(ARTIFACTS / "serve-page-stopped.png"), full_page=True)

    page.click("#new-chat")
    assert page.locator(".msg").count() == 0
    set_max_tokens(page, 4)
    page.fill("#input", "A fresh start")
    page.keyboard.press("Enter")
    page.wait_for_selector(".msg.assistant:not(.streaming)", timeout=60_000)
    assert page.locator(".msg.user").count() == 1
    assert [m["role"] for m in sent[-1]["messages"]] == ["system", "user"]  # history forgotten
    page.screenshot(path=str(ARTIFACTS / "serve-page-new-chat.png"), full_page=True)


def test_server_errors_are_shown_in_words(page, paced_kit_server):
    kit_server = paced_kit_server
    page.fill("#input", "word " * (kit_server.served.context_window * 2))
    page.click("#send")
    page.wait_for_selector("#error:not([hidden])", timeout=30_000)
    text = page.inner_text("#error")
    assert "maximum context length" in text and "The server said" in text
    page.screenshot(path=str(ARTIFACTS / "serve-page-error.png"), full_page=True)


def test_markdown_is_rendered_and_html_is_escaped(page):
    html = page.evaluate("""() => window.renderMarkdown(
        "# Title\\n\\nSome **bold** and `code` <script>alert(1)</script>\\n\\n```python\\nprint('<b>')\\n```\\n- one\\n- two")""")
    assert "<h1>Title</h1>" in html and "<strong>bold</strong>" in html and "<code>code</code>" in html
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert '<pre><code class="language-python">print(&#39;&lt;b&gt;&#39;)</code></pre>' in html
    assert "<ul><li>one</li><li>two</li></ul>" in html


def test_a_reload_keeps_the_conversation_and_the_box_shows_the_system_prompt_the_server_gives(page):
    from setup_kit.engines.base import DEFAULT_SYSTEM_PROMPT

    sent = []
    page.on("request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/chat/completions") else None)
    # What the model is given with no system prompt of the user's is on screen, not an empty box.
    assert page.input_value("#system-prompt") == DEFAULT_SYSTEM_PROMPT
    set_max_tokens(page, 6)
    page.fill("#input", "Remember me")
    page.keyboard.press("Enter")
    page.wait_for_selector(".msg.assistant:not(.streaming)", timeout=60_000)
    reply = page.locator(".msg.assistant").first.get_attribute("data-raw")
    assert sent[0]["messages"][0] == {"role": "system", "content": DEFAULT_SYSTEM_PROMPT}

    page.reload()
    page.wait_for_function("document.getElementById('model-name').textContent.includes('tiny')")
    assert page.inner_text(".msg.user .body") == "Remember me"
    assert page.locator(".msg.assistant").first.get_attribute("data-raw") == reply
    assert page.input_value("#max-tokens") == "6"
    page.fill("#input", "And now?")
    page.keyboard.press("Enter")
    page.wait_for_function("document.querySelectorAll('.msg.assistant:not(.streaming)').length === 2",
                           timeout=60_000)
    assert [m["role"] for m in sent[-1]["messages"]] == ["system", "user", "assistant", "user"]
    assert sent[-1]["messages"][2]["content"] == reply

    # The user's own system prompt wins over the server's, across a reload too; empty means none.
    page.click("#toggle-settings")
    page.fill("#system-prompt", "")
    page.reload()
    page.wait_for_function("document.getElementById('model-name').textContent.includes('tiny')")
    assert page.input_value("#system-prompt") == ""
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0
    page.reload()
    page.wait_for_function("document.getElementById('model-name').textContent.includes('tiny')")
    assert page.locator(".msg").count() == 0  # new chat forgets for good
