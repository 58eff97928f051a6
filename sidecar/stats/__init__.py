"""Envoy's own statistics, read from its admin endpoint: each cluster's responses (for the
rollout analysis) and the requests Envoy sent on without a decision (bypass)."""
