"""Serving: the batching engine, request store, studio front end and arena ranking."""
