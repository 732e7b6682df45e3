"""Peer servers for ``benchmarks/serve.py``: the HTTP floor and the Azure sample pattern."""
