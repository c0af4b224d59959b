"""The browser chat page (`distill serve --ui`) in headless Chromium: a streamed answer, the
settings reaching the server, reset, teacher and student side by side with their speed, and the
API key guarding the page. One vLLM server (started by `distill serve --ui` as a user would) is
shared by every test; the pages for the other states run in-process against it."""

import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.helpers import ROOT

pytestmark = [
    pytest.mark.engine,  # `distill serve` starts vLLM's OpenAI server
    pytest.mark.browser,
    # Gradio 6.31's queue calls pandas options that pandas 3 deprecates: theirs, not ours.
    pytest.mark.filterwarnings("ignore:.*(no_silent_downcasting|The copy keyword)"),
]

KEY = "sk-distill-ui-test"
STATS = re.compile(r"\d+ tokens? · ([\d.]+|–) tok/s · TTFT \d+ ms")
# Records every distinct text of the pane's last answer as the DOM changes: proof of streaming
# that does not depend on how fast the test polls.
WATCH = """pane => { window.seen = []; new MutationObserver(() => {
    const bot = [...document.querySelectorAll(pane + ' [data-testid=bot]')].pop();
    const text = bot ? bot.innerText : '';
    if (text && window.seen[window.seen.length - 1] !== text) window.seen.push(text);
}).observe(document.querySelector(pane), {subtree: true, childList: true, characterData: true}); }"""


@pytest.fixture(scope="module")
def served(tiny_models, tmp_path_factory):
    """`distill serve --ui` with an API key; yields (process, API url, chat page url)."""
    log = tmp_path_factory.mktemp("serve-ui") / "stderr.log"
    cmd = [sys.executable, "-m", "distill.cli", "serve", "--model", str(tiny_models["llama-teacher"]),
           "--served-model-name", "student", "--port", "0", "--api-key", KEY, "--ui", "--ui-port", "0",
           "--max-model-len", "512"]
    with open(log, "w") as stderr:  # a file, not a pipe: nobody reads it while the tests run
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=ROOT)
    ready, page = proc.stdout.readline(), proc.stdout.readline()  # block until both answer
    if not (ready.startswith("ready:") and page.startswith("chat page:")):
        proc.kill()
        pytest.fail(f"distill serve --ui did not start: {ready}{page}{log.read_text()[-3000:]}")
    yield proc, ready.split()[1], page.split()[2]
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


@pytest.fixture
def endpoint(served):
    from distill.serve.ui import Endpoint

    return Endpoint(served[1], "student", KEY)


@pytest.fixture
def page(browser):
    page = browser.new_page(viewport={"width": 1200, "height": 800})
    yield page
    page.close()


def open_chat(page, url: str):
    page.goto(url, wait_until="load")  # Gradio keeps a connection open: "networkidle" never comes
    box = page.get_by_placeholder("Type a message...")
    box.wait_for(timeout=30_000)
    return box


def greedy(page, max_tokens: int = 128) -> None:
    """Temperature 0 (an answer repeats exactly) and a shorter answer, through the page's sliders."""
    page.get_by_label("number input for Temperature").fill("0")
    page.get_by_label("number input for Max tokens").fill(str(max_tokens))
    page.get_by_label("number input for Max tokens").press("Tab")


def send(page, text: str, pane: str = "student") -> tuple[str, str]:
    """Send `text`; wait until `pane`'s answer to it is complete; returns (answer, stats line)."""
    users = page.locator(f"#{pane}-pane [data-testid=user]").count()
    box = page.get_by_placeholder("Type a message...")
    box.fill(text)
    box.press("Enter")
    # The message's own first update clears the previous stats line, so a stats line seen
    # beside one more user message is this answer's.
    page.wait_for_function("""([pane, users]) =>
        document.querySelectorAll(pane + '-pane [data-testid=user]').length === users + 1 &&
        document.querySelector(pane + '-stats').innerText.includes('tok/s')""", arg=[f"#{pane}", users],
                           timeout=60_000)
    return (page.locator(f"#{pane}-pane [data-testid=bot]").last.inner_text(),
            page.locator(f"#{pane}-stats").inner_text())


def reset(page) -> None:
    page.get_by_role("button", name="Reset", exact=True).click()
    page.locator("[data-testid=user]").first.wait_for(state="detached")


def screenshot(page, path) -> None:
    page.screenshot(path=path)
    assert path.stat().st_size > 10_000, f"{path} looks blank"


def test_a_message_gets_a_streamed_answer_and_the_settings_apply(served, endpoint, page, tmp_path):
    from distill.serve.ui import launch_ui

    ui = launch_ui(endpoint, port=0)
    try:
        open_chat(page, ui.local_url)
        screenshot(page, tmp_path / "empty.png")
        greedy(page, max_tokens=128)
        page.evaluate(WATCH, "#student-pane")
        answer, stats = send(page, "Hello there")
        assert answer.strip() and STATS.fullmatch(stats.strip())
        assert int(stats.split()[0]) <= 128  # the max tokens slider reached the server
        assert len(page.evaluate("window.seen")) >= 3  # the answer grew in steps: streamed
        screenshot(page, tmp_path / "answered.png")

        reset(page)
        assert page.locator("#student-pane [data-testid=bot]").count() == 0
        assert send(page, "Hello there")[0] == answer  # same single message, greedy: the history was cleared

        reset(page)
        page.get_by_label("System prompt").fill("You are a pirate. Answer in rhymes.")
        assert send(page, "Hello there")[0] != answer  # the system prompt reached the model
    finally:
        ui.close()


def test_compare_mode_shows_teacher_and_student_answers_with_their_speed(endpoint, page, tmp_path):
    from distill.serve.ui import Endpoint, launch_ui

    teacher = Endpoint.at(endpoint.url, KEY)  # a teacher given by URL: its model name is looked up
    ui = launch_ui(endpoint, teacher, port=0)
    try:
        open_chat(page, ui.local_url)
        greedy(page)
        assert page.get_by_text("teacher: student").count() and page.get_by_text("student: student").count()
        send(page, "Sort the digits of 3608.", pane="student")  # the student answers last
        for pane in ("teacher", "student"):
            assert page.locator(f"#{pane}-pane [data-testid=bot]").last.inner_text().strip()
            assert STATS.fullmatch(page.locator(f"#{pane}-stats").inner_text().strip())
        screenshot(page, tmp_path / "compare.png")
    finally:
        ui.close()


def test_the_page_requires_the_api_key(served, page, tmp_path):
    """The page `distill serve --ui --api-key` started: a wrong key is refused, the right one
    gets to the chat, which then answers through the keyed server."""
    _, _, url = served
    page.goto(url, wait_until="load")
    page.get_by_label("password").wait_for()
    screenshot(page, tmp_path / "login.png")
    page.get_by_label("username").fill("me")
    page.get_by_label("password").fill("sk-wrong")
    page.get_by_role("button", name="Login").click()
    page.get_by_text("Incorrect Credentials").wait_for()
    assert page.get_by_placeholder("Type a message...").count() == 0
    screenshot(page, tmp_path / "refused.png")

    page.get_by_label("username").fill("me")
    page.get_by_label("password").fill(KEY)
    page.get_by_role("button", name="Login").click()
    page.get_by_placeholder("Type a message...").wait_for(timeout=30_000)
    greedy(page)
    answer, stats = send(page, "Hello there")
    assert answer.strip() and STATS.fullmatch(stats.strip())
    screenshot(page, tmp_path / "logged-in.png")


def test_the_page_binds_loopback_and_sigterm_stops_everything(served):
    """Last in this module: it stops the shared server."""
    proc, _, url = served
    port = int(url.rstrip("/").rsplit(":", 1)[1])
    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    listening = [c.laddr for p in tree for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert [a.ip for a in listening if a.port == port] == ["127.0.0.1"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 128 + signal.SIGTERM  # like every command (issue 31)
    deadline = time.time() + 30
    while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in tree[1:]) and time.time() < deadline:
        time.sleep(0.5)
    assert not [p.pid for p in tree[1:] if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
