"""How the served table changes and is watched: loading and reloading the rules, their sources,
the state file, the decider that holds the current table, the rollout controller, Envoy's
statistics, metrics and the operator HTTP endpoint."""
