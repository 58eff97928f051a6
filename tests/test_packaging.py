"""The Docker image builds a working `graysteer` from exactly the files the Dockerfile copies:
the wheel is built from a directory holding only those, and its `graysteer --help` runs."""

import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).parents[1]


def copied_sources() -> list[str]:
    sources = []
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            sources += shlex.split(line)[1:-1]
    return sources


def test_the_wheel_from_the_dockerfiles_files_runs(tmp_path: Path) -> None:
    context = tmp_path / "context"
    context.mkdir()
    for source in copied_sources():
        origin = REPO / source
        if origin.is_dir():
            shutil.copytree(
                origin, context / source, ignore=shutil.ignore_patterns("__pycache__", "*_pb2*.py")
            )
        else:
            shutil.copy(origin, context / source)
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(wheels),
            str(context),
        ],
        check=True,
        timeout=300,
    )
    (wheel,) = wheels.glob("graysteer-*.whl")
    installed = tmp_path / "installed"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(installed)
        names = archive.namelist()
    assert any(name.endswith("admin_pb2.py") for name in names)  # generated from protos/
    # the live page's files, served from the installed package (/ui/)
    assert {"sidecar/ops/ui/index.html", "sidecar/ops/ui/app.js", "sidecar/ops/ui/style.css"} <= set(names)
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; sys.path.insert(0, sys.argv[1]); import sidecar; "
            "assert sidecar.__file__.startswith(sys.argv[1]), sidecar.__file__; "
            "from sidecar.ops.operator_http import _ui_files; assert b'app.js' in _ui_files()['index.html']; "
            "from sidecar.cli import main; sys.argv = ['graysteer', '--help']; main()",
            str(installed),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "envoy-config" in result.stdout and "serve" in result.stdout
