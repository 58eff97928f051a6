"""Runtime weight overrides of split rules, and how they meet edits of the rules file.

An override records the weights an operator set at runtime and the weights the rules
file had for that rule at that moment (`base`). When a rules file is loaded:

* the rule is gone, or is no longer a split      -> the override is dropped;
* the file's weights for the rule differ from `base`
  (someone edited that rule's weights)           -> the file wins, the override is dropped;
* the split's clusters changed                   -> the file wins, the override is dropped;
* the override's weights total 0 (hand-edited)     -> the override is dropped;
* otherwise                                      -> the override applies.

So an edit of an unrelated part of the file keeps the runtime weights, and an edit of
the rule's own weights is taken as the operator's newer intent.
"""

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class WeightOverride:
    rule: str
    weights: dict[str, int]  # cluster -> weight, every entry of the split
    base: dict[str, int]  # the file's weights when the override was set

    def to_json(self) -> dict[str, Any]:
        return {"weights": self.weights, "base": self.base}

    @classmethod
    def from_json(cls, rule: str, data: Mapping[str, Any]) -> "WeightOverride":
        weights, base = data["weights"], data["base"]
        if not all(isinstance(v, int) and v >= 0 for v in [*weights.values(), *base.values()]):
            raise ValueError(f"override for {rule!r}: weights must be integers >= 0")
        return cls(
            rule, {str(k): int(v) for k, v in weights.items()}, {str(k): int(v) for k, v in base.items()}
        )


def split_weights(document: Mapping[str, Any], rule: str) -> dict[str, int] | None:
    """The file's weights of a split rule, or None when there is no such split."""
    for entry in document.get("rules") or []:
        if entry.get("name") == rule:
            split = entry.get("split")
            return {t["cluster"]: t["weight"] for t in split["to"]} if split else None
    return None


def resolve_weights(current: Mapping[str, int], requested: Mapping[str, int]) -> dict[str, int]:
    """The full weights after a request to change some of them; ValueError if impossible.

    Entries not named keep their weights, except when exactly one entry is not named:
    it takes what is left of the current total (`canary=20` on a 90/10 split -> 80/20).
    """
    unknown = sorted(set(requested) - set(current))
    if unknown:
        raise ValueError(
            f"unknown cluster(s) {', '.join(unknown)} for this split (split clusters: {', '.join(current)})"
        )
    if not requested:
        raise ValueError("no weights given")
    if any(w < 0 for w in requested.values()):
        raise ValueError("weights must be integers >= 0")
    result = {cluster: requested.get(cluster, weight) for cluster, weight in current.items()}
    unnamed = [c for c in current if c not in requested]
    if len(unnamed) == 1:
        remainder = sum(current.values()) - sum(requested.values())
        if remainder < 0:
            raise ValueError(
                f"weights {dict(requested)} exceed the split's total "
                f"{sum(current.values())}; name every cluster to change the total"
            )
        result[unnamed[0]] = remainder
    if sum(result.values()) <= 0:
        raise ValueError("total weight must be greater than 0")
    return result


def reconcile(
    document: Mapping[str, Any], overrides: Mapping[str, WeightOverride]
) -> tuple[dict[str, Any], dict[str, WeightOverride], dict[str, str]]:
    """Apply the overrides that still hold to a copy of the document.

    Returns (document with override weights, overrides kept, {rule: why dropped}).
    """
    result = copy.deepcopy(dict(document))
    kept: dict[str, WeightOverride] = {}
    dropped: dict[str, str] = {}
    for name, override in overrides.items():
        file_weights = split_weights(result, name)
        if file_weights is None:
            dropped[name] = "the rule is no longer a split in the rules file"
        elif set(file_weights) != set(override.weights):
            dropped[name] = "the split's clusters changed in the rules file"
        elif sum(override.weights.values()) <= 0:
            dropped[name] = "its weights total 0"
        elif file_weights != override.base:
            dropped[name] = (
                f"the rules file changed this rule's weights "
                f"({override.base} -> {file_weights}); the file wins"
            )
        else:
            kept[name] = override
    for entry in result.get("rules") or []:
        if entry.get("name") in kept:
            weights = kept[entry["name"]].weights
            entry["split"]["to"] = [{**t, "weight": weights[t["cluster"]]} for t in entry["split"]["to"]]
    return result, kept, dropped
