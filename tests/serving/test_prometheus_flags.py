"""`serve --prometheus-token-file` and `--prometheus-ca` are checked when the flags are read:
a missing, unreadable, empty or malformed file is refused with the flag named, before the
sidecar starts, not found out at the first query of a rollout."""

import dataclasses
import os
from pathlib import Path

import pytest

from sidecar.serving.options import ServeOptions
from tests.tls import make_ca, make_leaf

HTTPS = {"prometheus": "https://prometheus.example:9090"}


def problems(**changes: object) -> list[str]:
    return dataclasses.replace(ServeOptions(config="rules.yaml"), **HTTPS, **changes).problems()


def one_problem(**changes: object) -> str:
    found = [p for p in problems(**changes) if "--prometheus" in p]
    assert len(found) == 1, found
    return found[0]


def test_usable_files_pass(tmp_path: Path) -> None:
    token, ca = tmp_path / "token", tmp_path / "ca.pem"
    token.write_text("s3cret-token_1.2~\n")
    ca.write_bytes(make_ca().pem)
    assert problems(prometheus_token_file=str(token), prometheus_ca=str(ca)) == []


def written(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def unreadable(path: Path) -> Path:
    path.write_text("x")
    path.chmod(0)
    if os.access(path, os.R_OK):  # root reads it anyway
        pytest.skip("running as root: a mode-000 file is readable")
    return path


@pytest.mark.parametrize(
    ("make", "said"),
    [
        (lambda d: d / "missing", "No such file or directory"),
        (lambda d: d, "Is a directory"),
        (lambda d: unreadable(d / "locked"), "Permission denied"),
        (lambda d: written(d / "t", b" \n"), "the token file is empty"),
        (lambda d: written(d / "t", b"two\nlines"), "not one line of visible ASCII"),
        (lambda d: written(d / "t", b"caf\xc3\xa9"), "not one line of visible ASCII"),
    ],
)
def test_a_token_file_that_cannot_be_sent_is_refused_naming_the_flag(
    tmp_path: Path, make: object, said: str
) -> None:
    path = make(tmp_path)  # type: ignore[operator]
    problem = one_problem(prometheus_token_file=str(path))
    assert problem.startswith(f"--prometheus-token-file {path}: ") and said in problem, problem


def key_only(directory: Path) -> Path:
    path = directory / "key.pem"
    path.write_bytes(make_leaf(make_ca(), "server")[0])
    return path


@pytest.mark.parametrize(
    ("make", "said"),
    [
        (lambda d: d / "missing.pem", "No such file or directory"),
        (lambda d: d, "Is a directory"),
        (lambda d: unreadable(d / "locked.pem"), "Permission denied"),
        (lambda d: written(d / "e.pem", b""), "no PEM certificate"),
        (lambda d: written(d / "t.pem", b"not a certificate"), "no PEM certificate"),
        (key_only, "no PEM certificate"),
        (
            lambda d: written(
                d / "bad.pem", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
            ),
            "no PEM certificate",
        ),
    ],
)
def test_a_ca_that_cannot_verify_is_refused_naming_the_flag(tmp_path: Path, make: object, said: str) -> None:
    path = make(tmp_path)  # type: ignore[operator]
    problem = one_problem(prometheus_ca=str(path))
    assert problem.startswith(f"--prometheus-ca {path}: ") and said in problem, problem


def test_the_serve_command_refuses_before_starting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sidecar.cli import main

    missing = tmp_path / "nope.pem"
    argv = [
        "serve",
        "--config",
        "rules.yaml",
        "--prometheus",
        "https://p:9090",
        "--prometheus-ca",
        str(missing),
    ]
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    assert f"--prometheus-ca {missing}: No such file or directory" in capsys.readouterr().err
