"""`graysteer push` against a real etcd: it diffs the change against the fleet's current
rules and writes only when at most --max-moved of the requests change cluster and none moves
backwards on a ramp, unless --yes; `push --next` writes the shadow table without asking."""

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.changes.report import load_table
from sidecar.dev.etcd import Etcd

RULES = textwrap.dedent("""\
    version: 1
    clusters: [stable, canary]
    default: stable
    rules:
      - name: ramp
        split:
          key: [header:x-user-id]
          seed: SEED
          to: [{cluster: stable, weight: STABLE}, {cluster: canary, weight: CANARY}]
    """)


def rules(tmp_path: Path, canary: int, seed: str = "one") -> Path:
    path = tmp_path / f"rules-{canary}-{seed}.yaml"
    text = RULES.replace("SEED", seed).replace("STABLE", str(100 - canary)).replace("CANARY", str(canary))
    path.write_text(text)
    return path


def push(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "push", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture()
def url(tmp_path: Path) -> Iterator[str]:
    etcd = Etcd(tmp_path)
    try:
        yield f"{etcd.url}/shop/checkout"
    finally:
        etcd.stop()


def served(url: str) -> str:
    table = load_table(url)
    assert table is not None
    return table.version


def test_push_asks_before_moving_more_than_its_threshold_or_anyone_backwards(
    tmp_path: Path, url: str
) -> None:
    first = rules(tmp_path, 10)
    assert push(str(first), url).returncode == 0  # nothing served yet: nothing to move
    version = served(url)

    ramp = rules(tmp_path, 25)  # 15% of the users move to the canary
    refused = push(str(ramp), url)
    assert refused.returncode == 1 and served(url) == version
    assert "not pushed: 1" in refused.stderr and "more than --max-moved 0.05" in refused.stderr
    assert "ramp -> ramp, stable -> canary" in refused.stderr  # the report says what would move
    accepted = push(str(ramp), url, "--max-moved", "0.2")
    assert accepted.returncode == 0, accepted.stderr
    assert "of requests change cluster (at most 20%)" in accepted.stdout and served(url) != version

    reseeded = rules(tmp_path, 25, seed="two")  # users flip both ways: backwards at any threshold
    refused = push(str(reseeded), url, "--max-moved", "1")
    assert refused.returncode == 1 and "some backwards on a ramp" in refused.stderr
    assert push(str(reseeded), url, "--yes").returncode == 0
    assert served(url) == load_version(reseeded)


def test_push_next_writes_the_shadow_table_without_asking(tmp_path: Path, url: str) -> None:
    live = rules(tmp_path, 10)
    assert push(str(live), url).returncode == 0
    pushed = push("--next", str(rules(tmp_path, 90, seed="other")), url)  # moves most users, both ways
    assert pushed.returncode == 0, pushed.stderr
    assert f"to {url}/rules.next" in pushed.stdout
    # what it will cost each replica, said before it is written
    cost = pushed.stdout.index("as a shadow table: 1 rules, about ")
    assert (
        "ms per decision" in pushed.stdout
        and "of requests within the default --shadow-budget" in pushed.stdout
    )
    assert cost < pushed.stdout.index(f"to {url}/rules.next")
    assert served(url) == load_version(live)  # the rules served are untouched


def load_version(path: Path) -> str:
    table = load_table(str(path))
    assert table is not None
    return table.version
