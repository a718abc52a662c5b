"""Heads Bebop trained and ships (one directory each, loadable as `LLM(model, mtp=dir)`)."""
