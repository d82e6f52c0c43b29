"""Check sets shared by several subsystems (kept here so each module reads as a table of rules)."""

from __future__ import annotations

from collections.abc import Callable

from .validation import Check, EventTime, Limits, NonNegative, Positive, Predicate

UNSCALE_QTY_PRICE_TO_FEN = 10**8  # cnt has scale 4, pric scale 6 → product has scale 10; fen is 2


def amount_matches(amount: str, qty: str, price: str) -> Check:
    """``amount`` ≈ ``qty × price`` to within a fen (per-line rounding)."""

    def ok(d: dict[str, object]) -> bool:
        q, p, a = d[qty], d[price], d[amount]
        assert isinstance(q, int) and isinstance(p, int) and isinstance(a, int)
        expected = (q * p + UNSCALE_QTY_PRICE_TO_FEN // 2) // UNSCALE_QTY_PRICE_TO_FEN
        return abs(expected - a) <= 1

    return Predicate(
        "AMOUNTS_DO_NOT_ADD_UP", amount, f"{amount} differs from {qty} × {price} by more than 0.01", ok
    )


def money(*fields: str) -> Check:
    return NonNegative(tuple(fields))


def quantity(*fields: str) -> Check:
    return Positive(tuple(fields))


def when(field: str, limits: Callable[[], Limits]) -> Check:
    return EventTime(field, limits)


def not_blank(field: str) -> Check:
    return Predicate("MISSING_FIELD", field, f"{field} is empty", lambda d: bool(d.get(field)))
