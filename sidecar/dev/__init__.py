"""The local stack (Envoy + sidecar + sample backends on loopback), the demo and the demo
backend: for the demo, the tests and the benchmarks; never imported by `serve`."""
