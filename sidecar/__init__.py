"""Graysteer: a gray-release (canary) traffic-steering sidecar for Envoy."""
