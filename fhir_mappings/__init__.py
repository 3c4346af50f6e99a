"""FHIR-to-criterion mappings: value sets, facts, policy definitions, and the decision they lead to."""
