"""Serving classes: turn a validated request into engine calls and engine outputs into replies."""
