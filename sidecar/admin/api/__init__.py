"""The admin API (graysteer.admin.v1), generated at build time from protos/ (see setup.py)."""
