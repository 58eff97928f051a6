"""Every program the project runs comes from the project's own files: a Python dependency
(`sys.executable`, the venv's `envoy`), or `ensure_tool` (a Debian package installed when
missing). A literal program name in a subprocess call (`"etcdctl"`) is a tool that only the
machine it was written on had: the suite passes there and fails on a new machine."""

import ast
from pathlib import Path

ROOT = Path(__file__).parents[1]
CALLS = {"run", "Popen", "call", "check_call", "check_output", "create_subprocess_exec"}


def literal_programs(path: Path, root: Path = ROOT) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        func = node.func
        owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
        if owner not in ("subprocess", "asyncio") or func.attr not in CALLS:  # type: ignore[attr-defined]
            continue
        first = node.args[0]
        program = first.elts[0] if isinstance(first, ast.List) and first.elts else first
        if isinstance(program, ast.Constant) and isinstance(program.value, str):
            found.append(f"{path.relative_to(root)}:{node.lineno}: {program.value!r}")
    return found


def test_no_subprocess_names_a_program_nothing_installs() -> None:
    files = [p for d in ("sidecar", "tests", "benchmarks") for p in (ROOT / d).rglob("*.py")]
    # apt-get is how ensure_tool installs the rest (CI and the dev containers run as root).
    found = [f for path in files for f in literal_programs(path) if "'apt-get'" not in f]
    assert not found, (
        "run programs through ensure_tool (sidecar/dev/devstack.py) or a Python dependency: "
        + ", ".join(found)
    )


def test_the_check_finds_a_literal_program(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text('import subprocess\nsubprocess.run(["etcdctl", "put", "k", "v"])\n')
    assert literal_programs(sample, tmp_path) == ["sample.py:2: 'etcdctl'"]
