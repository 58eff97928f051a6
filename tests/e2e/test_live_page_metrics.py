"""The live page (/ui/) in a real headless chromium shows each PromQL metric check of a
rollout against its threshold: the value Prometheus gave, the threshold, ok or over, and
the dry-run marker, through the real Envoy and a real Prometheus scraping the backends'
business metric (the canary's checkouts fail inside 200 answers; the check is a dry run, so
the rollout goes on while the page shows the breach)."""

import re
from pathlib import Path

from sidecar.dev.load import BackgroundLoad
from tests.browser import chromium
from tests.e2e.test_live_page import WAIT_MS, open_page
from tests.e2e.test_rollout_prometheus import metric_checks, rollout, stack_with_prometheus

BREACH = re.compile(r"^metric checkout-failures \(dry run\): ([0-9.e+-]+) / max 0\.1: over$")
PASS = re.compile(r"^metric request-success-rate: ([0-9.e+-]+) / min 0\.9: ok$")


def test_the_page_shows_each_metric_value_against_its_threshold(tmp_path: Path) -> None:
    steps = "[{weight: 50, hold: 300s}, {weight: 100}]"
    with (
        stack_with_prometheus(tmp_path, steps, True) as (stack, _),
        chromium(tmp_path / "profile") as browser,
    ):
        stack.backends["canary"].checkout_fail_rate = 0.6
        load = BackgroundLoad(stack.port, {}, threads=3, vary_user=True)
        try:
            watched = open_page(stack, browser.new_page())
            card = watched.page.locator(".rollout[data-rule='ramp']")
            breach = card.locator(".metric[data-metric='checkout-failures'][data-state='over']")
            passing = card.locator(".metric[data-metric='request-success-rate'][data-state='ok']")
            breach.wait_for(timeout=3 * WAIT_MS)  # Prometheus scrapes every second: a window fills
            passing.wait_for(timeout=3 * WAIT_MS)
            breach_line, pass_line = breach.inner_text(), passing.inner_text()
            shown = metric_checks(stack)
        finally:
            load.stop()
        found = BREACH.match(breach_line)
        assert found and float(found.group(1)) > 0.1, breach_line
        assert "dry-run" in (breach.get_attribute("class") or "").split()
        found = PASS.match(pass_line)
        assert found and float(found.group(1)) >= 0.9, pass_line
        assert "dry-run" not in (passing.get_attribute("class") or "").split()
        assert card.locator(".metric").count() == 2  # one line per check, in the rules' order
        names = [m.get_attribute("data-metric") for m in card.locator(".metric").all()]
        assert names == list(shown) == ["checkout-failures", "request-success-rate"]
        assert rollout(stack)["phase"] == "progressing"  # the dry-run breach acted on nothing
        assert watched.problems == []
