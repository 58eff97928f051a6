"""The listener's TLS by SDS: `--sds` forms read strictly, the generated listener and node, the
resource files of the file form, and `check --envoy`'s findings for SDS that cannot work."""

import copy
from collections.abc import Callable
from typing import Any

import pytest
import yaml

from sidecar.envoyconf.generate import EnvoyOptions, bootstrap_document
from sidecar.envoyconf.lint import check
from sidecar.envoyconf.sds import FileSds, SpireSds, parse_sds
from sidecar.envoyconf.tls import TlsOptions, sds_files
from sidecar.table.load import load_rules
from tests.e2e.conftest import REPO

TABLE = load_rules(REPO / "examples" / "rules.yaml")


def generated(sds: FileSds | SpireSds | None) -> dict[str, Any]:
    options = EnvoyOptions(mtls=TlsOptions(sds=sds))
    document: dict[str, Any] = yaml.safe_load(yaml.safe_dump(bootstrap_document(TABLE, options)))
    return document


def common(config: dict[str, Any]) -> dict[str, Any]:
    chain = config["static_resources"]["listeners"][0]["filter_chains"][0]
    context: dict[str, Any] = chain["transport_socket"]["typed_config"]["common_tls_context"]
    return context


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("file:/etc/graysteer/tls", FileSds("/etc/graysteer/tls")),
        ("file:/etc/graysteer/tls/", FileSds("/etc/graysteer/tls")),
        ("spire:unix:///run/spire/sockets/agent.sock", SpireSds("/run/spire/sockets/agent.sock")),
    ],
)
def test_sds_forms(text: str, expected: FileSds | SpireSds) -> None:
    assert parse_sds(text) == expected


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("file:tls", "absolute path"),
        ("file://host/tls", "absolute path"),
        ("spire:/run/agent.sock", "unix socket"),
        ("spire:unix://relative.sock", "unix socket"),
        ("spire:unix:///run/", "unix socket"),
        ("/etc/graysteer/tls", "expected file:"),
        ("vault:secret/tls", "expected file:"),
    ],
)
def test_bad_sds_forms_say_which_forms_exist(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why) as raised:
        parse_sds(text)
    assert "file:/ABSOLUTE/DIR or spire:unix:///ABSOLUTE/PATH" in str(raised.value)


def test_file_form_watches_the_directory_and_keeps_the_san_matcher() -> None:
    config = generated(FileSds("/etc/graysteer/tls"))
    assert config["node"] == {"id": "graysteer-front", "cluster": "graysteer-front"}
    context = common(config)
    (certificate,) = context["tls_certificate_sds_secret_configs"]
    trust = context["combined_validation_context"]["validation_context_sds_secret_config"]
    for secret, name, path in ((certificate, "server_cert", "cert.yaml"), (trust, "trusted_ca", "ca.yaml")):
        assert secret["name"] == name
        assert secret["sds_config"]["path_config_source"] == {
            "path": f"/etc/graysteer/tls/{path}",
            "watched_directory": {"path": "/etc/graysteer/tls"},
        }
        assert secret["sds_config"]["initial_fetch_timeout"] == "0s"
    matcher = context["combined_validation_context"]["default_validation_context"]
    assert matcher["match_typed_subject_alt_names"] == [
        {"san_type": "URI", "matcher": {"prefix": "spiffe://example.org/"}}
    ]
    assert "tls_certificates" not in context and "validation_context" not in context
    assert check(TABLE, config) == []


def test_the_resource_files_name_their_secrets_and_pems_in_the_directory() -> None:
    files = sds_files(FileSds("/etc/graysteer/tls"))
    secret_type = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
    assert files == {
        "cert.yaml": {
            "resources": [
                {
                    "@type": secret_type,
                    "name": "server_cert",
                    "tls_certificate": {
                        "certificate_chain": {"filename": "/etc/graysteer/tls/tls.crt"},
                        "private_key": {"filename": "/etc/graysteer/tls/tls.key"},
                    },
                }
            ]
        },
        "ca.yaml": {
            "resources": [
                {
                    "@type": secret_type,
                    "name": "trusted_ca",
                    "validation_context": {"trusted_ca": {"filename": "/etc/graysteer/tls/ca.crt"}},
                }
            ]
        },
    }


def test_spire_form_asks_the_agent_for_its_default_names() -> None:
    config = generated(SpireSds("/run/spire/sockets/agent.sock"))
    context = common(config)
    names = [context["tls_certificate_sds_secret_configs"][0]["name"]]
    names.append(context["combined_validation_context"]["validation_context_sds_secret_config"]["name"])
    assert names == ["default", "ROOTCA"]
    (agent,) = [c for c in config["static_resources"]["clusters"] if c["name"] == "spire_agent"]
    endpoint = agent["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"] == {"pipe": {"path": "/run/spire/sockets/agent.sock"}}
    assert check(TABLE, config) == []


def test_static_files_have_no_node_and_no_agent() -> None:
    config = generated(None)
    assert "node" not in config
    assert [c["name"] for c in config["static_resources"]["clusters"]] == ["graysteer", "stable", "canary"]


def trust(config: dict[str, Any]) -> dict[str, Any]:
    secret: dict[str, Any] = common(config)["combined_validation_context"][
        "validation_context_sds_secret_config"
    ]
    return secret


def no_combined_matcher(config: dict[str, Any]) -> None:
    common(config)["validation_context_sds_secret_config"] = common(config).pop(
        "combined_validation_context"
    )["validation_context_sds_secret_config"]


def spire_cluster(config: dict[str, Any]) -> dict[str, Any]:
    (agent,) = [c for c in config["static_resources"]["clusters"] if c["name"] == "spire_agent"]
    return agent


BROKEN: list[tuple[str, FileSds | SpireSds, Callable[[dict[str, Any]], Any], str]] = [
    ("no node", FileSds("/tls"), lambda c: c.pop("node"), "has no node id and cluster"),
    (
        "node without cluster",
        SpireSds("/a.sock"),
        lambda c: c["node"].pop("cluster"),
        "has no node id and cluster",
    ),
    (
        "unwatched file",
        FileSds("/tls"),
        lambda c: trust(c)["sds_config"]["path_config_source"].pop("watched_directory"),
        "reads secret 'trusted_ca' from /tls/ca.yaml without a watched directory",
    ),
    (
        "deprecated path",
        FileSds("/tls"),
        lambda c: trust(c)["sds_config"].update(path="/tls/ca.yaml", path_config_source=None),
        "without a watched directory",
    ),
    (
        "no SAN matcher",
        FileSds("/tls"),
        lambda c: common(c)["combined_validation_context"].pop("default_validation_context"),
        "no SAN matcher",
    ),
    ("CA by SDS alone", SpireSds("/a.sock"), no_combined_matcher, "no SAN matcher"),
    (
        "no agent cluster",
        SpireSds("/a.sock"),
        lambda c: c["static_resources"]["clusters"].remove(spire_cluster(c)),
        "asks cluster 'spire_agent' for secret 'default', but there is no such cluster",
    ),
    (
        "agent over HTTP/1",
        SpireSds("/a.sock"),
        lambda c: spire_cluster(c).pop("typed_extension_protocol_options"),
        "SDS cluster 'spire_agent' does not speak HTTP/2",
    ),
]


@pytest.mark.parametrize(("name", "sds", "breaks", "expected"), BROKEN, ids=[b[0] for b in BROKEN])
def test_sds_that_cannot_work_is_found(
    name: str, sds: FileSds | SpireSds, breaks: Callable[[dict[str, Any]], Any], expected: str
) -> None:
    config = copy.deepcopy(generated(sds))
    breaks(config)
    found = [str(f) for f in check(TABLE, config)]
    assert any(expected in f for f in found), found
    assert all("Fix:" in f for f in found)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--sds", "file:/tls"], "add --mtls"),
        (["--tls-dir", "/tls"], "add --mtls"),
        (["--mtls", "--sds", "file:/tls", "--tls-dir", "/tls"], "exclude each other"),
    ],
)
def test_sds_flags_that_do_not_go_together_are_refused(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from sidecar.cli import main

    assert main(["envoy-config", "--rules", str(REPO / "examples" / "rules.yaml"), *flags]) == 1
    assert message in capsys.readouterr().err
