"""Bebop's engine patch sets (the repository's patches/ folder), shipped as bebop_spec._patches."""
