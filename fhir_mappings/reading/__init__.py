"""The one place where FHIR is read: dates and periods, values, codes, text, and the resource types an event
is recorded in.

Every fact reads the record through this package, so a representation that real EHRs use is taught once:
`dates` (partial dates and periods as bounded spans), `values` (all Observation `value[x]`, components,
`hasMember` panels, interpretation and reference ranges, quantities with comparators and units), `text`
(negation-, uncertainty-, hypothetical-, history- and family-aware reading of free text with medspacy's
ConText), `events` (one clinical event recorded as a Procedure, an Encounter, a MedicationAdministration …,
deduplicated). Missing or partial data is never turned into a value here: it comes back as None, or as
`Bounds`/`DateSpan` that hold the answer both ways.
"""
