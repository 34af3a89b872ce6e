"""Currencies and rounding: Decimal only, ISO 4217 codes, the currency's minor units.

Rounding happens once, at the line, half-up (docs/architecture.md). Minor units come from the
CLDR data that babel ships (``JPY`` has 0, ``KWD`` 3, most have 2).
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal, localcontext
from functools import cache

from babel.numbers import get_currency_precision, list_currencies


@cache
def _known_currencies() -> frozenset[str]:
    return frozenset(list_currencies())


def check_currency(code: str) -> str:
    """Return ``code`` upper-cased if it is an ISO 4217 currency, else raise ValueError."""
    upper = code.strip().upper()
    if len(upper) != 3 or upper not in _known_currencies():
        raise ValueError(f"not an ISO 4217 currency code: {code!r}")
    return upper


@cache
def minor_units(currency: str) -> int:
    """Digits after the decimal point for ``currency`` (2 for USD, 0 for JPY)."""
    return int(get_currency_precision(check_currency(currency)))


@cache
def quantum(currency: str) -> Decimal:
    """The smallest amount of ``currency`` as a Decimal exponent (``Decimal('0.01')``)."""
    return Decimal(1).scaleb(-minor_units(currency))


def round_money(amount: Decimal, currency: str) -> Decimal:
    """Round ``amount`` half-up to ``currency``'s minor units (any magnitude: no context overflow)."""
    with localcontext() as ctx:
        ctx.prec = max(28, amount.adjusted() + minor_units(currency) + 2)
        return amount.quantize(quantum(currency), rounding=ROUND_HALF_UP)


def to_minor(amount: Decimal, currency: str) -> int:
    """``amount`` in integer minor units (cents), for vendors that use them."""
    return int(round_money(amount, currency).scaleb(minor_units(currency)))


def from_minor(value: int, currency: str) -> Decimal:
    """An integer of minor units back to a Decimal amount."""
    return Decimal(value).scaleb(-minor_units(currency))
