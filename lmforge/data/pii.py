"""PII scrubbing: emails, phone numbers, IP addresses and card numbers become typed placeholders.

Patterns are deliberately narrow, because a false positive corrupts ordinary text and code: phone numbers
need a separator pattern or a leading `+`, IPv6 candidates must parse (`ipaddress`) and have three groups
(so `x[1::2]` and `std::vector` survive), IPv4 octets must be ≤ 255 and not part of a longer dotted run
(version strings), and card numbers must pass the Luhn checksum (ISO/IEC 7812) with a card-issuer prefix.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter

PLACEHOLDERS = {
    "email": "<EMAIL>",
    "credit_card": "<CREDIT_CARD>",
    "ip_address": "<IP_ADDRESS>",
    "phone": "<PHONE>",
}

_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}"
                    r"[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w-])")
# 13-19 digits, optionally in groups separated by one space or dash; issuer prefixes 3 (Amex, Diners,
# JCB), 4 (Visa), 5 (Mastercard), 6 (Discover, UnionPay).
_CARD = re.compile(r"(?<![\w.-])[3-6]\d{3}(?:[ -]?\d{2,4}){2,4}(?:[ -]?\d{1,3})?(?![\w-]|\.\d)")
_IPV4 = re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
                   r"(?![\w]|\.\d)")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?"
                   r"(?![\w:])")
# International (+CC ..., 8-15 digits) or North-American / European grouped numbers: (555) 123-4567, 555-123-4567,
# 555.123.4567, +44 20 7946 0958. A bare digit run is never a phone number here: it is more often an id.
_PHONE = re.compile(
    r"(?<![\w+.-])(?:"
    r"\+[1-9]\d{0,2}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){2,4}"
    r"|\(\d{3}\)[ .-]?\d{3}[ .-]\d{4}"
    r"|\d{3}([.-])\d{3}\1\d{4}"
    r")(?![\w-]|\.\d)"
)


def luhn_ok(digits: str) -> bool:
    """The Luhn checksum (mod 10) that every payment card number satisfies."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card(m: re.Match) -> str | None:
    digits = re.sub(r"[ -]", "", m.group(0))
    return "credit_card" if 13 <= len(digits) <= 19 and luhn_ok(digits) else None


def _ipv6(m: re.Match) -> str | None:
    text = m.group(0)
    if sum(1 for g in text.split(":") if g) < 3:
        return None
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return None
    return "ip_address"


def _phone(m: re.Match) -> str | None:
    digits = sum(c.isdigit() for c in m.group(0))
    return "phone" if 8 <= digits <= 15 else None  # E.164 allows 15; shorter runs are usually not phones


_RULES = [
    (_EMAIL, lambda m: "email"),
    (_CARD, _card),
    (_IPV4, lambda m: "ip_address"),
    (_IPV6, _ipv6),
    (_PHONE, _phone),
]


def scrub_pii(text: str, counts: Counter | None = None) -> str:
    """`text` with PII replaced by typed placeholders (`<EMAIL>` ...); `counts[kind]` += replacements."""
    counts = Counter() if counts is None else counts
    for pattern, kind_of in _RULES:
        if (pattern is _EMAIL and "@" not in text) or (pattern is _IPV6 and "::" not in text and text.count(":") < 7):
            continue  # a regex pass costs ~0.1 s per MB; these checks cost almost nothing


        def repl(m: re.Match, kind_of=kind_of) -> str:
            kind = kind_of(m)
            if kind is None:
                return m.group(0)
            counts[kind] += 1
            return PLACEHOLDERS[kind]

        text = pattern.sub(repl, text)
    return text
