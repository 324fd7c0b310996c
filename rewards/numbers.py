"""Plain numbers in answers: the fast, exact path of the `math` reward.

`parse_number` accepts what people write for a single number and returns it as an exact
Fraction, or None when the text is anything else (then math-verify decides):
integers and decimals, thousands separators (`1,000`, `1{,}000`), scientific notation
(`1.8e1`), simple fractions (`36/2`, `\\frac{36}{2}`), a sign, a currency sign (`$18`,
`\\$18`), a percent sign (`18%`, `18\\%`), a trailing full stop and `\\text{...}` or
`$...$` wrappers.

Decisions (documented in rewards/README.md): `$` and `%` are units and are dropped, so
`$18` and `18%` both equal 18; `18%` is not rescaled to 0.18. Two numbers are equal when
they agree to 6 decimal places (math-verify's default rounding), compared exactly.
"""
from __future__ import annotations

import re
from fractions import Fraction

MAX_CHARS = 64
MAX_EXPONENT = 50
_DECIMAL = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:[eE][+-]?\d{1,3})?")
_SLASH = re.compile(r"([+-]?\d+)/(\d+)")
_FRAC = re.compile(r"([+-]?)\\[dt]?frac\{([+-]?\d+)\}\{(\d+)\}")
_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")


def _clean(text: str) -> str:
    t = text.strip()
    for _ in range(3):
        t = _TEXT.sub(r"\1", t).strip()
        if t.startswith("$") and t.endswith("$") and len(t) > 1 and "\\$" not in t[-2:]:
            t = t[1:-1].strip()
    t = t.replace("{,}", ",").replace("\\,", "").replace("\\!", "").replace(" ", "")
    t = t.rstrip(".")
    for suffix in ("\\%", "%"):
        if t.endswith(suffix):
            t = t[: -len(suffix)]
    sign = ""
    if t and t[0] in "+-":
        sign, t = t[0], t[1:]
    for prefix in ("\\$", "$"):
        if t.startswith(prefix):
            t = t[len(prefix):]
    return sign + t


def parse_number(text: str) -> Fraction | None:
    if len(text) > MAX_CHARS:
        return None
    t = _clean(text)
    if not t:
        return None
    m = _FRAC.fullmatch(t)
    if m:
        num, den = int(m.group(2)), int(m.group(3))
        if den == 0:
            return None
        value = Fraction(num, den)
        return -value if m.group(1) == "-" else value
    m = _SLASH.fullmatch(t)
    if m:
        den = int(m.group(2))
        return Fraction(int(m.group(1)), den) if den else None
    if not _DECIMAL.fullmatch(t) or not any(c.isdigit() for c in t):
        return None
    mantissa, _, exponent = t.lower().partition("e")
    if exponent and abs(int(exponent)) > MAX_EXPONENT:
        return None
    if mantissa.lstrip("+-").startswith("."):
        mantissa = mantissa.replace(".", "0.", 1)
    value = Fraction(mantissa.replace(",", ""))
    return value * Fraction(10) ** int(exponent) if exponent else value


def numbers_equal(a: Fraction, b: Fraction, places: int = 6) -> bool:
    return a == b or round(a, places) == round(b, places)
