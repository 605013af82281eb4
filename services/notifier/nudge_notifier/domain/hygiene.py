"""List hygiene: email syntax (email-validator), disposable and role addresses, typo
suggestions for common domains, phone numbers to E.164 (phonenumbers), and the sunset
rule. Pure: no DNS lookups (deliverability is the bounces' job)."""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass
from datetime import datetime, timedelta

import phonenumbers
from email_validator import EmailNotValidError, validate_email
from email_validator.rfc_constants import (
    CASE_INSENSITIVE_MAILBOX_NAMES,
    DOT_ATOM_TEXT,
    EMAIL_MAX_LENGTH,
    LOCAL_PART_MAX_LENGTH,
)

COMMON_DOMAINS = (
    "gmail.com",
    "yahoo.com",
    "hotmail.com",
    "outlook.com",
    "icloud.com",
    "aol.com",
    "live.com",
    "msn.com",
    "gmx.com",
    "gmx.de",
    "web.de",
    "yahoo.fr",
    "orange.fr",
    "hotmail.co.uk",
    "yahoo.co.uk",
    "protonmail.com",
    "proton.me",
    "me.com",
    "mail.com",
    "comcast.net",
)
DISPOSABLE_DOMAINS = frozenset(
    {
        "mailinator.com",
        "guerrillamail.com",
        "10minutemail.com",
        "tempmail.com",
        "temp-mail.org",
        "yopmail.com",
        "trashmail.com",
        "sharklasers.com",
        "getnada.com",
        "dispostable.com",
        "maildrop.cc",
        "throwawaymail.com",
        "fakeinbox.com",
        "mailnesia.com",
        "mintemail.com",
        "spamgourmet.com",
    }
)
ROLE_LOCAL_PARTS = frozenset(
    {
        "abuse",
        "admin",
        "billing",
        "contact",
        "help",
        "hostmaster",
        "info",
        "marketing",
        "noreply",
        "no-reply",
        "office",
        "postmaster",
        "sales",
        "security",
        "support",
        "team",
        "webmaster",
    }
)


@dataclass(frozen=True)
class EmailCheck:
    address: str
    valid: bool
    normalized: str | None = None
    reason: str | None = None
    disposable: bool = False
    role: bool = False
    suggestion: str | None = None


def check_email(address: str) -> EmailCheck:
    """email-validator's verdict and normalised form. The common address, a plain ASCII
    dot-atom before the @-sign, takes a shortcut to the same result: its local part is
    what email-validator accepts as it stands, and the part after the @-sign, validated
    on its own by email-validator, is looked up in a cache (a list's addresses share few
    domains, and the domain's checks were most of a check's time).
    ``tests/services/notifier/test_domain.py`` holds both ways equal."""
    local, at, domain = address.rpartition("@")
    if (
        at
        and len(address) <= EMAIL_MAX_LENGTH
        and len(local) <= LOCAL_PART_MAX_LENGTH
        and address.isascii()
        and DOT_ATOM_TEXT.match(local)
        and local.lower() not in CASE_INSENSITIVE_MAILBOX_NAMES
        and (normalized_domain := _valid_domain(domain)) is not None
    ):
        return _checked(address, local, normalized_domain)
    return check_email_fully(address)


def check_email_fully(address: str) -> EmailCheck:
    """:func:`check_email` without the shortcut: email-validator on the whole address."""
    try:
        result = validate_email(address, check_deliverability=False)
    except EmailNotValidError as error:
        return EmailCheck(address, False, reason=str(error), suggestion=_suggest(address))
    return _checked(address, result.local_part, result.domain)


def _checked(address: str, local: str, domain: str) -> EmailCheck:
    lowered = domain.lower()
    return EmailCheck(
        address,
        True,
        normalized=f"{local}@{domain}",
        disposable=lowered in DISPOSABLE_DOMAINS,
        role=local.lower() in ROLE_LOCAL_PARTS,
        suggestion=_suggest(f"{local}@{lowered}"),
    )


@functools.lru_cache(maxsize=4096)
def _valid_domain(domain: str) -> str | None:
    """The part after the @-sign as email-validator normalises it, or None if it refuses
    it (the full check then says why)."""
    try:
        return validate_email(f"a@{domain}", check_deliverability=False).domain
    except EmailNotValidError:
        return None


def _suggest(address: str) -> str | None:
    """``ada@gmial.com`` -> ``ada@gmail.com``: a domain one or two keystrokes from a
    common one (and not itself common)."""
    local, _, domain = address.rpartition("@")
    if not local or not domain:
        return None
    match = _closest_common_domain(domain.lower())
    return f"{local}@{match}" if match else None


@functools.lru_cache(maxsize=4096)
def _closest_common_domain(domain: str) -> str | None:
    """Cached: a list's addresses share few domains, and the fuzzy match is slow."""
    if domain in COMMON_DOMAINS:
        return None
    match = difflib.get_close_matches(domain, COMMON_DOMAINS, n=1, cutoff=0.8)
    return match[0] if match else None


class InvalidPhone(ValueError):
    pass


def to_e164(number: str, default_region: str) -> str:
    try:
        parsed = phonenumbers.parse(number, default_region)
    except phonenumbers.NumberParseException as error:
        raise InvalidPhone(f"not a phone number: {error}") from error
    if not phonenumbers.is_valid_number(parsed):
        raise InvalidPhone(f"not a valid phone number: {number!r}")
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


@dataclass(frozen=True)
class Health:
    """What the notifier knows about one address's recent history."""

    soft_bounces_in_a_row: int
    sends_since_engaged: int
    last_engaged_at: datetime | None
    first_sent_at: datetime | None


def silence_due(health: Health, *, unengaged_days: int, min_sends: int) -> datetime | None:
    """When the silence rule selects the address if nothing changes: ``unengaged_days``
    after its last open or click (or its first send), once it has had ``min_sends``
    messages since; None while it has had fewer."""
    since = health.last_engaged_at or health.first_sent_at
    if since is None or health.sends_since_engaged < min_sends:
        return None
    return since + timedelta(days=unengaged_days)


def sunset_reason(
    health: Health, *, now: datetime, soft_bounces: int, unengaged_days: int, min_sends: int
) -> str | None:
    """Why the address should be sunset, or None: repeated soft bounces, or no open or
    click for ``unengaged_days`` despite at least ``min_sends`` messages."""
    if health.soft_bounces_in_a_row >= soft_bounces:
        return f"{health.soft_bounces_in_a_row} soft bounces in a row"
    due = silence_due(health, unengaged_days=unengaged_days, min_sends=min_sends)
    if due is not None and due <= now:
        return f"no engagement for {unengaged_days} days over {health.sends_since_engaged} sends"
    return None
