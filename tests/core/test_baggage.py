"""W3C baggage: one member set, the others preserved, the limits respected."""

from sidecar.core.baggage import MAX_BYTES, member_value, with_member, without_member


def test_baggage_member_set_preserving_others() -> None:
    header = "userId=alice, graysteer.lane=stable;ttl=3,serverNode=DF%2028"
    assert member_value(header, "graysteer.lane") == "stable"
    updated, added = with_member(header, "graysteer.lane", "canary")
    assert added
    assert updated == "userId=alice,serverNode=DF%2028,graysteer.lane=canary"
    assert without_member(updated, "graysteer.lane") == "userId=alice,serverNode=DF%2028"
    assert with_member("", "k", "v") == ("k=v", True)
    assert member_value("no-equals-sign,k=v", "k") == "v"  # malformed members are kept, not fatal


def test_baggage_limits_are_respected() -> None:
    full = ",".join(f"m{i}=v" for i in range(64))
    assert with_member(full, "graysteer.lane", "canary") == (full, False)
    big = "k=" + "x" * (MAX_BYTES - 10)
    updated, added = with_member(big, "graysteer.lane", "canary")
    assert (updated, added) == (big, False)
