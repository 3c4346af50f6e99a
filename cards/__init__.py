"""CDS Hooks cards and Da Vinci CRD system actions built from decisions, in CRD 2.0 (2.0.1) or 2.2 (2.2.1).

Public API (the Flask app and tests use only these names):
- `build_response(decisions, draft_orders, *, hook_instance, patient_id, user_id, today, configuration=None,
  crd_version="2.0")`
- `CONFIGURATION_OPTIONS`: discovery's `davinci-crd.configuration-options`
- `CRD_VERSIONS`, `DEFAULT_CRD_VERSION`: the CRD versions rendered ("2.0", "2.2") and the one used when none is asked
- `conformance_problems(response, draft_orders=None, *, crd_version="2.0")`: CRD server checks; [] means conformant
- `discovery_problems(document)`: the CRD extensions of a discovery document
"""

from cards.config import CONFIGURATION_OPTIONS, CRD_VERSIONS, DEFAULT_CRD_VERSION
from cards.conformance import conformance_problems, discovery_problems
from cards.response import build_response

__all__ = [
    "CONFIGURATION_OPTIONS",
    "CRD_VERSIONS",
    "DEFAULT_CRD_VERSION",
    "build_response",
    "conformance_problems",
    "discovery_problems",
]
