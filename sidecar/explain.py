"""`graysteer explain`: decide a described request through the serving code path.

The request is turned into the very ext_proc message Envoy would send and handed
to the same servicer method that answers Envoy, so explain cannot drift from serving.
"""

from collections.abc import Sequence
from urllib.parse import urlencode

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from prometheus_client import CollectorRegistry

from sidecar.deciding import Decider, TableHolder
from sidecar.extproc import ExtProcServicer
from sidecar.metrics import Metrics
from sidecar.rules_file import load_rules


def headers_message(method: str, path: str, headers: Sequence[tuple[str, str]],
                    cookies: Sequence[tuple[str, str]] = (),
                    params: Sequence[tuple[str, str]] = ()) -> ep.ProcessingRequest:
    """The ext_proc request_headers message Envoy would send for this request."""
    if params:
        path += ("&" if "?" in path else "?") + urlencode(list(params))
    pairs = [(":method", method.upper()), (":path", path), (":scheme", "http"),
             (":authority", "graysteer.local"), *headers]
    if cookies:
        pairs.append(("cookie", "; ".join(f"{k}={v}" for k, v in cookies)))
    header_map = base_pb2.HeaderMap(headers=[
        base_pb2.HeaderValue(key=k.lower(), raw_value=v.encode()) for k, v in pairs])
    return ep.ProcessingRequest(request_headers=ep.HttpHeaders(headers=header_map,
                                                               end_of_stream=True))


def explain_local(config: str, method: str, path: str, headers: Sequence[tuple[str, str]],
                  cookies: Sequence[tuple[str, str]] = (),
                  params: Sequence[tuple[str, str]] = ()) -> dict[str, object]:
    """The decision for a described request, against a rules file."""
    table = load_rules(config)
    servicer = ExtProcServicer(Decider(TableHolder(table), Metrics(CollectorRegistry())))
    response, decision = servicer.on_request_headers(
        headers_message(method, path, headers, cookies, params))
    set_headers = response.request_headers.response.header_mutation.set_headers
    return {
        **decision.as_dict(),
        "set_headers": {h.header.key: h.header.raw_value.decode() for h in set_headers},
        "source": table.source,
    }
