"""Computed facts, one module per clinical topic; importing the package registers every `derive:` function.

| module        | facts                                                                     |
|---------------|---------------------------------------------------------------------------|
| `patient`     | age (bounded by a partial birth date)                                     |
| `order_facts` | the draft order: route, kind, reasons, what it mentions, its elements     |
| `roles`       | who (specialties, requester, performer, care team, evaluations) and where (setting) |
| `vitals`      | blood pressure pairs, specialist clearances                               |
| `trials`      | antidepressant / augmentation / psychotherapy trials, doses, current medications |
| `ketamine`    | prior ketamine administrations and their purpose, courses, dosing notes   |
| `sessions`    | MP-054: KAP and integration sessions, clinic, monitors, training, consultations |
| `decisions`   | documented patient decisions: treatment refused                            |

Each module reads FHIR only through `fhir_mappings.reading` and `FactContext`; which FHIR shapes each
criterion accepts, and what each gives, is the policy's data-shape matrix (`policies/<policy>.matrix.yaml`).
"""

from fhir_mappings.derive import decisions, ketamine, order_facts, patient, roles, sessions, trials, vitals

__all__ = ["decisions", "ketamine", "order_facts", "patient", "roles", "sessions", "trials", "vitals"]
