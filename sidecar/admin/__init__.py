"""The admin gRPC API: the servicer a running sidecar serves, the client the CLI uses, and the
API generated from protos/ at build time (`api`)."""
