"""Thin FastAPI routes: parse, call a serving class, return its answer."""
