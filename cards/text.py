"""Short names, deterministic ids and markdown escaping shared by cards and system actions.

Everything a card says is derived from the `Decision` alone, so these helpers are pure functions: the same
decision and hook instance always produce the same words and the same uuids (audit and feedback correlate).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable

from fhir_mappings.model import Decision, Evidence, PolicyRef

SUMMARY_MAX = 139  # CDS Hooks: "<140-character summary"; Inferno fails at length >= 140
SERVICE_LABEL = "ketamine-cds prior-authorization advisor"  # card source when no payer is known
NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://ketamine-cds.example.org/cards")
ELLIPSIS = "…"

_REF = r"[A-Z][A-Za-z]+/[A-Za-z0-9\-.]{1,64}"
_REF_START = re.compile(rf"\s*{_REF}")
_REF_ANY = re.compile(rf"\b{_REF}")
_HEALTH_PLAN = re.compile(r"\s+Health\s+Plans?$", re.IGNORECASE)


def stable_uuid(*parts: str) -> str:
    """uuid5 over the parts: identical input (hook instance, policy, orders) gives the identical id."""
    return str(uuid.uuid5(NAMESPACE, "\x1f".join(parts)))


def one_line(text: str) -> str:
    """Collapse all whitespace (incl. newlines) to single spaces."""
    return " ".join(str(text).split())


def clip(text: str, limit: int) -> str:
    """At most `limit` characters, cut at a word boundary when one is near, ending in "…"."""
    text = one_line(text)
    if len(text) <= limit:
        return text
    if limit <= 1:
        return ELLIPSIS[:limit]
    cut = text[: limit - 1]
    space = cut.rfind(" ")
    if space >= limit * 0.6:
        cut = cut[:space]
    return cut.rstrip(" ,;:—-(") + ELLIPSIS


def fit(head: str, variable: str, tail: str = "", limit: int = SUMMARY_MAX) -> str:
    """head + variable + tail within `limit`, shortening the variable part (titles, program names) first."""
    head, variable, tail = (re.sub(r"\s+", " ", x) for x in (head, variable, tail))
    budget = limit - len(head) - len(tail)
    if budget >= min(len(variable), 12):
        return head + clip(variable, budget) + tail
    return clip(head + variable + tail, limit)


def _drop_ref_parens(label: str) -> str:
    """Remove each "(MedicationRequest/abc, text "… (compounded)")" group, nested parentheses included."""
    out: list[str] = []
    i = 0
    while i < len(label):
        if label[i] == "(" and _REF_START.match(label, i + 1):
            depth = 0
            while i < len(label):
                depth += {"(": 1, ")": -1}.get(label[i], 0)
                i += 1
                if depth == 0:
                    break
            continue
        out.append(label[i])
        i += 1
    return "".join(out)


def service_name(decision: Decision) -> str:
    """What was ordered, in words, without resource ids: "IV ketamine", "Integration psychotherapy".

    Derived from `order_label` (e.g. "IV ketamine administration (MedicationRequest/abc, RxNorm 6130 …)");
    "administration" is dropped because the summary reads "IV ketamine: …".
    """
    label = _REF_ANY.sub("", _drop_ref_parens(decision.order_label or ""))
    names: list[str] = []
    for part in re.split(r"[,;]", label):
        name = one_line(part).strip(" :,;")
        name = re.sub(r"\s+administration\b", "", name).strip()
        if name and name.lower() not in (n.lower() for n in names):
            names.append(name)
    if not names:
        return "Ketamine order"
    text = names[0] if len(names) == 1 else f"{names[0]} + {names[1]}" if len(names) == 2 else "Ketamine orders"
    return text[0].upper() + text[1:] if text[0].islower() else text


def payer_short(payer: str) -> str:
    """ "Mass General Brigham Health Plan" -> "MGB"; "University of Utah Health Plans" -> "U of U"."""
    words = _HEALTH_PLAN.sub("", one_line(payer)).split()
    if len(words) < 2:
        return " ".join(words) or one_line(payer)
    if all(w[:1].isupper() for w in words):
        return "".join(w[0] for w in words)
    return " ".join(w[0] if w[:1].isupper() else w for w in words)


def policy_short(policy: PolicyRef) -> str:
    """ "MGB Policy 031", "U of U MP-054": the policy as a summary line can afford to name it.

    A `short_name` attribute on the PolicyRef (proposed) wins over the derived form.
    """
    explicit = getattr(policy, "short_name", None)
    if isinstance(explicit, str) and explicit.strip():
        return one_line(explicit)
    number = one_line(policy.number)
    match = re.match(r"^Medical\s+Policy\s+(.+)$", number)
    if match:  # "Medical Policy 031" -> "Policy 031"; "Medical Policy MP-054" -> "MP-054"
        rest = match.group(1)
        number = rest if rest[:1].isalpha() else f"Policy {rest}"
    return f"{payer_short(policy.payer)} {number}".strip()


def policy_long(policy: PolicyRef) -> str:
    """ "Mass General Brigham Health Plan — Medical Policy 031" (the card's source label)."""
    return f"{one_line(policy.payer)} — {one_line(policy.number)}"


def payer_of(decision: Decision) -> str | None:
    """The insurer name for `source.label` (CRD: as on the member's card).

    A `payer` attribute on the Decision (proposed: plan variations and pointers without a policy) wins.
    """
    explicit = getattr(decision, "payer", None)
    if isinstance(explicit, str) and explicit.strip():
        return one_line(explicit)
    return one_line(decision.policy.payer) if decision.policy else None


def evidence_text(item: Evidence) -> str:
    """`Condition/123 (ICD-10-CM F33.2, 2025-01-10, 18, note)`: the reference, then what it showed.

    A Patient's display is never shown: it may be the patient's name.
    """
    display = None if item.reference.startswith(("Patient/", "RelatedPerson/")) else item.display  # never a name
    parts = [item.code or display, item.date[:10] if item.date else None, item.value, item.note]
    details = ", ".join(one_line(p) for p in parts if p)
    return f"{item.reference} ({details})" if details else item.reference


def evidence_list(items: Iterable[Evidence], cap: int) -> str:
    """Evidence joined with "; ", at most `cap` items and "+N more"."""
    items = list(items)
    shown = [evidence_text(e) for e in items[:cap]]
    if len(items) > cap:
        shown.append(f"+{len(items) - cap} more")
    return "; ".join(shown)


def md_cell(text: str) -> str:
    """Text safe inside a GFM table cell: one line, `\\` `|` escaped, no raw HTML."""
    text = one_line(text).replace("\\", "\\\\").replace("|", "\\|")
    return text.replace("<", "\\<")


def md_text(text: str) -> str:
    """Text safe as a markdown paragraph or list item: one line, no raw HTML."""
    return one_line(text).replace("\\", "\\\\").replace("<", "\\<")


def md_link(label: str, url: str) -> str:
    """`[label](url)` with brackets in the label and parentheses/spaces in the URL escaped."""
    label = md_text(label).replace("[", "\\[").replace("]", "\\]")
    url = url.replace(" ", "%20").replace("(", "%28").replace(")", "%29")
    return f"[{label}]({url})"


def reference_links(decision: Decision) -> list[tuple[str, str]]:
    """The decision's links (governing program first for variations), then the policy; http(s) only, no repeats."""
    pairs: list[tuple[str, str]] = [(label, url) for label, url in decision.links]
    if decision.policy and decision.policy.url:
        pairs.append((f"{policy_long(decision.policy)}: {one_line(decision.policy.title)}", decision.policy.url))
    seen: set[str] = set()
    links: list[tuple[str, str]] = []
    for label, url in pairs:
        url = str(url).strip()
        if not re.match(r"^https?://[^/\s]+", url) or url in seen or not one_line(label):
            continue
        seen.add(url)
        links.append((one_line(label), url))
    return links
