"""vLLM general plugin (entry point `vllm.general_plugins: bebop`), run in every vLLM process.

What it does needs no change to vLLM's sources (the patches do the rest):
- reports whether this vLLM carries Bebop's patches, and which version of them, once per
  process (`bebop patch vllm` installs them); with `BEBOP_REQUIRE_PATCHED=1` an unpatched
  or mismatched vLLM refuses to start instead of silently serving temperature-only drafts;
- warns when speculative decoding runs with greedy drafting (`draft_sample_method` stays
  vLLM's default "greedy", i.e. Bebop's TO mode) so RS users notice a missing
  `"draft_sample_method": "probabilistic"`; that check runs from `check_speculative_config`,
  which the vLLM backend calls, because plugins load before any config exists.

vLLM loads plugins several times per process tree; everything here is idempotent.
"""

from __future__ import annotations

import importlib.util
import logging
import os

log = logging.getLogger("bebop.vllm_plugin")
PINNED_VLLM = "0.33.0"
EXPECTED_PATCH_VERSION = "1"
_done = False


def patch_status() -> tuple[bool, str | None]:
    """(patched, patch version) of the vLLM this process imports, without importing vLLM."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return False, None
    root = list(spec.submodule_search_locations)[0]
    path = os.path.join(root, "v1", "spec_decode", "bebop.py")
    if not os.path.isfile(path):
        return False, None
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("BEBOP_PATCH_VERSION"):
                return True, line.split("=", 1)[1].strip().strip("\"'")
    return True, None


def register() -> None:
    """The entry point vLLM calls."""
    global _done
    if _done:
        return
    _done = True
    patched, version = patch_status()
    if patched and version == EXPECTED_PATCH_VERSION:
        log.info(
            "bebop: vLLM carries Bebop patches v%s (processed draft q, entropy metrics)", version
        )
        return
    why = (
        f"vLLM is not patched by Bebop; run `bebop patch vllm` (pinned vLLM {PINNED_VLLM})"
        if not patched
        else f"vLLM carries Bebop patches v{version}, this bebop-spec expects v{EXPECTED_PATCH_VERSION}"
    )
    if os.environ.get("BEBOP_REQUIRE_PATCHED", "") == "1":
        raise RuntimeError(f"bebop: {why} (BEBOP_REQUIRE_PATCHED=1)")
    log.warning("bebop: %s; drafts use temperature-only q and no entropy metrics", why)


def check_speculative_config(speculative_config: dict | None) -> list[str]:
    """Human-readable warnings about a speculative config Bebop would not recommend."""
    if not speculative_config:
        return []
    warnings = []
    if speculative_config.get("draft_sample_method", "greedy") != "probabilistic":
        warnings.append(
            'draft_sample_method is "greedy" (target-only verification); Bebop\'s rejection '
            'sampling needs "probabilistic"'
        )
    if speculative_config.get("rejection_sample_method", "standard") not in ("standard",):
        warnings.append(
            f"rejection_sample_method={speculative_config['rejection_sample_method']!r} is "
            "not exact; Bebop's guarantees hold for 'standard' only"
        )
    return warnings
