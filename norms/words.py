"""``Word``: a closed set of words for a setting (a ``StrEnum`` whose members show as their
word, so a message that prints a value with ``!r`` reads ``'sgd'``, not
``<Optimizer.sgd: 'sgd'>``).  OmegaConf validates such fields against the members."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["Word"]


class Word(StrEnum):
    def __repr__(self) -> str:
        return repr(self.value)
