"""Integrations of the Python API (node/api.py) with other training libraries."""
