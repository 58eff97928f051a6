"""Serialized answers by Steering, for every transport, bounded in bytes.

A steering outcome repeats (a route rule's answer is constant, a split's depends on its
bucket), and building and serializing its answer costs several times the decision, so each
transport keeps them. The key holds client input (baggage), so the bound is in bytes, not
entries: an entry costs its answer and its key (about the same strings); an answer over
`max_entry` bytes (long client baggage) is built every time and never kept. Cleared when
full: no per-entry bookkeeping on the serving path.

The serving engine hands out the same Steering object for the same decision (see
sidecar.core.engine), so an answer is first looked up by that object's identity: hashing a
Steering (its Decision's twelve fields, its identity's seven) costs more than the rest of
the lookup. The entry holds the Steering itself, so its id cannot be reused while it is kept.
"""

from collections.abc import Callable

from sidecar.core import Steering

DEFAULT_MAX_BYTES = 1 << 20
DEFAULT_MAX_ENTRY = 2048
ENTRY_OVERHEAD = 256  # the dict slot, the Steering and Decision objects


class AnswerCache:
    def __init__(
        self,
        build: Callable[[Steering], bytes],
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_entry: int = DEFAULT_MAX_ENTRY,
    ) -> None:
        self.build = build
        self.max_bytes, self.max_entry = max_bytes, max_entry
        self.size = 0
        self._answers: dict[Steering, bytes] = {}
        self._by_identity: dict[int, tuple[Steering, bytes]] = {}  # id(steering) -> it, its answer

    def __len__(self) -> int:
        return len(self._answers)

    def get(self, steering: Steering) -> bytes:
        known = self._by_identity.get(id(steering))
        if known is not None and known[0] is steering:
            return known[1]
        answer = self._answers.get(steering)
        if answer is None:
            answer = self.build(steering)
            if len(answer) > self.max_entry:
                return answer
            cost = 2 * len(answer) + ENTRY_OVERHEAD
            if self.size + cost > self.max_bytes:
                self._answers.clear()
                self._by_identity.clear()
                self.size = 0
            self._answers[steering] = answer
            self.size += cost
        if len(self._by_identity) >= len(self._answers):  # a fresh Steering per request: not shared
            self._by_identity.clear()
        self._by_identity[id(steering)] = (steering, answer)
        return answer
