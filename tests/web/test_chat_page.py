"""The web chat page in headless Chromium against a live server (see conftest.py for what is real)."""

import shutil
import time

import httpx
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.web.conftest import ARTIFACTS

TIMEOUT = 90

# Counts changes of the last MOSS reply's text while it streams (a MutationObserver in the page).
WATCH_REPLY = """
window.__replyUpdates = [];
new MutationObserver(() => {
  const replies = document.querySelectorAll('.msg.moss .content');
  if (replies.length) window.__replyUpdates.push(replies[replies.length - 1].textContent.length);
}).observe(document.getElementById('log'), {childList: true, subtree: true, characterData: true});
"""


def _wait(driver, condition, timeout=TIMEOUT):
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: condition(d))


def _open(driver, url):
    driver.get(url)
    _wait(driver, lambda d: d.find_element(By.ID, "model-line").text.startswith("model:"))


def _send(driver, text):
    """Types `text` and presses Enter (the keyboard path); waits until the reply finished."""
    before = len(driver.find_elements(By.CSS_SELECTOR, ".msg.moss"))
    box = driver.find_element(By.ID, "message")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)
    _wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.moss")) == before + 1)
    _wait(driver, lambda d: d.find_element(By.ID, "send").is_enabled())
    return driver.find_elements(By.CSS_SELECTOR, ".msg.moss")[-1]


def _set(driver, element_id, value):
    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(str(value))


def _reply_text(message):
    return message.find_element(By.CSS_SELECTOR, ".content").get_attribute("textContent")


def test_chat_page_end_to_end(browser, chat_server, tokenizer, tmp_path, monkeypatch):
    url, _, engine, log = chat_server
    prompts = []  # every prompt the engine decodes (both the plain and the tool path submit here)
    real_submit = engine.submit
    monkeypatch.setattr(engine, "submit", lambda r, cb: prompts.append(r.prompt_ids) or real_submit(r, cb))
    d = browser
    _open(d, url + "/")
    # Readable on a narrow window: nothing wider than the 420-pixel viewport.
    assert d.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    # Unavailable tools would be disabled; this server has them all.
    assert all(box.is_enabled() for box in d.find_elements(By.CSS_SELECTOR, "#tools input"))
    _set(d, "temperature", 0)
    _set(d, "max-tokens", 24)
    d.execute_script(WATCH_REPLY)

    # 1. Streaming: the reply text grows in several steps and equals the server's own answer.
    first = _send(d, "Hello MOSS, tell me about tea.")
    text = _reply_text(first)
    reference = httpx.post(
        url + "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "Hello MOSS, tell me about tea."}],
            "temperature": 0,
            "max_tokens": 24,
        },
        timeout=120,
    ).json()
    assert text == reference["choices"][0]["message"]["content"] and text.strip()
    updates = d.execute_script("return window.__replyUpdates")
    assert len({n for n in updates if n > 0}) >= 2, updates  # partial text was shown before the end
    assert d.find_element(By.ID, "status").text == "Done."

    # 2. Multi-turn history and the preference tag control.
    Select(d.find_element(By.ID, "tag")).select_by_value("0")
    _send(d, "And coffee?")
    prompt = tokenizer.decode(prompts[-1])
    assert f"<|Human|>: Hello MOSS, tell me about tea.<eoh>\n<|MOSS|>: {text}<eom>\n<|Human|>: And coffee?" in prompt
    assert prompt.endswith("<|Human|>: And coffee?<eoh>\n<|MOSS|>:<|quality_0|>")
    Select(d.find_element(By.ID, "tag")).select_by_value("")

    # 3. Tools on (keyboard: focus the checkbox, press space): thoughts, commands, results in a collapsible block.
    for tool in ("search", "calculate", "text2image"):
        d.find_element(By.ID, f"tool-{tool}").send_keys(Keys.SPACE)
    assert d.find_element(By.ID, "tool-search").is_selected()
    moss = _send(d, "EIFFEL: how tall is the tower?")
    block = moss.find_element(By.CSS_SELECTOR, "details.tool-pass")
    assert block.get_attribute("open") is None  # collapsed until the user opens it
    block.find_element(By.TAG_NAME, "summary").click()
    assert block.find_element(By.TAG_NAME, "summary").text == "Tool use: Search"
    assert block.find_element(By.CSS_SELECTOR, "pre.thoughts").text.startswith("The user asks about the Eiffel Tower")
    assert block.find_element(By.CSS_SELECTOR, "pre.commands").text == 'Search("Eiffel Tower")'
    snippet = block.find_element(By.CSS_SELECTOR, "ol.snippets li")
    assert (
        "wrought-iron lattice tower" in snippet.text
        and snippet.get_attribute("id") == f"ref-{moss.get_attribute('data-turn')}-1"
    )
    assert _reply_text(moss)  # the model's reply after the results
    second_pass, _ = log[-1]
    assert '<|Results|>:\nSearch("Eiffel Tower") =>\n<|1|>: \'Eiffel Tower: The Eiffel Tower is' in second_pass
    assert "<|Human|>: And coffee?<eoh>\n" in second_pass  # the earlier turns went back to the server
    assert second_pass.endswith("<eor>\n<|MOSS|>:<|quality_2|>")  # server default tag: best
    # Citations in a reply link to the snippet (the renderer, fed a reply that cites <|1|>).
    href = d.execute_script(
        "const n = document.createElement('div');"
        "MossChat.renderReply(n, 'It is 330 m<sup><|1|></sup> tall.', arguments[0]);"
        "return n.querySelector('a').getAttribute('href') + '|' + n.textContent;",
        moss.get_attribute("data-turn"),
    )
    assert href == f"#ref-{moss.get_attribute('data-turn')}-1|It is 330 m[1] tall."

    # 4. A generated image is shown inline (the browser decoded the PNG the image server made).
    painted = _send(d, "PAINT me a red square")
    # The page sent the earlier tool pass back with the history.
    assert (
        "<|Inner Thoughts|>: The user asks about the Eiffel Tower; I should search.<eot>\n"
        '<|Commands|>: Search("Eiffel Tower")<eoc>\n<|Results|>: None<eor>\n<|MOSS|>: '
    ) in log[-1][0]
    image = painted.find_element(By.CSS_SELECTOR, "details.tool-pass img")
    assert image.get_attribute("src").startswith("data:image/png;base64,")
    assert d.execute_script("return arguments[0].naturalWidth", image) == 12
    assert image.get_attribute("alt") == "Generated image: a red square"
    painted.find_element(By.CSS_SELECTOR, "details.tool-pass summary").click()

    shot = tmp_path / "chat_page.png"
    d.set_window_size(420, d.execute_script("return document.documentElement.scrollHeight") + 150)  # whole page
    assert d.save_screenshot(str(shot)) and shot.stat().st_size > 1000
    d.set_window_size(420, 1000)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, ARTIFACTS / "chat_page.png")

    # 5. Reset: the page and the history are empty; the next prompt has no earlier turns.
    d.find_element(By.ID, "reset").click()
    assert d.find_elements(By.CSS_SELECTOR, "#log > *") == []
    assert d.find_element(By.ID, "status").text == "Conversation reset."
    _send(d, "DOUBLE 330")
    prompt, _ = log[-1]
    assert prompt.count("<|Human|>:") == 1 and "Calculate(\"330*2\") => '660'" in prompt


def test_server_errors_show_in_the_page(browser, chat_server):
    url, busy_url, _, _ = chat_server
    d = browser
    _open(d, url + "/")

    # Bad settings: the server's 400 message is shown, the message is given back, the page works on.
    _set(d, "temperature", 5)
    moss = _send(d, "hi there")
    alert = moss.find_element(By.CSS_SELECTOR, "[role=alert]")
    assert alert.text.startswith("Request refused (HTTP 400): 'temperature' must be a number in [0, 2]")
    assert d.find_element(By.ID, "message").get_attribute("value") == "hi there"
    d.find_element(By.ID, "message").clear()

    # A tool failure: readable in the tool block, and MOSS still answers.
    _set(d, "temperature", 0)
    d.find_element(By.ID, "tool-calculate").send_keys(Keys.SPACE)
    moss = _send(d, "DIVIDE 1 by 0")
    moss.find_element(By.CSS_SELECTOR, "details.tool-pass summary").click()
    assert moss.find_element(By.CSS_SELECTOR, "details.tool-pass summary").text == "Tool use: Calculate (1 failed)"
    failed = moss.find_element(By.CSS_SELECTOR, ".call-failed").text
    assert 'Calculate("1/0")' in failed and "failed:" in failed and "zero" in failed.lower()
    assert not moss.find_elements(By.CSS_SELECTOR, "[role=alert]")

    # Stop while MOSS is still thinking: the request ends, the page is ready for the next message.
    box = d.find_element(By.ID, "message")
    box.send_keys("SLOW: think about 1+1")
    box.send_keys(Keys.ENTER)
    _wait(
        d, lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.moss")[-1].find_elements(By.CSS_SELECTOR, ".thoughts-live")
    )
    d.find_element(By.ID, "stop").click()
    _wait(d, lambda d: d.find_element(By.ID, "status").text == "Stopped.")
    assert d.find_elements(By.CSS_SELECTOR, ".msg.moss")[-1].find_element(By.CSS_SELECTOR, ".note").text == "(stopped)"
    assert d.find_element(By.ID, "send").is_enabled() and not d.find_element(By.ID, "stop").is_enabled()

    # An overloaded server: a 503 message, and the page stays usable.
    _open(d, busy_url + "/")
    start = time.time()
    moss = _send(d, "anyone there?")
    assert time.time() - start < 10
    alert = moss.find_element(By.CSS_SELECTOR, "[role=alert]")
    assert alert.text.startswith("The server is busy (HTTP 503): the server is overloaded")
    assert d.find_element(By.ID, "send").is_enabled() and not d.find_element(By.ID, "stop").is_enabled()
