"""Envoy configuration from the rules: generation (`generate`), the backstop compiled into
Envoy's own filters (`backstop`), and the linter (`lint`). Not `envoy`: that name is the
Envoy API package of xds-protos."""
