"""Strings from etcd and from a sidecar reach a terminal with their control characters
(terminal escapes, bidi overrides) shown escaped: `status`, `status --fleet`,
`status --watch` (plain lines and rich's screen), and error messages."""

import io
from typing import Any

import pytest
from rich.console import Console

from sidecar.cli import main, watch
from sidecar.cli.screen import render
from sidecar.ops import view_text
from sidecar.ops.terminal import shown, shown_lines, shown_tree

ESCAPES = ["\x1b]0;pwned\x07", "\x1b[2J", "\x9b31m", "\x7f", "\u202e", "\u2066", "\u200b", "\n  fake", "\r"]
HOSTILE = "".join(ESCAPES)


def fleet_report() -> dict[str, Any]:
    return {
        "fleet": "etcd://127.0.0.1:2379/gs",
        "leader": "r1" + HOSTILE,
        "rules_version": "v1" + HOSTILE,
        "replicas": [
            {
                "id": "r1" + HOSTILE,
                "version": "v1" + HOSTILE,
                "file_version": "v1" + HOSTILE,
                "leader": True,
                "ready": True,
                "source_connected": True,
                "seen_seconds_ago": 1,
            }
        ],
        "refused_records": [{"key": "/gs/replicas/[blink]x" + HOSTILE, "reason": "bad" + HOSTILE}],
    }


def assert_escaped(text: str, lines: bool = False) -> None:
    """Every escape shown, not acted on (with `lines`, a message's newlines are kept)."""
    for escape in ESCAPES[:-2] if lines else ESCAPES:
        assert escape not in text
    assert "\\x1b]0;pwned\\x07" in text and "\\u202e" in text and "\\x9b31m" in text
    assert lines or "\\x0a  fake" in text


def test_shown_escapes_what_a_terminal_acts_on_and_keeps_what_it_prints() -> None:
    assert shown("caf\u00e9 \u6f22 \U0001f600 a-b_c.1:2 [x]") == "caf\u00e9 \u6f22 \U0001f600 a-b_c.1:2 [x]"
    assert shown("a\x1bb\x00\x85\ud800\U000e0001") == "a\\x1bb\\x00\\x85\\ud800\\U000e0001"
    assert shown_lines("one\x1b\ntwo\u202e") == "one\\x1b\ntwo\\u202e"
    assert shown_tree({"k\x1b": ["v\x07", 1, None]}) == {"k\\x1b": ["v\\x07", 1, None]}


def test_status_fleet_prints_etcds_strings_escaped(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def fake(address: Any, tls: Any) -> dict[str, Any]:
        return fleet_report()

    monkeypatch.setattr("sidecar.fleet.fleet.fleet_status", fake)
    assert main(["status", "--fleet", "etcd://127.0.0.1:2379/gs"]) == 0
    assert_escaped(capsys.readouterr().out)


class Reader:
    def read(self) -> dict[str, Any]:
        from sidecar.admin.client import AdminError

        raise AdminError("sidecar says" + HOSTILE)


def test_status_watch_lines_and_screen_show_them_escaped() -> None:
    shown_view = watch.read_view(Reader(), fleet_report)  # type: ignore[arg-type]
    assert_escaped("\n".join(view_text.lines(shown_view)))
    out = io.StringIO()
    Console(file=out, width=400, color_system=None, force_terminal=False).print(render(shown_view))
    assert_escaped(out.getvalue())
    assert "[blink]x" in out.getvalue()  # no rich markup read from etcd


def test_an_error_message_is_printed_escaped(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def fails(address: Any, tls: Any) -> dict[str, Any]:
        raise OSError("etcd key /gs/replicas/x" + HOSTILE)

    monkeypatch.setattr("sidecar.fleet.fleet.fleet_status", fails)
    assert main(["status", "--fleet", "etcd://127.0.0.1:2379/gs"]) == 1
    assert_escaped(capsys.readouterr().err, lines=True)
