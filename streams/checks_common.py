"""Check shorthands shared by the subsystem modules, so each module reads as a table of rules."""

from __future__ import annotations

from collections.abc import Callable

from .validation import AmountMatches, CheckBase, EventTime, Limits, NonNegative, NotBlank, Positive


def amount_matches(amount: str, qty: str, price: str) -> CheckBase:
    """``amount`` ≈ ``qty × price`` to within a fen (per-line rounding)."""
    return AmountMatches(amount, qty, price)


def non_negative(*fields: str) -> CheckBase:
    """Amounts (and other values) that may be zero but never below it."""
    return NonNegative(tuple(fields))


def quantity(*fields: str) -> CheckBase:
    return Positive(tuple(fields))


def when(field: str, limits: Callable[[], Limits]) -> CheckBase:
    return EventTime(field, limits)


def not_blank(field: str) -> CheckBase:
    return NotBlank(field)
