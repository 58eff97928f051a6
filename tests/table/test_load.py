"""Reading a rules file is bounded: alias bombs, deep nesting, devices, FIFOs and huge files
are refused quickly with a clear problem, never a traceback, a hang or gigabytes."""

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.core import RulesError
from sidecar.core.state import StateError
from sidecar.sources.state_file import StateFile
from sidecar.table.load import MAX_FILE_BYTES, load_rules, parse_rules

REPO = Path(__file__).parents[2]
LEVELS = "abcdefghi"
ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{level}: &{level} [{', '.join(['*' + prev] * 9)}]\n" for prev, level in itertools.pairwise(LEVELS)
)


def test_an_alias_bomb_is_refused_at_once_with_a_short_message() -> None:
    assert len(ALIAS_BOMB) < 500
    with pytest.raises(RulesError) as refused:
        parse_rules(ALIAS_BOMB.encode(), "bomb.yaml")
    assert "expands to more than" in str(refused.value)
    assert len(str(refused.value)) < 1000


def test_deep_nesting_is_an_invalid_file_not_a_recursion_error(tmp_path: Path) -> None:
    deep = tmp_path / "deep.yaml"
    deep.write_text("[" * 5000)
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "check", str(deep)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "nested more than" in result.stderr or "invalid YAML" in result.stderr


def test_huge_values_are_truncated_in_problems() -> None:
    text = "version: 1\nclusters: [stable]\ndefault: stable\nrules: " + "x" * 100_000 + "\n"
    with pytest.raises(RulesError) as refused:
        parse_rules(text.encode(), "big.yaml")
    assert len(str(refused.value)) < 2000
    assert "(truncated)" in str(refused.value)


def test_a_device_is_refused_before_it_is_read(tmp_path: Path) -> None:
    link = tmp_path / "rules.yaml"
    link.symlink_to("/dev/zero")
    with pytest.raises(RulesError, match="not a regular file"):
        load_rules(link)


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "rules.yaml"
    os.mkfifo(fifo)
    with pytest.raises(RulesError, match="not a regular file"):
        load_rules(fifo)
    state = tmp_path / "state.json"
    os.mkfifo(state)
    with pytest.raises(StateError, match="not a regular file"):  # never read as "no state"
        StateFile(state).read_bytes()


def test_an_oversized_file_is_refused(tmp_path: Path) -> None:
    big = tmp_path / "rules.yaml"
    with big.open("wb") as handle:
        handle.truncate(MAX_FILE_BYTES + 1)
    with pytest.raises(RulesError, match="over the limit"):
        load_rules(big)


def test_a_symlink_to_a_regular_file_is_read(tmp_path: Path) -> None:
    link = tmp_path / "rules.yaml"  # Kubernetes mounts ConfigMap keys as symlinks
    link.symlink_to(REPO / "examples" / "rules.yaml")
    assert load_rules(link).clusters == ("stable", "canary")
