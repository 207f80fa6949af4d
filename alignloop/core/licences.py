"""Licence review: what a model's declared licence lets this workspace do, and the acceptances admins record.

Every model load goes through `registry.locate`, which classifies the licence the model declares:
- permissive: a licence we know of no barrier to commercial use in (Apache-2.0, MIT, CC-BY, ...): loads.
- noncommercial: it forbids commercial use (CC-BY-NC, research-only, ...): refused unless the workspace sets
  `allow_noncommercial` (or the command passes `--allow-noncommercial`), as before.
- restricted: commercial use is allowed under use restrictions (Llama 2/3.x/4 community licences, Gemma terms,
  OpenRAIL / BigScience RAIL, and similar): refused with a one-line summary of the terms until an admin records
  an acceptance (`alignloop licences accept REF`).
- unknown: the model declares no licence (or only "other"): refused while the workspace says `commercial_use:
  true` (the default) until an admin accepts that model by name; a non-commercial workspace loads it.

Invariants:
- An acceptance is for (model reference, the licence it declares). If the model later declares another licence
  the old acceptance no longer applies: the admin accepted those terms, not whatever comes next.
- A model built from an accepted one (an adapter over it, a fine-tune registered with it as `base`) is covered:
  it carries the same licence, and asking again for every RLHF round's policy would teach admins to click through.
- The most restrictive match wins for a licence string naming several ("apache-2.0, llama3.1" is restricted).
Trade-offs:
- Classification matches the hub's licence ids and common licence names with patterns; a declared licence we do
  not recognise is treated as permissive (it was declared, and refusing every unfamiliar id would make the check
  noise). The summaries are reminders of what to read, not legal advice; each error points at the full terms.
Sources: the hub's licence ids (huggingface.co/docs/hub/repositories-licenses); Meta's Llama 2, 3, 3.1, 3.2,
3.3 and 4 community licences and acceptable use policies; Google's Gemma Terms of Use and Prohibited Use Policy;
the BigScience OpenRAIL-M / BLOOM RAIL licences (Attachment A use restrictions); the Tongyi Qianwen, DeepSeek,
TII Falcon and Stability AI Community licences.
"""

from __future__ import annotations

import logging
import re
import shlex
from dataclasses import dataclass

from sqlmodel import Session, select

from alignloop.core import AlignloopError
from alignloop.core.models import LicenceAcceptance, User

log = logging.getLogger(__name__)

PERMISSIVE, NONCOMMERCIAL, RESTRICTED, UNKNOWN = "permissive", "noncommercial", "restricted", "unknown"

# Licence identifiers (lower-case, as on the hub) that forbid commercial use, plus word patterns for free text.
NONCOMMERCIAL_LICENCES = {
    "cc-by-nc-2.0",
    "cc-by-nc-3.0",
    "cc-by-nc-4.0",
    "cc-by-nc-sa-2.0",
    "cc-by-nc-sa-3.0",
    "cc-by-nc-sa-4.0",
    "cc-by-nc-nd-3.0",
    "cc-by-nc-nd-4.0",
    "deepfloyd-if-license",
    "apple-ascl",
    "mnpl",
}
NONCOMMERCIAL_PATTERN = re.compile(r"(\bnc\b|non[- ]?commercial|research[- ]only|not for commercial)", re.I)

# What a model card says when it names no licence: "other" without a `license_name` names no terms either.
UNDECLARED = {"", "other", "unknown", "none", "noassertion"}

_META_AUP = "Meta's acceptable use policy applies"
_MAU_700M = "products above 700 million monthly active users need a separate licence from Meta"
_BUILT_WITH = "show 'Built with Llama' and start derived models' names with 'Llama'"
_PASS_ON = "and must be passed on to everyone you share the model or its derivatives with"

# (pattern on the lower-cased licence, its name, a one-line summary of the terms): first match wins, so the
# specific Llama versions come before the bare "llama".
RESTRICTED_LICENCES: list[tuple[re.Pattern, str, str]] = [
    (
        re.compile(r"llama[\s_-]*3\.2"),
        "Llama 3.2 Community License",
        f"{_META_AUP}; {_MAU_700M}; {_BUILT_WITH}; the multimodal (vision) models are not licensed to people "
        "or companies based in the EU",
    ),
    (
        re.compile(r"llama[\s_-]*3\.[13]"),
        "Llama 3.1/3.3 Community License",
        f"{_META_AUP}; {_MAU_700M}; {_BUILT_WITH}",
    ),
    (
        re.compile(r"llama[\s_-]*3"),
        "Meta Llama 3 Community License",
        f"{_META_AUP}; {_MAU_700M}; show 'Built with Meta Llama 3'; outputs may not be used to improve other "
        "large language models",
    ),
    (
        re.compile(r"llama[\s_-]*4"),
        "Llama 4 Community License",
        f"{_META_AUP}; {_MAU_700M}; {_BUILT_WITH}; not licensed to people or companies based in the EU",
    ),
    (
        re.compile(r"llama[\s_-]*2"),
        "Llama 2 Community License",
        f"{_META_AUP}; {_MAU_700M}; outputs may not be used to improve other large language models",
    ),
    (re.compile(r"llama"), "a Meta Llama community licence", f"{_META_AUP}; {_MAU_700M}"),
    (
        re.compile(r"gemma"),
        "Gemma Terms of Use",
        f"the Gemma Prohibited Use Policy binds you {_PASS_ON}; Google may restrict use it believes breaks the "
        "terms",
    ),
    (
        re.compile(r"openrail|\brail\b|responsible ai licen[cs]e"),
        "a Responsible AI Licence (OpenRAIL)",
        "the use restrictions of its Attachment A (no unlawful use, exploiting minors, disinformation, "
        f"discrimination, unqualified medical advice, ...) bind you {_PASS_ON}",
    ),
    (
        re.compile(r"qwen|tongyi|qianwen"),
        "the Tongyi Qianwen licence",
        "products above 100 million monthly active users need a licence from Alibaba Cloud; use restrictions "
        "apply",
    ),
    (
        re.compile(r"deepseek"),
        "the DeepSeek License",
        f"the use restrictions of its Attachment A (no military use, harming minors, disinformation, ...) bind "
        f"you {_PASS_ON}",
    ),
    (
        re.compile(r"falcon"),
        "the TII Falcon licence",
        "TII's acceptable use policy applies; offering the model as a hosted service may need a licence from TII",
    ),
    (
        re.compile(r"stabilityai|stability ai"),
        "the Stability AI Community License",
        "organisations above US$1M annual revenue need an enterprise licence; an acceptable use policy applies",
    ),
]


@dataclass(frozen=True)
class Classified:
    kind: str  # PERMISSIVE | NONCOMMERCIAL | RESTRICTED | UNKNOWN
    name: str = ""  # the licence's name, for restricted ones
    terms: str = ""  # a one-line summary of what accepting means, for restricted ones


def is_noncommercial(licence: str) -> bool:
    lowered = licence.strip().lower()
    return lowered in NONCOMMERCIAL_LICENCES or bool(NONCOMMERCIAL_PATTERN.search(lowered))


def classify(licence: str | None) -> Classified:
    lowered = (licence or "").strip().lower()
    if lowered in UNDECLARED:
        return Classified(UNKNOWN)
    if is_noncommercial(lowered):
        return Classified(NONCOMMERCIAL)
    for pattern, name, terms in RESTRICTED_LICENCES:
        if pattern.search(lowered):
            return Classified(RESTRICTED, name, terms)
    return Classified(PERMISSIVE)


def declared(licence: str | None) -> str:
    """The licence as an acceptance records it: "" when the model names none (cut to the column's width)."""
    return "" if classify(licence).kind == UNKNOWN else licence.strip()[:128]


def check(
    licence: str | None,
    *,
    ref: str,
    allow_noncommercial: bool,
    commercial_use: bool,
    accepted: bool,
) -> None:
    """Refuse (one line: what the licence is, what it means, how to go on) a model this workspace may not load."""
    found = classify(licence)
    accept = f"`alignloop licences accept {shlex.quote(ref)}`"
    if found.kind == NONCOMMERCIAL and not allow_noncommercial:
        raise AlignloopError(
            f"model {ref!r} is licensed {licence!r}, which forbids commercial use; "
            "pass --allow-noncommercial (or set allow_noncommercial: true) to use it anyway"
        )
    if found.kind == RESTRICTED and not accepted:
        raise AlignloopError(
            f"model {ref!r} is licensed {licence!r} ({found.name}): {found.terms}; read the full terms, then "
            f"record your acceptance with {accept}"
        )
    if found.kind == UNKNOWN and not commercial_use:
        log.warning("model %s declares no licence; check its terms before any commercial use", ref)
    elif found.kind == UNKNOWN and not accepted:
        said = f" (only {licence.strip()!r})" if licence and licence.strip() else ""
        raise AlignloopError(
            f"model {ref!r} declares no licence{said}, so this commercial workspace cannot assume it may use "
            f"it; check its terms, then accept it by name with {accept} (or set commercial_use: false)"
        )


# --- acceptances ---------------------------------------------------------------------------------------------


def find_acceptance(session: Session, *, refs: list[str], licence: str | None) -> LicenceAcceptance | None:
    """An acceptance of `licence` (as declared) for any of `refs` (a model and the models it was built from)."""
    if not refs:
        return None
    query = select(LicenceAcceptance).where(
        LicenceAcceptance.model_ref.in_(refs), LicenceAcceptance.licence == declared(licence)
    )
    return session.exec(query.order_by(LicenceAcceptance.id)).first()


def record_acceptance(
    session: Session, *, ref: str, licence: str | None, user: str, note: str | None = None
) -> tuple[LicenceAcceptance, bool]:
    """Record that admin `user` accepted `ref`'s declared licence; returns (row, whether it is new)."""
    admin = session.exec(select(User).where(User.name == user)).first()
    if admin is None or admin.disabled or admin.role != "admin":
        raise AlignloopError(f"{user!r} is not an active admin; only an admin may accept a licence")
    if existing := find_acceptance(session, refs=[ref], licence=licence):
        return existing, False
    row = LicenceAcceptance(model_ref=ref, licence=declared(licence), note=note, user_id=admin.id)
    session.add(row)
    session.flush()
    return row, True


def list_acceptances(session: Session) -> list[tuple[LicenceAcceptance, str]]:
    """Every recorded acceptance with the name of the admin who made it, oldest first."""
    rows = session.exec(
        select(LicenceAcceptance, User.name)
        .join(User, User.id == LicenceAcceptance.user_id)
        .order_by(LicenceAcceptance.accepted_at, LicenceAcceptance.id)
    ).all()
    return [(row, name) for row, name in rows]
