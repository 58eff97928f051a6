"""What operators scrape and probe: Prometheus metrics, health (gRPC and HTTP)."""
