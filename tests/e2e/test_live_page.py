"""The live page (/ui/ on --http-listen) in a real headless chromium, against a rollout that
runs through the real Envoy: it loads without a console error, shows the clusters of each
split and the traffic, follows a step as it advances, explains a request exactly as
`graysteer explain --admin` does, and offers rollout actions only with --http-actions, to a
caller holding the admin token (approve only where the current step asks for it)."""

import json
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import ConsoleMessage, Page, Response

from sidecar.cli import main
from sidecar.dev.devstack import Stack
from sidecar.dev.load import BackgroundLoad
from tests.browser import chromium
from tests.e2e.test_live_terminal import advanced, rollout_stack
from tests.e2e.test_rollout_gates_envoy import start as gated_stack

TOKEN = "page-s3cret"
WAIT_MS = 20_000


def refused_action(url: str) -> bool:
    return "/ui/rollouts/" in url


class Watched:
    """A page whose console errors, uncaught exceptions and failed loads are kept."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.problems: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.problems.append(f"uncaught: {error}"))
        page.on("response", self._response)
        page.on("requestfailed", lambda request: self.problems.append(f"failed: {request.url}"))

    def _console(self, message: ConsoleMessage) -> None:
        # A refused action is an answer the page shows (the browser logs its 401 all the same)
        if message.type in ("error", "warning") and not refused_action(message.location.get("url", "")):
            self.problems.append(f"console {message.type}: {message.text}")

    def _response(self, response: Response) -> None:
        if response.status >= 400 and not refused_action(response.url):
            self.problems.append(f"HTTP {response.status}: {response.url}")

    def text(self, selector: str) -> str:
        return self.page.locator(selector).inner_text(timeout=WAIT_MS)

    def wait_text(self, selector: str, text: str) -> None:
        self.page.locator(selector, has_text=text).first.wait_for(timeout=WAIT_MS)


def open_page(stack: Stack, page: Page) -> Watched:
    assert stack.sidecar is not None
    watched = Watched(page)
    page.goto(f"http://127.0.0.1:{stack.sidecar.http}/ui/")
    watched.wait_text(".rollout[data-rule='ramp'] .status", "progressing")
    return watched


def weights(watched: Watched) -> dict[str, str]:
    rows = watched.page.locator(".split[data-rule='ramp'] .row")
    return {
        row.get_attribute("data-cluster") or "": row.locator(".weight").inner_text() for row in rows.all()
    }


def test_the_page_follows_the_rollout_and_explains_like_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with rollout_stack(tmp_path) as stack, chromium(tmp_path / "profile") as browser:
        assert stack.sidecar is not None
        watched = open_page(stack, browser.new_page())
        assert weights(watched) == {"stable": "80 (80%)", "canary": "20 (20%)"}
        watched.wait_text(".rollout li.step-current", "step 1: weight 20")
        assert "read-only" in watched.text("#access-note")
        assert not watched.page.locator("#token").is_visible()  # nothing to authenticate for
        assert watched.page.locator("button[data-action]").count() == 0  # no actions: read-only
        load = BackgroundLoad(stack.port, {}, threads=2, vary_user=True)
        try:
            watched.wait_text("#traffic-note", "from Envoy at")
            watched.wait_text("#traffic .row[data-cluster='canary']", "/s")
            advanced(stack)  # the rollout itself: as soon as the load gives a window its requests
            watched.wait_text(".rollout li.step-done", "step 1: weight 20 (done)")  # the page follows
            watched.wait_text(".rollout li.step-current", "step 2: weight 50")
            watched.wait_text(".split[data-rule='ramp'] .row[data-cluster='canary'] .weight", "50 (50%)")
            assert "0.00% / max 10.00%" in watched.text(".rollout .checks")
        finally:
            load.stop()

        page = watched.page
        page.fill("textarea[name='headers']", "x-user-id: u-7\nX-Canary: 0")
        page.fill("input[name='path']", "/cart")
        page.click("#explain-button")
        page.locator("#explain-result", has_text="cluster").wait_for(timeout=WAIT_MS)
        shown: dict[str, Any] = json.loads(watched.text("#explain-result"))
        capsys.readouterr()
        cli = ["explain", "--admin", stack.sidecar.admin, "-H", "x-user-id: u-7", "-H", "X-Canary: 0"]
        assert main([*cli, "--path", "/cart"]) == 0
        expected = json.loads(capsys.readouterr().out)
        assert {**shown, "source": ""} == {**expected, "source": ""}
        assert shown["rule"] == "ramp" and watched.text("#explain-summary").startswith(
            f"-> {shown['cluster']}"
        )

        page.screenshot(path=str(tmp_path / "live-page.png"), full_page=True)  # kept out of the repo
        assert watched.problems == []


def test_actions_only_with_http_actions_and_only_for_the_admin_token(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text(TOKEN)
    token.chmod(0o600)
    with (
        rollout_stack(tmp_path, "--http-actions", "--admin-token-file", str(token)) as stack,
        chromium(tmp_path / "profile") as browser,
    ):
        watched = open_page(stack, browser.new_page())
        page = watched.page
        page.on("dialog", lambda dialog: dialog.accept())  # "abort the rollout of ramp?"
        assert "actions need the admin token" in watched.text("#access-note")
        page.locator(".rollout button[data-action='pause']").wait_for(timeout=WAIT_MS)
        page.click(".rollout button[data-action='abort']")
        watched.wait_text(".rollout .action-result", "abort refused: a valid admin bearer token is required")
        assert "progressing" in watched.text(".rollout .status")
        page.fill("#token", TOKEN)
        page.click(".rollout button[data-action='abort']")
        watched.wait_text(".rollout .status", "aborted: aborted by an operator")
        watched.wait_text(".split[data-rule='ramp'] .row[data-cluster='canary'] .weight", "0 (0%)")
        assert stack.sidecar is not None
        status, body = stack.sidecar.http_get("/rollouts/ramp")
        assert status == 200 and json.loads(body)["phase"] == "aborted"  # the controller's state
        page.click(".rollout button[data-action='resume']")
        watched.wait_text(".rollout .status", "progressing: resumed by an operator")
        assert watched.problems == []


def test_a_step_waiting_for_approval_says_so_and_the_page_approves_it(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text(TOKEN)
    token.chmod(0o600)
    steps = "[{weight: 20, hold: 2s, approve: true}, {weight: 100}]"
    with (
        gated_stack(tmp_path, steps, "", "--http-actions", "--admin-token-file", str(token)) as stack,
        chromium(tmp_path / "profile") as browser,
    ):
        watched = open_page(stack, browser.new_page())
        page = watched.page
        page.on("dialog", lambda dialog: dialog.accept())
        page.fill("#token", TOKEN)
        watched.wait_text(".rollout .wait", "waiting for approval: graysteer rollout approve ramp")
        assert "waiting for approval" in watched.text(".rollout .steps .step-current")
        page.click(".rollout button[data-action='approve']")
        watched.wait_text(".rollout .status", "approved by an operator")
        assert page.locator(".rollout button[data-action='approve']").count() == 0  # nothing left to approve
        assert watched.problems == []
