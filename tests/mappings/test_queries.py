"""`queries.yaml` loader: the shipped file, token rules, value-set expansion, and every load-time refusal."""

from __future__ import annotations

import re
import textwrap
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from fhir_mappings.queries import DEFAULT_PATH, QueryConfigError, QuerySet, load_queries


class FakeRegistry:
    """Stands in for `ValueSetRegistry` until it lands: knows the given value sets, KeyError otherwise."""

    def __init__(self, codes: dict[str, list[tuple[str, str]]]) -> None:
        self.codes = codes
        self.asked: list[str] = []

    def search_codes(self, vs_ids: Iterable[str]) -> list[tuple[str, str]]:
        found: list[tuple[str, str]] = []
        for vs_id in vs_ids:
            self.asked.append(vs_id)
            found.extend(self.codes[vs_id])  # KeyError for an unknown id, like the real registry
        return found


def shipped_valueset_ids() -> list[str]:
    data = yaml.safe_load(DEFAULT_PATH.read_text(encoding="utf-8"))
    return [vs for q in data["queries"].values() for vs in q.get("code_valuesets", [])]


def shipped_registry() -> FakeRegistry:
    codes = {vs: [("http://loinc.org", f"{n}-0")] for n, vs in enumerate(shipped_valueset_ids())}
    codes["obs_phq9_total"] = [("http://loinc.org", "44261-6")]
    codes["obs_bp_systolic"] = [("http://loinc.org", "8480-6"), ("http://loinc.org", "44261-6")]  # dup dropped
    return FakeRegistry(codes)


def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "queries.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


MINIMAL = """
queries:
  patient:
    template: "Patient/{{context.patientId}}"
    supplies: [Patient]
    required: true
"""


# -- the shipped file --------------------------------------------------------------------------------


def test_shipped_queries_load_with_expanded_valuesets() -> None:
    registry = shipped_registry()
    queries = load_queries(registry)

    assert isinstance(queries, QuerySet)
    assert registry.asked == shipped_valueset_ids()
    observations = queries.queries["observations"].template
    assert "{{valuesets}}" not in observations
    code_param = parse_qs(urlsplit(observations).query)["code"][0]
    codes = code_param.split(",")
    assert codes[0] == "http://loinc.org|44261-6"  # first value set first
    assert "http://loinc.org|44261-6" in codes and "http://loinc.org|8480-6" in codes
    assert codes.count("http://loinc.org|44261-6") == 1
    assert len(codes) == len(set(codes))


def test_shipped_discovery_prefetch_uses_only_cds_hooks_tokens() -> None:
    queries = load_queries(shipped_registry())
    prefetch = queries.discovery_prefetch()

    expected_keys = set(yaml.safe_load(DEFAULT_PATH.read_text(encoding="utf-8"))["queries"])
    assert set(prefetch) == expected_keys
    assert prefetch["patient"] == "Patient/{{context.patientId}}"
    assert prefetch["user_roles"].startswith("PractitionerRole?practitioner={{userPractitionerId}}&_include=")
    # the templates carry the references the facts follow, so a conformant EHR's prefetch is complete
    assert "_revinclude:iterate=PractitionerRole:practitioner" in prefetch["encounters"]
    assert "_include=Encounter:participant" in prefetch["encounters"]
    # CDS Hooks 2.0 §Prefetch tokens: first-level context fields and the user identity tokens
    allowed = {
        "context.patientId",
        "context.encounterId",
        "context.userId",
        "userPractitionerId",
        "userPractitionerRoleId",
    }
    for template in prefetch.values():
        assert set(re.findall(r"\{\{(.*?)\}\}", template)) <= allowed
    assert queries.queries["patient"].required and queries.queries["coverage"].required
    assert not queries.queries["conditions"].required


def test_shipped_supplied_types_rules_and_limits() -> None:
    queries = load_queries(shipped_registry())

    assert {"Patient", "Coverage", "Observation", "PractitionerRole", "Encounter"} <= queries.supplied_types()
    assert "Organization" not in queries.supplied_types()
    encounter_rule = next(r for r in queries.resolve_rules if r.from_types == ("Encounter",))
    assert encounter_rule.within_days == 400 and not encounter_rule.draft_orders_only
    assert encounter_rule.path_texts[0] == "$.participant[*].individual"
    found = [m.value for m in encounter_rule.paths[0].find({"participant": [{"individual": {"reference": "X/1"}}]})]
    assert found == [{"reference": "X/1"}]
    draft_rule = queries.resolve_rules[0]
    assert draft_rule.draft_orders_only and draft_rule.from_types == ("MedicationRequest", "ServiceRequest")
    assert queries.limits.max_pages_per_query == 10
    assert queries.limits.max_reference_ids_per_type == 100
    assert queries.limits.reference_rounds == 2


# -- rendering ---------------------------------------------------------------------------------------


def test_render_replaces_context_tokens_and_encodes_values() -> None:
    queries = load_queries(shipped_registry())

    assert queries.queries["patient"].render({"patientId": "p-1"}) == "Patient/p-1"
    conditions = queries.queries["conditions"].render({"patientId": "a&b=c"})
    assert conditions == "Condition?patient=a%26b%3Dc"  # a value can never add a parameter
    assert queries.queries["patient"].render({}) is None
    assert queries.queries["patient"].render({"patientId": ""}) is None
    assert queries.queries["patient"].render({"patientId": 12}) is None


@pytest.mark.parametrize(
    ("token", "user_id", "expected"),
    [
        ("userPractitionerId", "Practitioner/u1", "u1"),
        ("userPractitionerId", "PractitionerRole/r1", None),
        ("userPractitionerRoleId", "PractitionerRole/r1", "r1"),
        ("userPractitionerRoleId", "Practitioner/u1", None),
        ("userPatientId", "Patient/p1", "p1"),
        ("userRelatedPersonId", "RelatedPerson/rp1", "rp1"),
        ("userRelatedPersonId", None, None),
        ("userPractitionerId", "Practitioner/", None),
        ("context.userId", "Practitioner/u1", "Practitioner/u1"),
    ],
)
def test_user_tokens_resolve_only_for_their_user_type(
    tmp_path: Path, token: str, user_id: str | None, expected: str | None
) -> None:
    path = write_yaml(
        tmp_path,
        f"""
        queries:
          who:
            template: "Basic?who={{{{{token}}}}}"
            supplies: [Basic]
        """,
    )
    query = load_queries(FakeRegistry({}), path).queries["who"]
    context = {"patientId": "p1"} if user_id is None else {"patientId": "p1", "userId": user_id}

    rendered = query.render(context)

    assert rendered == (None if expected is None else f"Basic?who={expected}")


def test_encounter_token_resolves_only_when_present(tmp_path: Path) -> None:
    path = write_yaml(
        tmp_path,
        """
        queries:
          encounter:
            template: "Encounter/{{context.encounterId}}"
            supplies: [Encounter]
        """,
    )
    query = load_queries(FakeRegistry({}), path).queries["encounter"]

    assert query.is_read and query.resource_type == "Encounter"
    assert query.render({"patientId": "p1", "encounterId": "e1"}) == "Encounter/e1"
    assert query.render({"patientId": "p1"}) is None


def test_codes_with_search_syntax_characters_are_escaped(tmp_path: Path) -> None:
    path = write_yaml(
        tmp_path,
        """
        queries:
          obs:
            template: "Observation?patient={{context.patientId}}&code={{valuesets}}"
            supplies: [Observation]
            code_valuesets: [odd]
        """,
    )
    registry = FakeRegistry({"odd": [("urn:oid:1.2", "a,b"), ("http://x.org", "c&d")]})

    template = load_queries(registry, path).queries["obs"].template

    assert template.endswith("code=urn:oid:1.2|a%5C,b,http://x.org|c%26d")
    # what a FHIR server receives after URL decoding: one escaped comma inside the first code
    assert parse_qs(urlsplit(template).query)["code"] == ["urn:oid:1.2|a\\,b,http://x.org|c&d"]


# -- refusals -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("MedicationRequest/{{context.draftOrders.MedicationRequest.id}}", "context.draftOrders"),
        ("Observation?patient={{context.patientId}}&date=ge{{today()}}", "today()"),
        ("Patient/{{Patient.id}}", "Patient.id"),
        ("Patient/{{ context.patientId }}", "context.patientId"),
        ("Observation?code={{valuesets}}", "only allowed together with code_valuesets"),
        ("Patient/{{context.patientId}", "unbalanced"),
        ("http://evil.example/Patient/{{context.patientId}}", "relative FHIR URL"),
    ],
)
def test_invalid_templates_are_refused_naming_the_key(tmp_path: Path, template: str, message: str) -> None:
    path = write_yaml(
        tmp_path,
        f"""
        queries:
          bad_query:
            template: "{template}"
            supplies: [Patient]
        """,
    )

    with pytest.raises(QueryConfigError) as raised:
        load_queries(FakeRegistry({}), path)

    assert "'bad_query'" in str(raised.value)
    assert message in str(raised.value)


@pytest.mark.parametrize(
    ("text", "names"),
    [
        (MINIMAL + "    requried: true\n", ["'patient'", "requried"]),
        (MINIMAL + "settings: {}\n", ["settings"]),
        (MINIMAL + "limits:\n  max_pages: 3\n", ["limits", "max_pages"]),
        (MINIMAL + "limits:\n  reference_rounds: -1\n", ["reference_rounds"]),
        (
            MINIMAL + "resolve_references:\n  - from: [Encounter]\n    path: ['$.x']\n",
            ["resolve_references[0]", "path"],
        ),
        (MINIMAL.replace("[Patient]", "[patient]"), ["'patient'", "supplies"]),
        (MINIMAL.replace("required: true", "required: yes please"), ["'patient'", "required"]),
    ],
)
def test_unknown_keys_and_bad_values_are_refused(tmp_path: Path, text: str, names: list[str]) -> None:
    path = write_yaml(tmp_path, text)

    with pytest.raises(QueryConfigError) as raised:
        load_queries(FakeRegistry({}), path)

    for name in names:
        assert name in str(raised.value)


def test_bad_jsonpath_is_refused_naming_rule_and_path(tmp_path: Path) -> None:
    path = write_yaml(
        tmp_path,
        MINIMAL
        + """
resolve_references:
  - from: [Encounter]
    paths: ["$.participant[*].individual"]
  - from: [Procedure]
    paths: ["$.performer[*].actor", "$.performer[?(@.x"]
""",
    )

    with pytest.raises(QueryConfigError) as raised:
        load_queries(FakeRegistry({}), path)

    assert "resolve_references[1]" in str(raised.value)
    assert "$.performer[?(@.x" in str(raised.value)


def test_unknown_value_set_is_refused_naming_query_and_value_set(tmp_path: Path) -> None:
    path = write_yaml(
        tmp_path,
        """
        queries:
          observations:
            template: "Observation?patient={{context.patientId}}&code={{valuesets}}"
            supplies: [Observation]
            code_valuesets: [obs_phq9_total, obs_nowhere]
        """,
    )
    registry = FakeRegistry({"obs_phq9_total": [("http://loinc.org", "44261-6")]})

    with pytest.raises(QueryConfigError) as raised:
        load_queries(registry, path)

    assert "'observations'" in str(raised.value) and "'obs_nowhere'" in str(raised.value)


def test_shipped_file_with_a_registry_missing_a_value_set_is_refused() -> None:
    registry = shipped_registry()
    del registry.codes["obs_cgi"]

    with pytest.raises(QueryConfigError, match="obs_cgi"):
        load_queries(registry)


def test_code_valuesets_without_placeholder_or_codes_are_refused(tmp_path: Path) -> None:
    no_placeholder = write_yaml(
        tmp_path,
        """
        queries:
          observations:
            template: "Observation?patient={{context.patientId}}"
            supplies: [Observation]
            code_valuesets: [obs_phq9_total]
        """,
    )
    with pytest.raises(QueryConfigError, match=r"'observations'.*no \{\{valuesets\}\}"):
        load_queries(FakeRegistry({"obs_phq9_total": [("http://loinc.org", "44261-6")]}), no_placeholder)

    empty = write_yaml(
        tmp_path,
        """
        queries:
          observations:
            template: "Observation?patient={{context.patientId}}&code={{valuesets}}"
            supplies: [Observation]
            code_valuesets: [obs_phq9_total]
        """,
    )
    with pytest.raises(QueryConfigError, match=r"'observations'.*no codes"):
        load_queries(FakeRegistry({"obs_phq9_total": []}), empty)


def test_shipped_queries_load_with_the_shipped_value_set_registry() -> None:
    from fhir_mappings.valuesets import ValueSetRegistry

    registry = ValueSetRegistry.load()
    queries = load_queries(registry)

    codes = parse_qs(urlsplit(queries.queries["observations"].template).query)["code"][0].split(",")
    assert "http://loinc.org|44261-6" in codes  # PHQ-9 total
    assert len(codes) == len(set(codes))
    assert len(queries.queries["observations"].template) < 4000  # fits comfortably in a GET URL
