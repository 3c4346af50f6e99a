"""Tools for informaticists: validate, test, evaluate/explain, measure the impact of a change, report on a cohort.

`register` adds the commands to `ketamine-cds` (cds_service/cli.py calls it); each lives in its own module.
"""

from fhir_mappings.tools.cli import register

__all__ = ["register"]
