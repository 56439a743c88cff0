"""Shared training/evaluation engine (the original's utils.py, split by concept)."""
