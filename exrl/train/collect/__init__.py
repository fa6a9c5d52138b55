"""Experience collectors: one family over a shared core (core.py)."""
