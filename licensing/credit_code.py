"""Unified social credit codes (统一社会信用代码), GB 32100-2015.

A code is 18 characters from a 31-character alphabet (digits and upper-case
letters without I, O, Z, S, V). The 18th character is a check character over
the first 17, computed with the weights 3^i mod 31.
"""

from __future__ import annotations

ALPHABET = "0123456789ABCDEFGHJKLMNPQRTUWXY"
WEIGHTS = (1, 3, 9, 27, 19, 26, 16, 17, 20, 29, 25, 13, 8, 24, 10, 30, 28)
_VALUE = {ch: i for i, ch in enumerate(ALPHABET)}


class CreditCodeError(ValueError):
    """The string is not a valid unified social credit code."""


def check_character(first17: str) -> str:
    """The GB 32100-2015 check character for the first 17 characters."""
    if len(first17) != 17:
        raise CreditCodeError("the first part of a credit code has 17 characters")
    try:
        total = sum(_VALUE[ch] * w for ch, w in zip(first17, WEIGHTS, strict=True))
    except KeyError as exc:
        raise CreditCodeError(f"character {exc.args[0]!r} is not allowed in a credit code") from exc
    return ALPHABET[(31 - total % 31) % 31]


def with_check_character(first17: str) -> str:
    """Append the check character: a complete 18-character code."""
    return first17 + check_character(first17)


def validate_credit_code(code: str) -> str:
    """Return ``code`` normalised to upper case, or raise :class:`CreditCodeError`."""
    code = code.strip()
    if not code.isascii():  # before upper(): "ﬀ".upper() is "FF"
        odd = "".join(sorted({ch for ch in code if not ch.isascii()}))
        raise CreditCodeError(f"characters not allowed in a credit code: {odd}")
    code = code.upper()
    if len(code) != 18:
        raise CreditCodeError("a unified social credit code has 18 characters")
    bad = sorted({ch for ch in code if ch not in _VALUE})
    if bad:
        raise CreditCodeError(f"characters not allowed in a credit code: {''.join(bad)}")
    expected = check_character(code[:17])
    if code[17] != expected:
        raise CreditCodeError("the check character does not match (GB 32100-2015)")
    return code
