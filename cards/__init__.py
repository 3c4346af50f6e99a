"""CDS Hooks cards and Da Vinci CRD system actions built from decisions.

Public API (the Flask app and tests use only these names):
- `build_response(decisions, draft_orders, *, hook_instance, patient_id, user_id, today, configuration=None)`
- `CONFIGURATION_OPTIONS`: discovery's `davinci-crd.configuration-options`
- `conformance_problems(response, draft_orders=None)`: Inferno CRD server checks; [] means conformant
"""

from cards.config import CONFIGURATION_OPTIONS
from cards.conformance import conformance_problems
from cards.response import build_response

__all__ = ["CONFIGURATION_OPTIONS", "build_response", "conformance_problems"]
