"""Large rules documents are parsed and validated in a child process, never in the serving
one; refusals cross back with every problem; a child that dies or hangs is a refusal, and
the next read starts a new one."""

import asyncio
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from sidecar.core import RulesError
from sidecar.ops.metrics import Metrics
from sidecar.sources.file import RulesFile
from sidecar.sources.state_file import StateFile
from sidecar.table.documents import DocumentReader
from sidecar.table.reload import Outcome, Reloader


def document(rules: int) -> bytes:
    lines = ["version: 1", "clusters: [stable, canary]", "default: stable", "rules:"]
    for i in range(rules):
        lines += [
            f"  - name: tenant-{i}",
            f'    match: {{headers: {{x-tenant: {{regex: "^t-{i}-[a-z]+$"}}}}}}',
            "    route: canary",
        ]
    return ("\n".join(lines) + "\n").encode()


@pytest.fixture
def reader() -> Iterator[DocumentReader]:
    reader = DocumentReader(offload_bytes=1)  # every document goes to the child
    yield reader
    reader.close()


def test_a_document_is_read_in_the_child_with_the_same_result(reader: DocumentReader) -> None:
    content = document(20)
    assert reader.read(content, "rules.yaml") == yaml.safe_load(content)
    child = reader._child
    assert child is not None and child.pid != os.getpid()
    assert reader.read(content, "rules.yaml")["rules"][19]["name"] == "tenant-19"
    assert reader._child is child  # kept for the next read


def test_a_refusal_crosses_back_with_every_problem(reader: DocumentReader) -> None:
    broken = document(2).replace(b"route: canary", b"route: nowhere")
    with pytest.raises(RulesError) as refused:
        reader.read(broken, "rules.yaml")
    assert refused.value.source == "rules.yaml" and len(refused.value.problems) == 2
    assert "unknown cluster 'nowhere'" in str(refused.value)


def test_a_child_that_dies_is_a_refusal_and_the_next_read_starts_another(reader: DocumentReader) -> None:
    reader.read(document(1), "rules.yaml")
    child = reader._child
    assert child is not None
    os.kill(child.pid, signal.SIGSTOP)
    threading.Timer(0.3, os.kill, (child.pid, signal.SIGKILL)).start()  # dies during the read
    with pytest.raises(RulesError, match="the process reading it failed"):
        reader.read(document(1), "rules.yaml")
    assert reader.read(document(3), "rules.yaml")["rules"][2]["name"] == "tenant-2"
    assert reader._child is not child
    os.kill(reader._child.pid, signal.SIGKILL)  # one that died between reads is replaced
    reader._child.wait()
    assert reader.read(document(4), "rules.yaml")["rules"][3]["name"] == "tenant-3"


def test_a_read_that_hangs_is_refused_after_the_timeout(reader: DocumentReader) -> None:
    reader.read(document(1), "rules.yaml")
    assert reader._child is not None
    os.kill(reader._child.pid, signal.SIGSTOP)  # a child that never answers
    reader.timeout = 0.5
    with pytest.raises(RulesError, match="not read in time"):
        reader.read(document(1), "rules.yaml")
    reader.timeout = 60
    assert reader.read(document(2), "rules.yaml")["rules"][1]["name"] == "tenant-1"


def test_the_serving_process_does_not_parse_a_large_document(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parsing builds millions of short-lived objects for a large document: the collector's
    full passes over them stalled serving for 0.3-0.6 s. Over the offload size, YAML is never
    parsed in the serving process (here: parsing in it fails)."""
    rules = tmp_path / "rules.yaml"
    rules.write_bytes(document(2))
    reloader = Reloader(
        RulesFile(rules),
        Metrics(CollectorRegistry()),
        StateFile(tmp_path / "s.json"),
        DocumentReader(offload_bytes=4096),
    )
    try:
        parsed_here: list[str] = []
        real = yaml.safe_load
        monkeypatch.setattr(
            yaml,
            "safe_load",
            lambda text: parsed_here.append(threading.current_thread().name) or real(text),
        )
        rules.write_bytes(document(200))  # ~14 KiB: over the offload size
        assert asyncio.run(reloader.reload("watch")).outcome is Outcome.LOADED
        assert len(reloader.table.rules) == 200 and parsed_here == []
        rules.write_bytes(document(3))  # small: read in a thread of this process
        assert asyncio.run(reloader.reload("watch")).outcome is Outcome.LOADED
        assert len(parsed_here) == 1
    finally:
        reloader.close()
