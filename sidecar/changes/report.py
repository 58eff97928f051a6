"""Reading the two tables of a change and telling what moves (`graysteer diff`, and `push`
before it writes)."""

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sidecar.core import Request, Table
from sidecar.core.diff import DiffReport
from sidecar.table.load import MAX_FILE_BYTES, parse_rules, read_regular_file

if TYPE_CHECKING:
    from sidecar.sources.etcd_client import EtcdTls

TIMEOUT_SECONDS = 15.0


def load_table(where: str, tls: "EtcdTls | None" = None) -> Table | None:
    """The table of a rules file, or of a fleet's etcd://HOST:PORT,.../PREFIX (None: no rules
    pushed there yet). RulesError, OSError or ValueError say what is wrong."""
    if not where.startswith("etcd://"):
        return parse_rules(read_regular_file(Path(where), MAX_FILE_BYTES), where)
    from sidecar.sources.etcd_client import ETCD_ERRORS, EtcdAddress, EtcdClient

    address = EtcdAddress.parse(where)

    async def read() -> bytes | None:
        async with EtcdClient(address, tls) as client:
            found = await client.get(address.rules_key)
            return None if found is None else bytes(found.value)

    try:
        content = asyncio.run(asyncio.wait_for(read(), TIMEOUT_SECONDS))
    except ETCD_ERRORS as error:
        raise OSError(f"{address}: etcd unreachable or refused: {error or type(error).__name__}") from error
    return None if content is None else parse_rules(content, f"{address}/rules")


def example(request: Request) -> str:
    headers = " ".join(f"{k}={v}" for k, v in sorted(request.headers.items()) if not k.startswith(":"))
    who = f" identity={request.identity.principal}" if request.identity.principal else ""
    query = "?" + request.query if request.query else ""
    return f"{request.method} {request.path}{query} {headers}{who}".strip()


def as_json(report: DiffReport) -> dict[str, Any]:
    def moves(found: dict[Any, Any]) -> list[dict[str, Any]]:
        return [
            {
                "from": {"rule": move.old_rule, "cluster": move.old_cluster},
                "to": {"rule": move.new_rule, "cluster": move.new_cluster},
                "requests": count.requests,
                "share": round(count.requests / report.requests, 6) if report.requests else 0.0,
                "split_keys": len(count.keys),
                "examples": [example(r) for r in count.examples],
            }
            for move, count in sorted(found.items(), key=lambda item: -item[1].requests)
        ]

    return {
        "requests": report.requests,
        "random_draws_left_out": report.random,
        "moved_requests": report.moved_requests,
        "moved_share": round(report.moved_share, 6),
        "split_keys": len(report.keys),
        "moved_split_keys": len(report.moved_keys),
        "moved_key_share": round(report.moved_key_share, 6),
        "moves": moves(report.moved),
        "backwards": moves(report.backwards),
    }


def as_text(report: DiffReport) -> str:
    data = as_json(report)
    lines = [
        f"{data['moved_requests']} of {data['requests']} requests change cluster "
        f"({data['moved_share']:.2%}); {data['moved_split_keys']} of {data['split_keys']} split keys "
        f"({data['moved_key_share']:.2%})"
        + (
            f"; {data['random_draws_left_out']} random split draws left out"
            if data["random_draws_left_out"]
            else ""
        )
    ]
    for title, moves in (("moved", data["moves"]), ("BACKWARDS on a ramp", data["backwards"])):
        for move in moves:
            lines.append(
                f"  {title}: {move['from']['rule']} -> {move['to']['rule']}, {move['from']['cluster']} -> "
                f"{move['to']['cluster']}: {move['requests']} requests ({move['share']:.2%}), "
                f"{move['split_keys']} split keys"
            )
            lines += [f"      e.g. {e}" for e in move["examples"]]
    if data["backwards"]:
        lines.append(
            "requests leave a split's cluster whose weight did not go down (a new seed, reordered "
            "entries or rules): users would flip between versions"
        )
    return "\n".join(lines)
