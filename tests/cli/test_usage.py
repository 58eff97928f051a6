"""docs/cli.md's usage block is the parser's: regenerating it changes nothing, and a stale
block fails the check with the command to run."""

from pathlib import Path

import pytest

from sidecar.cli.usage import BEGIN, END, main, rewrite

DOCS = Path(__file__).parents[2] / "docs" / "cli.md"


def test_the_shipped_reference_is_the_parsers() -> None:
    text = DOCS.read_text()
    assert rewrite(text) == text
    for flag in (
        "--authz-http-shared-port",
        "--ready-max-bypass-ratio",
        "--etcd-cache",
        "--upstream-protocol",
    ):
        assert flag in text


def test_a_stale_block_fails_the_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stale = tmp_path / "cli.md"
    stale.write_text(f"# CLI\n\n{BEGIN}\n```\nusage: graysteer serve --config RULES\n```\n{END}\n\nprose\n")
    assert main(["--check", str(stale)]) == 1
    assert "out of date with the parser: run python -m sidecar.cli.usage" in capsys.readouterr().err
    assert main([str(stale)]) == 0 and main(["--check", str(stale)]) == 0
    assert stale.read_text().endswith(f"{END}\n\nprose\n")
