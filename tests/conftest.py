"""A real etcd for the tests that need one (sources, fleet) (Debian's etcd-server, installed with
apt-get when missing): one server per module, a prefix per test."""

from collections.abc import Iterator

import pytest

from sidecar.dev.etcd import Etcd


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Etcd]:
    server = Etcd(tmp_path_factory.mktemp("etcd"))
    yield server
    server.stop()
