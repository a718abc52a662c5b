"""The server's wire vocabularies the client sends: weight selectors and pause modes.

The client does not depend on the server package, so these mirror the server's own enums
(bebop_spec.engine.config.WeightSelector / PauseMode, SGLang's names); a test in
tests/clients keeps the two lists equal. StrEnums, so the members are the plain strings.
"""

from __future__ import annotations

from enum import Enum

try:
    from enum import StrEnum
except ImportError:  # Python 3.10: the same behaviour for str-valued members

    class StrEnum(str, Enum):  # type: ignore[no-redef]
        def __str__(self) -> str:
            return str.__str__(self)


class WeightSelector(StrEnum):
    """Which weights a push addresses."""

    TARGET = "target"  # the served model
    DRAFT = "draft"  # the MTP head
    ALL = "all"  # both


class PauseMode(StrEnum):
    """SGLang's /pause_generation modes: what the servers do with running requests."""

    IN_PLACE = "in_place"  # keep them; they resume where they were
    ABORT = "abort"  # end them (finish_reason abort)
    RETRACT = "retract"  # re-queue them; they are recomputed after resume


SELECTORS = tuple(m.value for m in WeightSelector)  # ("target", "draft", "all")
PAUSE_MODES = tuple(m.value for m in PauseMode)  # ("in_place", "abort", "retract")
