"""The command line: exit codes, JSON output and errors for bad flags."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import mmh3
import pytest

from sidecar.cli import main

EXAMPLE = str(Path(__file__).parents[2] / "examples" / "rules.yaml")


def test_check_valid(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", EXAMPLE]) == 0
    assert "ok, version" in capsys.readouterr().out


def test_check_invalid_exits_1_with_precise_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nclusters: [stable]\ndefault: stable\nrules: [{name: r, route: canary}]\n")
    assert main(["check", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}: rule 'r' (rules[0]) field route: unknown cluster 'canary'" in err


def test_check_warns_about_a_large_table_and_still_passes_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    large = tmp_path / "large.yaml"
    tenants = "".join(
        f"  - {{name: t{i}, match: {{headers: {{x-tenant: t{i}}}}}, route: canary}}\n" for i in range(600)
    )
    large.write_text("version: 1\nclusters: [stable, canary]\ndefault: stable\nrules:\n" + tenants)
    assert main(["check", str(large)]) == 0
    captured = capsys.readouterr()
    assert "ok, version" in captured.out
    assert f"{large}: warning: 600 rules" in captured.err and "Large tables" in captured.err
    assert main(["check", EXAMPLE]) == 0
    assert "warning" not in capsys.readouterr().err


def test_check_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(tmp_path / "none.yaml")]) == 1
    assert "cannot read" in capsys.readouterr().err


@pytest.mark.parametrize("which", ["old", "new", "requests"])
def test_diff_names_a_missing_file_without_errno(
    which: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = str(tmp_path / "none")
    old, new = (missing, EXAMPLE) if which == "old" else (EXAMPLE, missing if which == "new" else EXAMPLE)
    extra = ["--requests", missing] if which == "requests" else []
    assert main(["diff", old, new, *extra]) == 1
    err = capsys.readouterr().err
    assert missing in err and "Errno" not in err and "No such file" in err


def test_explain_prints_one_json_object(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "explain",
                "--config",
                EXAMPLE,
                "-H",
                "X-User-Tier: beta1",
                "--path",
                "/api/x",
                "--method",
                "post",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["cluster"] == "canary"
    assert result["rule"] == "beta-tier"
    assert result["bucket"] is None
    assert len(result["version"]) == 12
    assert result["set_headers"] == {
        "x-route-cluster": "canary",
        "x-graysteer-lane": "canary",
        "baggage": "graysteer.lane=canary",
    }


@pytest.mark.parametrize("args", [["--cookie", "uid=u1"], ["--query", "gray_id=u1"], ["-H", "x-user-id: u1"]])
def test_explain_split_key_sources_agree(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "--config", EXAMPLE, *args]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["rule"] == "checkout-ramp"
    # the same key gives the same bucket from every source: flagd's formula, seed + key
    assert result["bucket"] == (mmh3.hash("checkout-2026u1", 0, signed=False) * 100) >> 32
    assert result["key_source"].endswith(("uid", "gray_id", "x-user-id"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["explain", "--config", EXAMPLE, "-H", "no-colon"], "expected 'Name: value'"),
        (["explain", "--config", EXAMPLE, "--cookie", "nope"], "expected name=value"),
        (["serve", "--config", EXAMPLE, "--listen", "50051"], "expected HOST:PORT"),
        (["serve", "--config", EXAMPLE, "--listen", "host:99999"], "expected HOST:PORT"),
        # ASCII digits only: int() reads other scripts' digits, isdigit() passes superscripts
        (
            ["serve", "--config", EXAMPLE, "--listen", "127.0.0.1:\u0661\u0665\u0660\u0660\u0661"],
            "expected HOST:PORT",
        ),
        (["serve", "--config", EXAMPLE, "--listen", "127.0.0.1:\u00b2"], "expected HOST:PORT"),
        (["serve", "--config", EXAMPLE, "--workers", "\u0662"], "expected a whole number >= 1"),
        (["serve", "--config", EXAMPLE, "--drain", "\u0661"], "expected a number of seconds >= 0"),
        (["serve", "--config", EXAMPLE, "--drain", "nan"], "expected a number of seconds >= 0"),
        (["serve", "--config", EXAMPLE, "--drain", "inf"], "expected a number of seconds >= 0"),
        (["serve", "--config", EXAMPLE, "--drain", "1_0"], "expected a number of seconds >= 0"),
        (["serve", "--config", EXAMPLE, "--ready-max-bypass-ratio", "\u0660.\u0665"], "expected a share"),
        (["set-weight", "split", "canary=\u0665"], "expected CLUSTER=WEIGHT"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_flags_exit_2_with_a_specific_message(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_serve_refuses_to_start_on_an_invalid_rules_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nclusters: []\ndefault: x\n")
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "serve", "--config", str(bad), "--listen", "127.0.0.1:0"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert f"{bad}: field clusters: must not be empty" in result.stderr


def test_explain_with_an_identity(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "version: 1\nclusters: [stable, canary]\ndefault: stable\n"
        "trust: {identities: [{trust_domain: example.org}], override_headers: [x-canary]}\n"
        "rules:\n  - name: qa\n    match: {identity: {glob: 'spiffe://example.org/ns/qa/*'}}\n"
        "    route: canary\n"
    )
    qa = "spiffe://example.org/ns/qa/sa/tester"
    assert main(["explain", "--config", str(rules), "--identity", qa]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["cluster"], result["rule"], result["identity"]) == ("canary", "qa", qa)
    assert main(["explain", "--config", str(rules), "-H", "x-canary: 1"]) == 0  # plaintext
    assert json.loads(capsys.readouterr().out)["remove_headers"] == ["x-canary"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--listen", "off"], "--listen off leaves nothing to serve"),
        (["--authz-http-listen", "nowhere"], "--authz-http-listen: expected HOST:PORT"),
        (
            ["--authz-http-listen", "127.0.0.1:0", "--authz-http-shared-port"],
            "needs --authz-http-listen with a fixed port",
        ),
    ],
)
def test_serve_transport_flags_are_checked(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--config", "examples/rules.yaml", *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_the_published_schema_is_the_one_the_loader_uses(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0
    printed = capsys.readouterr().out
    published = (Path(__file__).parents[2] / "docs" / "rules.schema.json").read_text()
    assert printed == published, "docs/rules.schema.json is stale: run `graysteer schema`"
    from sidecar.core.schema import RULES_SCHEMA

    assert json.loads(published) == RULES_SCHEMA


def test_explain_host_sets_the_authority(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "version: 1\nclusters: [stable, canary]\ndefault: stable\n"
        "rules:\n  - {name: beta, match: {host: 'beta.*'}, route: canary}\n"
    )
    assert main(["explain", "--config", str(rules), "--host", "Beta.Shop.io:8443"]) == 0
    assert json.loads(capsys.readouterr().out)["rule"] == "beta"
    assert main(["explain", "--config", str(rules)]) == 0  # graysteer.local
    assert json.loads(capsys.readouterr().out)["rule"] == "default"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--config", "rules.yaml", "--etcd-cache", "/tmp/c"], "--etcd-cache need(s) --config etcd://"),
        (
            ["--config", "rules.yaml", "--replica-id", "r1", "--etcd-ca", "ca.pem"],
            "--etcd-ca, --replica-id need(s)",
        ),
        (["--config", "etcd://127.0.0.1:2379/x", "--state-file", "s.json"], "the state lives in etcd"),
    ],
)
def test_serve_refuses_etcd_flags_out_of_place(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["serve", *argv])
    assert exited.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["serve", "--config", "etcd://127.0.0.1/checkout"], "member '127.0.0.1': no port"),
        (["serve", "--config", "etcd://127.0.0.1:2379/"], "the prefix must name the service"),
        (["serve", "--config", "etcd://127.0.0.1:2379/x", "--etcd-cert", "c.pem"], "need --etcd-ca"),
    ],
)
def test_bad_etcd_flags_of_serve_are_flag_errors_before_anything_starts(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.startswith("usage: graysteer serve") and message in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["push", "examples/rules.yaml", "http://127.0.0.1:2379/x"],
            "expected etcd://HOST:PORT[,HOST:PORT...]/PREFIX",
        ),
        (["status", "--fleet", "etcd://127.0.0.1:99999/x"], "member '127.0.0.1:99999': Port out of range"),
        (
            ["status", "--fleet", "etcd://127.0.0.1:\u0662\u0663\u0667\u0669/x"],
            "member '127.0.0.1:\u0662\u0663\u0667\u0669'",
        ),
        (["status", "--fleet", "etcd://127.0.0.1:2379,,127.0.0.1:2380/x"], "an empty member"),
        (["diff", "examples/rules.yaml", "etcd://a:1,a:1/x"], "member a:1 is listed twice"),
    ],
)
def test_bad_etcd_addresses_are_one_line_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_status_watch_and_json_do_not_go_together(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--watch", "--json", "--admin", "127.0.0.1:1"]) == 1
    assert "--watch draws a live view; --json prints the status once" in capsys.readouterr().err


def test_status_watch_shows_an_unreachable_sidecar_and_keeps_reading() -> None:
    """A sidecar away is a line of the view, not its end: it is read again each second."""
    command = [sys.executable, "-m", "sidecar", "status", "--watch", "--admin", "127.0.0.1:1"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as view:
        assert view.stdout is not None
        try:
            first = [view.stdout.readline() for _ in range(2)]
            assert first[0].startswith("graysteer at ")
            assert first[1].startswith("! admin API at 127.0.0.1:1 is not reachable (UNAVAILABLE")
            assert view.poll() is None  # still watching
        finally:
            view.send_signal(signal.SIGINT)
            assert view.wait(10) == 0
