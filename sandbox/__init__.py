"""Sandbox: an offline FHIR server, scenario patients and an EHR simulator that fires hooks."""
