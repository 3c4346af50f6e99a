"""Naming and escaping helpers: what a summary can afford to say, and markdown that renders as intended."""

from __future__ import annotations

from dataclasses import replace

import pytest

from cards.text import clip, evidence_text, fit, md_cell, md_link, payer_short, policy_short, service_name
from fhir_mappings.model import Decision, Evidence, Outcome
from tests.cards import fixtures as fx


@pytest.mark.parametrize(
    ("label", "expected"),
    [
        ("IV ketamine administration (MedicationRequest/abc, RxNorm 6130 ketamine)", "IV ketamine"),
        ("ketamine administration: MedicationRequest/a, ServiceRequest/b", "Ketamine"),
        ("intranasal esketamine (Spravato) (MedicationRequest/x, RxNorm 2119365)", "Intranasal esketamine (Spravato)"),
        ("integration psychotherapy (ServiceRequest/s1, CPT 90837)", "Integration psychotherapy"),
        (
            "IV ketamine administration (MedicationRequest/a), integration psychotherapy (ServiceRequest/b)",
            "IV ketamine + integration psychotherapy",
        ),
        ("a (MedicationRequest/1), b (ServiceRequest/2), c (ServiceRequest/3)", "Ketamine orders"),
        ("", "Ketamine order"),
        ('oral ketamine administration (MedicationRequest/po, text "50 mg/5 mL (compounded)")', "Oral ketamine"),
        ("IV ketamine (MedicationRequest/x, unbalanced (", "IV ketamine"),
        ("MedicationRequest/abc", "Ketamine order"),
    ],
)
def test_service_name(label: str, expected: str) -> None:
    decision = Decision(outcome=Outcome.NO_POLICY, order_refs=(), order_label=label)
    assert service_name(decision) == expected


def test_payer_and_policy_short_names() -> None:
    assert payer_short("Mass General Brigham Health Plan") == "MGB"
    assert payer_short("University of Utah Health Plans") == "U of U"
    assert payer_short("Aetna") == "Aetna"
    assert policy_short(fx.MGB) == "MGB Policy 031"
    assert policy_short(fx.UUHP) == "U of U MP-054"
    assert policy_short(replace(fx.UUHP, number="Medical Policy MP-054")) == "U of U MP-054"


def test_clip_and_fit() -> None:
    assert clip("short", 10) == "short"
    clipped = clip("one two three four five six seven", 20)
    assert len(clipped) <= 20 and clipped.endswith("…") and clipped.startswith("one two three")
    fitted = fit("Head (", "word " * 50, ")", limit=40)
    assert len(fitted) <= 40 and fitted.startswith("Head (word") and fitted.endswith("…)")
    assert fit("a ", "b", " c") == "a b c"


def test_markdown_escaping() -> None:
    assert md_cell("a|b\nc <i>") == "a\\|b c \\<i>"
    assert md_cell("back\\slash|") == "back\\\\slash\\|"
    assert (
        md_link("Policy [031]", "https://example.org/a b(c)") == "[Policy \\[031\\]](https://example.org/a%20b%28c%29)"
    )


def test_evidence_text() -> None:
    assert evidence_text(Evidence("Condition/1", date="2025-01-10T08:00:00Z", code="ICD-10-CM F33.2")) == (
        "Condition/1 (ICD-10-CM F33.2, 2025-01-10)"
    )
    assert evidence_text(Evidence("Observation/2", value="172/95 mm[Hg]", note="latest")) == (
        "Observation/2 (172/95 mm[Hg], latest)"
    )
    assert evidence_text(Evidence("Location/l", display="shown when no code")) == "Location/l (shown when no code)"
    assert evidence_text(Evidence("Patient/p")) == "Patient/p"


def test_patient_display_never_shown() -> None:
    assert evidence_text(Evidence("Patient/p", display="Jane Doe", value="42")) == "Patient/p (42)"
    assert evidence_text(Evidence("RelatedPerson/r", display="John Doe")) == "RelatedPerson/r"
