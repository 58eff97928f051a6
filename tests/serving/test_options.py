"""Every serve option is defined once: its flag, default, help and reader come from the one
list, the checks across options name the flags, and a worker receives the object itself."""

import argparse
import dataclasses
import pickle

import pytest

from sidecar.serving.options import ServeOptions, add_arguments, flags, from_arguments


def parse(*argv: str) -> ServeOptions:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return from_arguments(parser.parse_args(list(argv)), log_level="DEBUG")


def test_every_flag_sets_its_own_field_and_defaults_match_the_options() -> None:
    defaults = parse("--config", "rules.yaml")
    assert defaults == ServeOptions(config="rules.yaml", log_level="DEBUG")
    fields = {f.name for f in dataclasses.fields(ServeOptions)}
    listed = [name for name, _, _ in flags()]
    assert len(listed) == len(set(listed)) and set(listed) <= fields
    assert fields - set(listed) == {"log_level", "worker_index", "group_listeners"}  # set by the program
    assert len({flag.name for _, flag, _ in flags()}) == len(listed)  # one flag per option


def test_values_are_read_strictly_by_their_flag() -> None:
    options = parse(
        "--config",
        "r.yaml",
        "--listen",
        "off",
        "--authz-http-listen",
        "127.0.0.1:9000",
        "--drain",
        "0.5",
        "--workers",
        "3",
        "--admin-allow",
        "spiffe://example.org/ns/ops/a",
        "--admin-allow",
        "*.ops.example.org",
        "--no-watch",
    )
    assert options.listen is None and options.authz_http_listen == "127.0.0.1:9000"
    assert (options.drain_seconds, options.workers, options.watch) == (0.5, 3, False)
    assert options.admin_allow == ("spiffe://example.org/ns/ops/a", "*.ops.example.org")
    for bad in (["--workers", "0"], ["--workers", "٣"], ["--drain", "nan"], ["--listen", "nowhere"]):
        with pytest.raises(SystemExit):
            parse("--config", "r.yaml", *bad)


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"listen": None}, "--listen off leaves nothing to serve"),
        ({"authz_http_shared_port": True}, "--authz-http-shared-port needs --authz-http-listen"),
        ({"etcd_cache": "/tmp/c"}, "--etcd-cache need(s) --config etcd://"),
        ({"config": "etcd://127.0.0.1:2379/x", "state_file": "s.json"}, "--state-file does not apply"),
        ({"config": "etcd://127.0.0.1/x"}, "member '127.0.0.1': no port"),
        ({"ready_max_bypass_ratio": 0.1}, "--ready-max-bypass-ratio needs --envoy-admin"),
        ({"admin_listen": "0.0.0.0:50052"}, "is not loopback or a unix socket"),
        ({"xds_listen": "0.0.0.0:18000"}, "--xds-listen 0.0.0.0:18000 is not loopback"),
        ({"admin_tls_cert": "c.pem"}, "go together"),
        # the live page never acts for an unauthenticated caller, on loopback or anywhere else
        ({"http_actions": True, "http_listen": "127.0.0.1:9464"}, "--http-actions needs --http-listen and"),
        ({"http_actions": True, "http_listen": "0.0.0.0:9464"}, "never acts for an unauthenticated caller"),
        ({"http_actions": True}, "--http-actions needs --http-listen"),
        ({"http_actions": True, "workers": 2}, "with --workers the operator endpoint serves the group's"),
        ({"ofrep_token_file": "t"}, "--ofrep-token-file needs --http-listen"),
        ({"ofrep_token_file": "t", "http_listen": "127.0.0.1:9464", "workers": 2}, "not OFREP"),
        (
            {"ofrep_token_file": "/nonexistent/t", "http_listen": "127.0.0.1:9464"},
            "--ofrep-token-file /nonexistent",
        ),
    ],
)
def test_checks_across_options_name_the_flags(changes: dict, problem: str) -> None:
    options = dataclasses.replace(ServeOptions(config="rules.yaml"), **changes)
    assert any(problem in found for found in options.problems()), options.problems()


def test_a_worker_receives_the_options_object_itself() -> None:
    options = parse("--config", "etcd://127.0.0.1:2379/x", "--etcd-ca", "ca.pem", "--workers", "2")
    worker = dataclasses.replace(options, worker_index=1, workers=1)
    assert pickle.loads(pickle.dumps(worker)) == worker
    assert worker.etcd_tls is not None and str(worker.etcd_tls.ca) == "ca.pem"
    assert not worker.primary and options.primary
