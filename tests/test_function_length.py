"""scripts/function_length.py (run by scripts/check): a function over the limit fails the
check, named with its class, wherever it is nested; one at the limit passes."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "scripts" / "function_length.py"


def function(name: str, lines: int, indent: str = "") -> str:
    """A function `lines` long, its `def` line included."""
    body = "".join(f"{indent}    x = {i}\n" for i in range(lines - 1))
    return f"{indent}def {name}() -> None:\n{body}"


def check(tmp_path: Path, source: str, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "pkg").mkdir(exist_ok=True)
    (tmp_path / "pkg" / "module.py").write_text(source)
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args, str(tmp_path / "pkg")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_function_at_the_limit_passes(tmp_path: Path) -> None:
    run = check(tmp_path, function("short", 80) + "\n\nclass A:\n" + function("method", 80, "    "))
    assert run.returncode == 0, run.stdout + run.stderr


def test_every_function_over_the_limit_is_named_with_where_it_is(tmp_path: Path) -> None:
    source = (
        function("long", 81)
        + "\n\nclass Outer:\n"
        + "    async def method(self) -> None:\n"
        + function("inner", 81, "        ")
    )
    run = check(tmp_path, source)
    assert run.returncode == 1
    found = [line.split(": ", 1)[1] for line in run.stdout.splitlines()]
    assert found == [
        "long is 81 lines long (at most 80)",
        "Outer.method is 82 lines long (at most 80)",
        "Outer.method.inner is 81 lines long (at most 80)",
    ]


def test_the_limit_can_be_given(tmp_path: Path) -> None:
    assert check(tmp_path, function("f", 11), "--max", "10").returncode == 1
    assert check(tmp_path, function("f", 10), "--max", "10").returncode == 0
