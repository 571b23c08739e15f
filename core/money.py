"""Money: integer fen, one rounding rule, exact splits.

Everything stored is an integer number of fen (分). Per-call and per-record
prices carry up to 4 decimal places of a fen, so the call record holds each
call's charge in 1/10000 fen (``charge_e4``, an integer) and an invoice line
sums those exactly. The rule, applied once per invoice line (and once to an
invoice's VAT): **round half up** -- half a fen or more goes up, less goes
down; a negative amount (a credit) mirrors it, so -0.5 fen is -1 fen
(:data:`decimal.ROUND_HALF_UP`). No float ever holds money: amounts are
``int`` and rates ``Decimal``.

A line's amount is split between the data provider, the operating company and
the public-service fund by the dataset's revenue split (basis points summing
to 10,000) by the largest-remainder method: each part takes the whole fen of
its exact share, and the fen left over go one each to the parts with the
largest fractional remainders (ties in the order provider, operator, fund), so
the parts always sum exactly to the line.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Final

#: Units of 1/10000 fen in a fen.
E4: Final = 10_000
#: The basis points of a whole revenue split.
WHOLE: Final = 10_000
DEFAULT_VAT_RATE: Final = Decimal("0.06")


def fen_to_e4(fen: str) -> int:
    """A decimal string of fen (at most 4 places) as 1/10000 fen, exactly:
    ``"12.3456"`` -> 123456."""
    return int(Decimal(fen) * E4)


def e4_to_fen(amount_e4: int) -> str:
    """1/10000 fen as a decimal string of fen, normalised: 25000 -> ``"2.5"``
    (how prices are shown)."""
    text = format(Decimal(amount_e4) / E4, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def e4_text(amount_e4: int) -> str:
    """1/10000 fen as a decimal string of fen with all 4 places:
    123456 -> ``"12.3456"`` (how charges are shown)."""
    sign, amount = ("-", -amount_e4) if amount_e4 < 0 else ("", amount_e4)
    return f"{sign}{amount // E4}.{amount % E4:04d}"


def fen_of_e4(amount_e4: int) -> int:
    """``amount_e4`` (1/10000 fen) rounded half up to whole fen."""
    if amount_e4.__class__ is not int:
        raise TypeError(f"an amount in 1/10000 fen must be an int, got {amount_e4!r}")
    return int((Decimal(amount_e4) / E4).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def vat_of(subtotal_fen: int, rate: Decimal) -> int:
    """The VAT on ``subtotal_fen`` at ``rate`` (0.06 for 6 %), rounded half up."""
    if subtotal_fen.__class__ is not int:
        raise TypeError(f"a subtotal in fen must be an int, got {subtotal_fen!r}")
    if not isinstance(rate, Decimal):
        raise TypeError(f"a VAT rate must be a Decimal, got {rate!r}")
    return int((subtotal_fen * rate).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def parse_vat_rate(value: str | Decimal) -> Decimal:
    """A VAT rate from its decimal spelling: 0 <= rate < 1, at most 4 decimal
    places (``"0.06"``). ValueError otherwise."""
    try:
        rate = Decimal(value)
    except (InvalidOperation, TypeError, ValueError):
        raise ValueError(f"a VAT rate is a decimal such as 0.06, got {value!r}") from None
    if not rate.is_finite() or not Decimal(0) <= rate < 1:
        raise ValueError(f"a VAT rate is at least 0 and below 1, got {value!r}")
    if rate != rate.quantize(Decimal("0.0001")):
        raise ValueError(f"a VAT rate has at most 4 decimal places, got {value!r}")
    return rate.quantize(Decimal("0.0001")).normalize() if rate else Decimal(0)


def split(amount_fen: int, basis_points: tuple[int, int, int]) -> tuple[int, int, int]:
    """``amount_fen`` split by ``basis_points`` (summing to 10,000) by the
    largest remainder, so the three parts sum exactly to it. A negative amount
    is split as its opposite, negated."""
    if len(basis_points) != 3 or sum(basis_points) != WHOLE or min(basis_points) < 0:
        raise ValueError(f"a revenue split is three basis points summing to {WHOLE}, got {basis_points!r}")
    a, b, c = allocate(amount_fen, basis_points)
    return a, b, c


def allocate(amount_fen: int, weights: Sequence[int]) -> tuple[int, ...]:
    """``amount_fen`` in parts proportional to ``weights`` (non-negative
    integers, not all zero) by the largest remainder: each part takes the
    whole fen of its exact share, the fen left go one each to the largest
    fractional remainders (ties to the earlier part). The parts sum exactly to
    the amount; a negative amount is allocated as its opposite, negated."""
    if amount_fen.__class__ is not int:
        raise TypeError(f"an amount in fen must be an int, got {amount_fen!r}")
    if any(w.__class__ is not int or w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights are non-negative integers, not all zero, got {weights!r}")
    if amount_fen < 0:
        return tuple(-part for part in allocate(-amount_fen, weights))
    whole_weight = sum(weights)
    whole = [amount_fen * w // whole_weight for w in weights]
    remainders = [amount_fen * w % whole_weight for w in weights]
    left = amount_fen - sum(whole)
    # Largest remainder first; on a tie the earlier part (provider, operator, fund).
    for i in sorted(range(len(weights)), key=lambda i: (-remainders[i], i))[:left]:
        whole[i] += 1
    return tuple(whole)
