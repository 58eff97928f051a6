"""What talks to Envoy: ext_proc and ext_authz over gRPC, ext_authz over HTTP, and `explain`,
which drives the ext_proc path with the message Envoy would send. Each reads Envoy's message
into a core `Request`, asks the `Decider`, and writes the core `Steering` back."""
