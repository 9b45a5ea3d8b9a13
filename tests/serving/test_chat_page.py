"""The chat page at `/` (serving/static/) in a real headless Chromium: Debian's `chromium`, driven by Playwright.

One server with the built-in demo model and one browser serve the whole module; each test gets a fresh browser
context (its own storage). A demo scene goes in through the file picker (or a drop and a paste), its question
is typed and sent with Enter, and the streamed answer must equal the model's greedy answer computed here with
`idefics3.loading.ask`. Also: Stop aborts the request on the server (its metrics count it), server errors (a
bad image, a missing or wrong API key) appear as messages and the page stays usable, a reload keeps the
conversation, HTML in an answer stays text, the page works by keyboard alone and fits a phone.

Without a `chromium` on PATH (or without playwright) the tests skip, saying how to install it; with
IDEFICS3_REQUIRE_BROWSER=1 (set by .ci/run) that is a failure instead. IDEFICS3_UPDATE_SCREENSHOT=1 also writes
the two-turn screenshot to docs/chat-page.png for the README.
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import re
import shutil
import time
from pathlib import Path

import pytest

from live_server import call, free_port, start, stop

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
HOW = ("the chat page's browser tests need Debian's chromium and playwright: `apt-get install -y chromium` and "
       "`pip install -e '.[test]'`")

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # the test extra brings it; without it the tests skip (or fail, see below)
    sync_playwright = expect = None


@pytest.fixture(scope="module")
def chromium() -> str:
    if CHROMIUM is None or sync_playwright is None:
        missing = "chromium is not on PATH" if CHROMIUM is None else "playwright is not installed"
        if os.environ.get("IDEFICS3_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{missing}: {HOW}", pytrace=False)
        pytest.skip(f"{missing}: {HOW}")
    return CHROMIUM


@pytest.fixture(scope="module")
def server(chromium):
    from idefics3 import DEMO_MODEL
    from idefics3.serving.server import ServeOptions

    live = start(ServeOptions(model=str(DEMO_MODEL), port=free_port(), dtype="fp32", max_batch=4))
    yield live
    stop(live)


@pytest.fixture(scope="module")
def browser(chromium):
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def demo():
    """The demo model and processor in this process, as the server loads them: the reference answers."""
    from idefics3 import DEMO_MODEL
    from idefics3.loading import load_model, load_processor

    return load_model(DEMO_MODEL, "fp32"), load_processor(DEMO_MODEL)


def greedy(demo, prompt, images) -> str:
    from idefics3.loading import ask

    model, processor = demo
    return ask(model, processor, prompt, images=images)


def new_page(browser, errors: list, **options):
    context = browser.new_context(viewport=options.pop("viewport", {"width": 1000, "height": 760}), **options)
    page = context.new_page()
    page.set_default_timeout(15_000)
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    return page


@pytest.fixture
def page(browser, server):
    """A fresh context (empty storage) on the page, the model listed; no script error may happen in it."""
    errors: list[str] = []
    page = new_page(browser, errors)
    page.goto(server.url)
    expect(page.locator("#model-status")).to_have_text("idefics3-demo · ready")
    yield page
    page.context.close()
    assert not [e for e in errors if "401" not in e and "400" not in e], errors  # refusals the tests ask for


# ---- helpers -------------------------------------------------------------------------------------------
def png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def scene(seed: int, kind: str):
    """A demo question and its scene(s). The seeds the tests use give answers whose first token leads the
    runner-up by over 5 logits: a near tie could go either way between the server's batched, prefix-cached
    computation and the in-process one, both in floating point."""
    from idefics3.demo.questions import make_example

    return make_example(random.Random(seed), kind)


def answer_of(page, n: int = -1):
    return page.locator("#log > li.assistant").nth(n)


def finished(page, status: str = "done", n: int = -1):
    item = answer_of(page, n)
    expect(item).to_have_attribute("data-status", status)
    return item


def send(page, text: str) -> None:
    page.keyboard.type(text)
    page.keyboard.press("Enter")


def file_payload(data: bytes, name: str = "scene.png") -> dict:
    return {"name": name, "mimeType": "image/png", "buffer": data}


def saved(page) -> None:
    page.wait_for_function("!document.body.dataset.saving")


def screenshot(page, folder: Path, name: str = "chat-page.png") -> Path:
    path = folder / name
    page.screenshot(path=str(path))
    assert path.stat().st_size > 10_000
    return path


def aborted(server) -> float:
    _, _, text = call(server, "GET", "/metrics")
    found = re.search(r'idefics3_requests_total\{endpoint="chat",outcome="aborted"\} ([0-9.e+]+)', text)
    return float(found.group(1)) if found else 0.0


# The page's own way of receiving a file, for a drop or a paste: a File in a DataTransfer, in a DOM event.
DISPATCH = """([kind, b64, name]) => {
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const data = new DataTransfer();
    data.items.add(new File([bytes], name, {type: "image/png"}));
    const target = document.activeElement;
    const init = {bubbles: true, cancelable: true};
    const event = kind === "drop" ? new DragEvent("drop", {...init, dataTransfer: data})
                                  : new ClipboardEvent("paste", {...init, clipboardData: data});
    target.dispatchEvent(event);
}"""


def drop_or_paste(page, kind: str, data: bytes, name: str) -> None:
    page.evaluate(DISPATCH, [kind, base64.b64encode(data).decode(), name])


# ---- the tests -----------------------------------------------------------------------------------------
def test_a_scene_question_streams_the_models_greedy_answer(server, page, demo, tmp_path):
    example = scene(1, "colour")
    page.set_input_files("#file-input", files=[file_payload(png(example.images[0]))])
    expect(page.locator("#composer .chip")).to_have_count(1)
    with page.expect_request("**/v1/chat/completions") as request:
        send(page, example.question)  # the focus went to the text box after the image
    body = request.value.post_data_json
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["temperature"] == 0 and "max_tokens" not in body
    content = body["messages"][0]["content"]
    assert [p["type"] for p in content] == ["image_url", "text"] and content[1]["text"] == example.question
    assert content[0]["image_url"]["url"].startswith("data:image/png;base64,")

    item = finished(page)
    assert item.locator(".answer").inner_text().strip() == greedy(demo, example.question, example.images)
    stats = item.locator(".stats").inner_text()
    assert re.search(r"first token \d+\.\d\d s", stats) and re.search(r"\d+ prompt .*\+ \d+ completion tokens", stats)
    expect(page.locator("#log > li.user img.thumb")).to_have_count(1)
    expect(page.locator("#composer .chip")).to_have_count(0)  # the message box is empty again
    screenshot(page, tmp_path)


def test_images_go_where_they_were_dropped_or_pasted(page, demo):
    example = scene(9, "two")
    first, second = (png(image) for image in example.images)
    page.locator("#message").focus()
    page.keyboard.type("First:")
    drop_or_paste(page, "drop", first, "first.png")
    expect(page.locator("#composer .chip")).to_have_count(1)
    page.keyboard.type("Second:")
    drop_or_paste(page, "paste", second, "second.png")
    expect(page.locator("#composer .chip")).to_have_count(2)
    with page.expect_request("**/v1/chat/completions") as request:
        send(page, example.question)
    content = request.value.post_data_json["messages"][0]["content"]
    assert [p.get("text", p["type"]) for p in content] == ["First:", "image_url", "Second:", "image_url",
                                                          example.question]
    parts = [{"type": "text", "text": "First:"}, {"type": "image"}, {"type": "text", "text": "Second:"},
             {"type": "image"}, {"type": "text", "text": example.question}]
    expected = greedy(demo, [{"role": "user", "content": parts}], example.images)
    assert finished(page).locator(".answer").inner_text().strip() == expected
    expect(page.locator("#log > li.user img.thumb")).to_have_count(2)


def test_a_second_turn_sees_the_first_and_a_reload_keeps_the_conversation(server, page, demo, tmp_path):
    example = scene(2, "count")
    page.set_input_files("#file-input", files=[file_payload(png(example.images[0]))])
    with page.expect_request("**/v1/chat/completions") as request:
        send(page, example.question)  # typed at once, maybe before the image is read: it must still come first
    content = request.value.post_data_json["messages"][0]["content"]
    assert [p.get("text", p["type"]) for p in content] == ["image_url", example.question]
    first = finished(page, n=0).locator(".answer").inner_text().strip()
    assert first == greedy(demo, example.question, example.images)
    follow = "How many shapes are there?"
    with page.expect_request("**/v1/chat/completions") as request:
        send(page, follow)
    messages = request.value.post_data_json["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user"] and messages[1]["content"] == first
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": example.question}]},
            {"role": "assistant", "content": [{"type": "text", "text": first}]},
            {"role": "user", "content": [{"type": "text", "text": follow}]}]
    second = finished(page, n=1).locator(".answer").inner_text().strip()
    assert second == greedy(demo, chat, example.images)
    screenshot(page, tmp_path)
    if os.environ.get("IDEFICS3_UPDATE_SCREENSHOT") == "1":
        screenshot(page, ROOT / "docs")

    saved(page)
    page.reload()
    expect(page.locator("#log > li")).to_have_count(4)
    expect(page.locator("#log > li.user img.thumb")).to_have_count(1)
    assert answer_of(page, 1).locator(".answer").inner_text().strip() == second
    assert "completion tokens" in answer_of(page, 1).locator(".stats").inner_text()

    page.click("#new-chat")
    expect(page.locator("#log > li")).to_have_count(0)
    saved(page)
    page.reload()
    expect(page.locator("#empty")).to_be_visible()


def test_stop_aborts_the_request_on_the_server(server, page, monkeypatch):
    engine = server.state.runner.engine
    monkeypatch.setattr(engine, "eos_token_ids", frozenset())  # the demo model's answers would end at once
    step = engine.step
    monkeypatch.setattr(engine, "step", lambda: (time.sleep(0.03), step())[1])
    before = aborted(server)
    page.click("#settings-toggle")
    page.fill("#max-tokens", "300")
    page.press("#max-tokens", "Tab")  # a change event
    page.click("#settings-close")
    page.locator("#message").focus()
    with page.expect_request("**/v1/chat/completions") as request:
        send(page, "Go on and on.")
    assert request.value.post_data_json["max_tokens"] == 300
    item = answer_of(page)
    expect(item.locator(".answer")).not_to_have_text("…")  # some text came
    expect(page.locator("#stop")).to_be_visible()
    page.click("#stop")
    finished(page, "stopped")
    assert "stopped" in item.locator(".stats").inner_text()
    expect(page.locator("#stop")).to_be_hidden()
    runner = server.state.runner
    deadline = time.time() + 10
    while (aborted(server) < before + 1 or runner.snapshot().get("running", 0)) and time.time() < deadline:
        time.sleep(0.1)
    assert aborted(server) == before + 1
    assert runner.snapshot().get("running", 0) == 0  # its slot is free again


def test_a_bad_image_is_an_error_message_and_the_page_goes_on(page):
    page.set_input_files("#file-input", files=[file_payload(b"this is not a PNG", "broken.png")])
    send(page, "What is this?")
    item = finished(page, "error")
    expect(item.locator(".answer")).to_contain_text("Error 400")
    expect(item.locator(".answer")).to_have_attribute("role", "alert")
    expect(page.locator("#composer .chip")).to_have_count(1)  # the message came back for another try
    page.click("#composer .chip .remove")
    expect(page.locator("#composer .chip")).to_have_count(0)
    with page.expect_request("**/v1/chat/completions") as request:
        page.keyboard.press("Enter")
    messages = request.value.post_data_json["messages"]
    assert messages == [{"role": "user", "content": [{"type": "text", "text": "What is this?"}]}]  # no bad turn
    finished(page)


def test_a_server_with_a_key_asks_for_it_and_a_wrong_key_is_an_error_message(browser, server, monkeypatch):
    monkeypatch.setattr(server.state, "api_key", "sekret")  # what --api-key sets
    errors: list[str] = []
    page = new_page(browser, errors)
    try:
        page.goto(server.url)
        expect(page.locator("#model-status")).to_have_text("API key needed")
        expect(page.locator("#key-panel")).to_be_visible()
        page.fill("#api-key", "sekret")
        page.press("#api-key", "Enter")
        expect(page.locator("#model-status")).to_have_text("idefics3-demo · ready")

        page.fill("#api-key", "wrong")
        page.press("#api-key", "Enter")
        expect(page.locator("#model-status")).to_have_text("API key needed")
        page.locator("#message").focus()
        send(page, "Hello?")
        item = finished(page, "error")
        expect(item.locator(".answer")).to_contain_text("API key")
        expect(page.locator("#message")).to_have_value("Hello?")

        page.fill("#api-key", "sekret")
        page.press("#api-key", "Enter")
        expect(page.locator("#model-status")).to_have_text("idefics3-demo · ready")
        page.locator("#message").focus()
        with page.expect_request("**/v1/chat/completions") as request:
            page.keyboard.press("Enter")
        assert request.value.headers["authorization"] == "Bearer sekret"
        finished(page)
    finally:
        page.context.close()


def sse(text: str) -> str:
    """An OpenAI chat stream of `text` in two pieces, with usage: what a route-intercepted request gets."""
    events = [{"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}]
    events += [{"choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]}
               for p in (text[:20], text[20:])]
    events += [{"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
               {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}}]
    return "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"


def test_html_in_an_answer_is_shown_as_text_and_runs_nothing(browser, server):
    """The page's rendering alone must hold: the context ignores the server's Content-Security-Policy."""
    attack = ('<img src=x onerror="window.pwned=1"> <script>window.pwned=2</script> '
              '[click](javascript:window.pwned=3) **<b onmouseover="window.pwned=4">bold</b>**')
    markdown = "# Title\n\nSome **bold**, *slanted* and `code`; 2*3*4 and __init__ stay.\n\n- one\n- two\n\n" \
               "```\n<i>not html</i>\n```\n[a link](https://example.com/x)"
    answers = [attack, markdown]
    errors: list[str] = []
    page = new_page(browser, errors, bypass_csp=True)
    try:
        page.route("**/v1/chat/completions", lambda route: route.fulfill(
            status=200, content_type="text/event-stream", body=sse(answers.pop(0))))
        page.goto(server.url)
        expect(page.locator("#model-status")).to_have_text("idefics3-demo · ready")
        send(page, "Say something nasty.")
        finished(page)
        send(page, "Now some Markdown.")
        formatted = finished(page).locator(".answer")
        assert formatted.locator("h4").inner_text() == "Title"
        assert formatted.locator("strong").inner_text() == "bold" and formatted.locator("em").inner_text() == "slanted"
        assert formatted.locator("p code").inner_text() == "code" and formatted.locator("li").count() == 2
        assert "2*3*4 and __init__ stay." in formatted.inner_text()
        assert formatted.locator("pre code").inner_text() == "<i>not html</i>" and formatted.locator("i").count() == 0
        assert formatted.locator("a").get_attribute("href") == "https://example.com/x"
        for markdown_on in (True, False):
            if not markdown_on:
                page.click("#settings-toggle")
                page.uncheck("#markdown")
            answer = answer_of(page, 0).locator(".answer")
            text = answer.inner_text()
            assert '<img src=x onerror="window.pwned=1">' in text and "<script>window.pwned=2</script>" in text
            assert answer.locator("img, script, b, [onerror], [onmouseover]").count() == 0
            assert page.locator('a[href^="javascript"]').count() == 0
            answer.hover()
            assert page.evaluate("window.pwned") is None
        assert "**bold**" in answer_of(page).locator(".answer").inner_text()  # as text now, Markdown and all
        assert not errors, errors
    finally:
        page.context.close()


def test_keyboard_alone_reaches_the_message_box_and_sends(page):
    page.click("h1")  # the page focuses the message box itself; start from the top instead
    stops = []
    for _ in range(3):
        page.keyboard.press("Tab")
        stops.append(page.evaluate("document.activeElement.id"))
    assert stops == ["new-chat", "settings-toggle", "message"]
    page.keyboard.press("Shift+Tab")
    page.keyboard.press("Shift+Tab")
    page.keyboard.press("Shift+Tab")
    assert page.evaluate("document.activeElement.id") == "skip"  # the first stop: Skip to the message box
    page.keyboard.press("Enter")
    assert page.evaluate("document.activeElement.id") == "message"
    page.keyboard.type("First line")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("second line")
    expect(page.locator("#message")).to_have_value("First line\nsecond line")
    page.keyboard.press("Enter")
    expect(page.locator("#log > li.user .text")).to_have_text("First line\nsecond line")
    finished(page)
    # Every control has a name a screen reader can read out.
    unnamed = page.evaluate("""() => [...document.querySelectorAll('button, input, select, textarea')]
        .filter((e) => e.type !== 'file' && !e.getAttribute('aria-label') && !(e.labels && e.labels.length)
                       && !e.textContent.trim())
        .map((e) => e.outerHTML)""")
    assert unnamed == []


def test_the_page_fits_a_phone(browser, server, tmp_path):
    errors: list[str] = []
    page = new_page(browser, errors, viewport={"width": 375, "height": 667}, is_mobile=True, has_touch=True)
    try:
        page.goto(server.url)
        expect(page.locator("#model-status")).to_have_text("idefics3-demo · ready")
        page.click("#settings-toggle")
        for selector in ("#send", "#attach", "#message", "#temperature", "#system"):
            box = page.locator(selector).bounding_box()
            assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 375, (selector, box)
        assert page.evaluate("document.documentElement.scrollWidth") <= 375
        screenshot(page, tmp_path, "phone.png")
        assert not errors, errors
    finally:
        page.context.close()
