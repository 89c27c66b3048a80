"""omni serve's web page in a real browser (Debian's headless chromium through selenium): it streams a typed
message's reply as omni.chat would give it and compares two models side by side."""
import pytest

from serve_harness import KEY, STORY, Slow, streaming_server, wait_for


CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"  # Debian's chromium and chromium-driver


@pytest.fixture(scope="module")
def browser():
    """Headless chromium driven by selenium (CI installs both: .ci/run)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


# Every text the page's assistant turns are given, in order (each streamed update replaces the turn's text).
RECORD_TEXTS = """
window.seen = [];
new MutationObserver((records) => {
  for (const r of records) for (const n of r.addedNodes)
    if (n.nodeType === Node.TEXT_NODE && r.target.classList.contains("assistant"))
      window.seen.push([r.target.closest(".column").id, n.textContent]);
}).observe(document.querySelector("main"), {childList: true, subtree: true});
"""


def _page_reply(browser, message, columns):
    """Types `message`, waits until every column's reply has its stats line; (texts seen per column, stats)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    browser.execute_script(RECORD_TEXTS)
    box = browser.find_element(By.ID, "message")
    box.send_keys(message, Keys.ENTER)
    wait_for(lambda: all(len(browser.find_elements(By.CSS_SELECTOR, f"#{c} .stats")) for c in columns)
              and browser.find_element(By.ID, "send-button").is_enabled())
    seen = browser.execute_script("return window.seen")
    stats = [browser.find_elements(By.CSS_SELECTOR, f"#{c} .stats")[-1].text for c in columns]
    return {c: [text for column, text in seen if column == c] for c in columns}, stats


def test_the_page_streams_a_reply_and_compares_two_models(server, truth, browser, tmp_path):
    """A real browser on GET /: it lists the models once given the API key, streams the reply to a typed message
    (several growing texts, ending in omni.chat's reply) with its token count and tokens/s, and with "side by side"
    sends the next message to both models (here one workdir under its two names), each column with its own
    dialogue. The page loads nothing from elsewhere."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select
    streaming = streaming_server(server, tmp_path)
    try:
        browser.get(streaming.url + "/")
        assert browser.title == "omni serve"
        wait_for(lambda: "API key" in browser.find_element(By.ID, "status").text)  # the API's 401, shown
        browser.find_element(By.ID, "api-key").send_keys(KEY, Keys.TAB)
        wait_for(lambda: len(Select(browser.find_element(By.ID, "model-0")).options) == 2)
        Select(browser.find_element(By.ID, "model-0")).select_by_value("tiny")
        browser.find_element(By.ID, "max-tokens").clear()
        browser.find_element(By.ID, "max-tokens").send_keys("24")
        kw = dict(model="tiny", messages=[{"role": "user", "content": STORY}], max_tokens=24, temperature=0)
        tokens = streaming.client().chat.completions.create(**kw).usage.completion_tokens  # (and compiled)
        with Slow(server.engine, 0.05):
            seen, stats = _page_reply(browser, STORY, ["column-0"])
        want = truth.reply([], STORY, max_tokens=24)
        texts = seen["column-0"]
        assert texts[-1] == want and len(set(texts)) >= 3, (texts, want, stats)  # it grew as the reply settled
        assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))
        assert "tokens/s" in stats[0] and int(stats[0].split()[0]) == tokens, stats

        browser.find_element(By.ID, "compare").click()
        Select(browser.find_element(By.ID, "model-1")).select_by_value(server.name)
        seen, stats = _page_reply(browser, "hello", ["column-0", "column-1"])
        assert seen["column-0"][-1] == truth.reply([(STORY, want)], "hello", max_tokens=24)
        assert seen["column-1"][-1] == truth.reply([], "hello", max_tokens=24)  # its first message
        assert all("tokens/s" in s for s in stats)
        headings = [h.text for h in browser.find_elements(By.CSS_SELECTOR, ".column h2")]
        assert headings == ["tiny", server.name]
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE" and "401" not in e["message"]]
        assert not errors, errors
    finally:
        streaming.close(engine=False)
