"""Value-set files and the code matcher: the shipped registry, every matching rule, and every load-time refusal."""

from __future__ import annotations

import json
import shutil
import textwrap
import time
from pathlib import Path

import pytest

from fhir_mappings.valuesets import (
    CPT,
    HCPCS,
    ICD10CM,
    LOCAL,
    LOINC,
    NDC,
    NUCC,
    RXNORM,
    SNOMED,
    SOPT,
    SYSTEM_ALIASES,
    V3_ACTCODE,
    CodeMatch,
    ValueSetError,
    ValueSetRegistry,
    canonical_system,
    normalize_ndc,
)

PACKAGE_DIR = Path(__file__).resolve().parents[2] / "fhir_mappings" / "valuesets"


def _words(text: str) -> list[str]:
    return text.split()


REQUIRED_IDS = _words("""
order_ketamine order_esketamine route_iv route_im route_nasal route_oral route_sublingual proc_ketamine_infusion
hcpcs_unclassified_drug proc_esketamine_service proc_psychotherapy proc_integration_psychotherapy
proc_psych_diagnostic_eval
dx_mdd dx_mdd_severe dx_mdd_psychotic dx_trd dx_suicidal_ideation dx_suicide_attempt dx_ptsd dx_anxiety dx_ocd
dx_bipolar_mania dx_primary_psychotic dx_dementia dx_pregnancy dx_lactation dx_sud dx_sud_remission
dx_hallucinogen_use dx_ketamine_misuse dx_delirium dx_aneurysm_avm dx_ich dx_ich_history dx_hypertension
dx_arrhythmia dx_unstable_cvd dx_csf_obstruction dx_glaucoma dx_globe_injury dx_hyperthyroidism
dx_hyperthyroidism_uncontrolled dx_porphyria dx_pulmonary allergy_ketamine
med_ssri med_snri med_tca med_maoi med_mirtazapine med_bupropion med_other_antidepressant med_augment_lithium
med_augment_atypical_antipsychotic med_augment_t3 med_mood_stabilizer med_antidepressant_scd med_sud_maintenance
obs_phq9_total obs_phq9_panel obs_phq9_item9 obs_bp_panel obs_bp_systolic obs_bp_diastolic obs_body_weight
obs_pregnancy_status obs_pregnancy_intent obs_pregnancy_test obs_breastfeeding_status obs_cssrs_screen
ans_pregnant ans_breastfeeding ans_positive ans_wants_pregnancy
obs_hamd_total obs_madrs_total obs_qids_sr16_total obs_cgi_severity obs_cgi_improvement obs_medication_adherence
obs_functional_improvement obs_specialist_clearance obs_sud_treatment_declined kap_training kap_session
kap_eligibility_consult ketamine_candidacy_documented
prac_psychiatrist prac_aprn prac_pa prac_rn prac_physician_md prac_licensed_mental_health prac_pcp prac_cardiology
prac_neurology prac_ophthalmology prac_medical_clearance prac_anesthesiology
coverage_medicare_advantage coverage_medicare_ffs coverage_dual_medicare_medicaid coverage_medicaid coverage_chip
coverage_commercial
encounter_class_hospital_office encounter_class_home location_type_hospital_office consent_information_disclosure
reason_ineffective
obs_phq2_total obs_pregnancy_test_qualitative obs_pregnancy_test_quantitative obs_medication_adherence_reported
ans_medication_adherent ans_medication_nonadherent ans_negative ans_indeterminate ans_not_pregnant ans_possibly_pregnant
ans_unknown ans_not_breastfeeding ans_no_pregnancy_intent ans_pregnancy_intent_unsure ans_yes ans_no ans_declined
ans_not_cleared interp_positive interp_negative interp_indeterminate interp_high interp_low interp_abnormal
interp_normal prac_aprn_psychiatric dx_non_depression_indication dx_ketamine_nonpsychiatric_indication
proc_anaesthesia_sedation encounter_class_emergency encounter_class_inpatient encounter_type_emergency
location_type_emergency
location_type_procedural
obs_phq9_items ans_phq9_item_frequency obs_lithium_level obs_tsh obs_free_t4 obs_heart_rate allergy_none_known
dx_no_pregnancy_potential dx_contraception
""")

LOCAL_DEFAULT_IDS = _words("""
obs_hamd_total obs_madrs_total obs_qids_sr16_total obs_cgi_severity obs_cgi_improvement obs_medication_adherence
obs_functional_improvement obs_specialist_clearance obs_sud_treatment_declined kap_training kap_session
kap_eligibility_consult ketamine_candidacy_documented
""")


@pytest.fixture(scope="module")
def registry() -> ValueSetRegistry:
    return ValueSetRegistry.load()


def coding(system: str, code: str, display: str | None = None) -> dict[str, str]:
    c = {"system": system, "code": code}
    if display is not None:
        c["display"] = display
    return c


# -- the shipped registry ----------------------------------------------------------------------------


def test_load_time_is_printed_and_reasonable(capsys: pytest.CaptureFixture[str]) -> None:
    start = time.perf_counter()
    reg = ValueSetRegistry.load()
    elapsed = time.perf_counter() - start
    with capsys.disabled():
        print(f"\n[valuesets] loaded {len(reg)} value sets in {elapsed:.3f} s")
    assert elapsed < 10  # target is well under 2 s; loose bound so a slow CI box does not flake


def test_every_required_id_exists(registry: ValueSetRegistry) -> None:
    missing = [vs for vs in REQUIRED_IDS if vs not in registry]
    assert missing == []


def test_shipped_sets_are_well_formed(registry: ValueSetRegistry) -> None:
    for vs_id in registry.ids():
        vs = registry.get(vs_id)
        assert vs.id == vs_id
        assert vs.title and vs.source
        assert vs.verification in {"verified", "secondary", "unverified", "local-default", "gap"}
        if vs.verification != "gap":
            # something must be able to match: listed codes, category prefixes (e.g. ICD-10-CM chapter F) or,
            # for free-text-only local sets, text patterns
            assert len(vs) > 0 or vs._prefixes or vs.text_patterns, vs_id


def test_local_defaults_are_marked_and_site_configurable(registry: ValueSetRegistry) -> None:
    for vs_id in LOCAL_DEFAULT_IDS:
        vs = registry.get(vs_id)
        assert vs.verification == "local-default", vs_id
        assert vs.site_configurable, vs_id
        assert Path(vs.file).name == "local.yaml", vs_id
        assert {system for system, _code, _disp in vs.concepts()} == {LOCAL}, vs_id


def test_representative_counts(registry: ValueSetRegistry) -> None:
    assert len(registry.get("dx_pregnancy")) == 1923 + 65
    assert len(registry.get("med_antidepressant_scd")) == 178
    assert {c for _s, c, _d in registry.get("proc_integration_psychotherapy").concepts()} == {
        "90832",
        "90834",
        "90837",
    }


def test_site_filled_sets_start_empty_and_accept_additions() -> None:
    reg = ValueSetRegistry.load()
    clinics = reg.get("site_credentialed_clinics")  # used by mappings.py for the site's credentialed_clinics
    assert clinics.verification == "gap" and clinics.site_configurable and len(clinics) == 0
    npi = {"system": "http://hl7.org/fhir/sid/us-npi", "code": "1234567893"}
    assert clinics.match_coding(npi) is None
    reg.extend("site_credentialed_clinics", [{**npi, "display": "Clinic"}])
    assert clinics.match_coding(npi) is not None


def test_get_unknown_id_suggests_close_names(registry: ValueSetRegistry) -> None:
    with pytest.raises(KeyError, match="dx_mdd"):
        registry.get("dx_mddd")
    assert "dx_mddd" not in registry
    assert "dx_mdd" in registry


def test_shipped_queries_expand_with_the_real_registry(registry: ValueSetRegistry) -> None:
    from fhir_mappings.queries import load_queries

    queries = load_queries(registry=registry)
    template = queries.queries["observations"].template
    assert "http://loinc.org|44261-6" in template
    assert f"{LOCAL}|hamd-17-total" in template


# -- ICD-10-CM: dots, case, prefixes -----------------------------------------------------------------


@pytest.mark.parametrize("code", ["F33.2", "F332", "f33.2", " F33.2 ", "F33.41", "F3341"])
def test_icd_mdd_with_and_without_dot(registry: ValueSetRegistry, code: str) -> None:
    hit = registry.get("dx_mdd").match_coding(coding(ICD10CM, code))
    assert hit is not None
    assert hit.code == code  # as found in the data
    assert hit.valueset == "dx_mdd"


def test_icd_prefix_and_non_members(registry: ValueSetRegistry) -> None:
    mdd = registry.get("dx_mdd")
    assert mdd.match_coding(coding(ICD10CM, "F34.1")) is None  # dysthymia is not MDD
    assert mdd.match_coding(coding(ICD10CM, "F32.A")) is None
    assert mdd.match_coding(coding(ICD10CM, "F31.81")) is None
    # a child code that is not listed still matches through its category prefix
    child = mdd.match_coding(coding(ICD10CM, "F33.49"))
    assert child is not None and child.via == "prefix"
    listed = mdd.match_coding(coding(ICD10CM, "F33.2"))
    assert listed is not None and listed.via == "exact"
    assert listed.display == "Major depressive disorder, recurrent severe without psychotic features"


@pytest.mark.parametrize("code", ["F31.0", "F31.81", "F319", "F30.10", "F31.9"])
def test_bipolar_mania_prefix(registry: ValueSetRegistry, code: str) -> None:
    assert registry.get("dx_bipolar_mania").match_coding(coding(ICD10CM, code)) is not None


def test_pregnancy_exact_and_lactation(registry: ValueSetRegistry) -> None:
    preg = registry.get("dx_pregnancy")
    assert preg.match_coding(coding(ICD10CM, "Z34.00")) is not None
    assert preg.match_coding(coding(ICD10CM, "F33.2")) is None
    assert registry.get("dx_lactation").match_coding(coding(ICD10CM, "Z39.1")) is not None


def test_uncontrolled_hyperthyroidism_is_only_the_crisis_codes(registry: ValueSetRegistry) -> None:
    vs = registry.get("dx_hyperthyroidism_uncontrolled")
    assert vs.match_coding(coding(ICD10CM, "E05.01")) is not None
    assert vs.match_coding(coding(ICD10CM, "E05.00")) is None
    assert registry.get("dx_hyperthyroidism").match_coding(coding(ICD10CM, "E05.00")) is not None


def test_csf_obstruction_union_excludes_head_injury(registry: ValueSetRegistry) -> None:
    csf = registry.get("dx_csf_obstruction")
    assert csf.match_coding(coding(ICD10CM, "G91.1")) is not None  # obstructive hydrocephalus
    assert csf.match_coding(coding(ICD10CM, "C71.9")) is not None  # intracranial mass
    assert csf.match_coding(coding(ICD10CM, "S06.0X0A")) is None
    assert registry.get("dx_head_injury").match_coding(coding(ICD10CM, "S06.0X0A")) is not None


# -- SNOMED CT -----------------------------------------------------------------------------------------


def test_snomed_exact(registry: ValueSetRegistry) -> None:
    hit = registry.get("dx_trd").match_coding(coding(SNOMED, "1153570009"))
    assert hit == CodeMatch("dx_trd", SNOMED, "1153570009", "Treatment resistant depression (disorder)", "exact")
    assert hit.label() == "SNOMED CT 1153570009"
    assert registry.get("dx_trd").match_coding(coding(SNOMED, "115357000")) is None
    assert registry.get("dx_mdd").match_coding(coding(SNOMED, "1153570009")) is None


def test_data_display_wins_over_value_set_display(registry: ValueSetRegistry) -> None:
    hit = registry.get("dx_trd").match_coding(coding(SNOMED, "1153570009", "TRD (local text)"))
    assert hit is not None and hit.display == "TRD (local text)"


def test_wrong_or_missing_system_does_not_match(registry: ValueSetRegistry) -> None:
    mdd = registry.get("dx_mdd")
    assert mdd.match_coding({"code": "F33.2"}) is None
    assert mdd.match_coding(coding(SNOMED, "F33.2")) is None
    assert mdd.match_coding({"system": ICD10CM}) is None
    assert mdd.match_coding(None) is None
    assert mdd.match_concept(None) is None
    assert mdd.match_concept({"coding": "not a list"}) is None


# -- RxNorm products -> ingredients ------------------------------------------------------------------


def test_sertraline_scd_matches_ssri_via_ingredient(registry: ValueSetRegistry) -> None:
    hit = registry.get("med_ssri").match_coding(coding(RXNORM, "312941"))  # sertraline 50 MG Oral Tablet
    assert hit is not None
    assert hit.via == "ingredient:36437"
    assert hit.display == "sertraline 50 MG Oral Tablet"
    assert hit.label() == "RxNorm 312941"
    assert registry.get("med_snri").match_coding(coding(RXNORM, "312941")) is None


def test_ingredient_code_matches_itself(registry: ValueSetRegistry) -> None:
    hit = registry.get("med_ssri").match_coding(coding(RXNORM, "36437"))
    assert hit is not None and hit.via == "ingredient:36437"


def test_ketamine_scd_matches_order_ketamine_not_esketamine(registry: ValueSetRegistry) -> None:
    assert registry.get("order_ketamine").match_coding(coding(RXNORM, "238082")) is not None
    assert registry.get("order_esketamine").match_coding(coding(RXNORM, "238082")) is None
    spravato = registry.get("order_esketamine").match_coding(coding(RXNORM, "2119381"))
    assert spravato is not None
    assert registry.get("order_ketamine").match_coding(coding(RXNORM, "2119381")) is None


def test_multi_ingredient_and_salt_products(registry: ValueSetRegistry) -> None:
    # fluoxetine / olanzapine (MIN) counts as an SSRI and as an atypical antipsychotic
    assert registry.get("med_ssri").match_coding(coding(RXNORM, "611247")) is not None
    assert registry.get("med_augment_atypical_antipsychotic").match_coding(coding(RXNORM, "611247")) is not None
    # divalproex sodium (PIN) -> valproate
    hit = registry.get("med_mood_stabilizer").match_coding(coding(RXNORM, "266856"))
    assert hit is not None and hit.via == "ingredient:40254"


def test_sud_maintenance_products(registry: ValueSetRegistry) -> None:
    vs = registry.get("med_sud_maintenance")
    assert vs.match_coding(coding(RXNORM, "351266")).via == "ingredient:1819"  # buprenorphine / naloxone SL tab
    assert vs.match_coding(coding(RXNORM, "864718")).via == "ingredient:6813"  # methadone 5 MG tablet
    assert vs.match_coding(coding(RXNORM, "637216")).via == "ingredient:7243"  # Vivitrol
    assert vs.match_coding(coding(RXNORM, "312941")) is None
    # acamprosate has no verified RxCUI: text only
    text = vs.match_concept({"text": "Acamprosate calcium 333 mg DR tablet"})
    assert text is not None and text.via == "text"


def test_registry_ingredients(registry: ValueSetRegistry) -> None:
    assert registry.ingredients(RXNORM, "312941") == frozenset({"36437"})
    assert registry.ingredients(RXNORM, "36437") == frozenset({"36437"})  # the IN maps to itself
    assert registry.ingredients(RXNORM, "611247") == frozenset({"4493", "61381"})
    assert registry.ingredients(RXNORM, "999999999") == frozenset()
    assert registry.ingredients(SNOMED, "36437") == frozenset()
    assert registry.ingredients("urn:oid:2.16.840.1.113883.6.88", "312941") == frozenset({"36437"})


def test_null_ingredient_rxcuis_are_ignored(registry: ValueSetRegistry) -> None:
    # amitriptyline / perphenazine: perphenazine's RxCUI is null in the map, amitriptyline still counts
    assert registry.ingredients(RXNORM, "856706") == frozenset({"704"})
    assert registry.get("med_tca").match_coding(coding(RXNORM, "856706")) is not None
    # buprenorphine / naloxone: naloxone unverified (null), buprenorphine still counts
    assert registry.ingredients(RXNORM, "351266") == frozenset({"1819"})


# -- NDC -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "code",
    [
        "00409205105",  # 11 digits (5-4-2)
        "00409-2051-05",  # 5-4-2 hyphenated
        "0409-2051-05",  # 4-4-2
        "0409205105",  # 10 digits, ambiguous: all readings are tried
    ],
)
def test_ndc_formats_for_ketamine(registry: ValueSetRegistry, code: str) -> None:
    hit = registry.get("order_ketamine").match_coding(coding(NDC, code))
    assert hit is not None and hit.via == "exact" and hit.code == code
    assert hit.display == "ketamine 100 MG/ML Injectable Solution"


def test_ndc_normalisation_rules() -> None:
    assert normalize_ndc("12345-678-90") == ("12345067890",)  # 5-3-2
    assert normalize_ndc("12345-6789-0") == ("12345678900",)  # 5-4-1
    assert normalize_ndc("1234-5678-90") == ("01234567890",)  # 4-4-2
    assert normalize_ndc("12345678901") == ("12345678901",)
    assert set(normalize_ndc("1234567890")) == {"01234567890", "12345067890", "12345678900"}
    assert normalize_ndc("12-34") == ()
    assert normalize_ndc("abc") == ()


def test_ndc_5_3_2_and_5_4_1(registry: ValueSetRegistry) -> None:
    ket = registry.get("order_ketamine")
    assert ket.match_coding(coding(NDC, "55150-438-01")) is not None  # 5-3-2 -> 55150043801
    assert ket.match_coding(coding(NDC, "67457-0181-0")) is not None  # 5-4-1 -> 67457018100
    assert ket.match_coding(coding(NDC, "67457-1081-0")) is None  # 5-4-1 -> 67457108100, not a ketamine NDC
    assert ket.match_coding(coding(NDC, "not-an-ndc")) is None


# -- aliases: SOPT OID, HCPCS https, case-insensitive codes --------------------------------------------


def test_sopt_oid_alias(registry: ValueSetRegistry) -> None:
    oid = "urn:oid:2.16.840.1.113883.3.221.5"
    assert SYSTEM_ALIASES[oid] == SOPT
    hit = registry.get("coverage_medicare_advantage").match_coding(coding(oid, "112"))
    assert hit is not None and hit.system == SOPT and hit.label() == "SOPT 112"
    assert registry.get("coverage_medicare_advantage").match_coding(coding(SOPT, "1119")).via == "prefix"
    assert registry.get("coverage_medicaid").match_coding(coding(oid, "211")) is not None


def test_coverage_families_do_not_overlap_on_known_traps(registry: ValueSetRegistry) -> None:
    assert registry.get("coverage_medicaid").match_coding(coding(SOPT, "23")) is None
    assert registry.get("coverage_chip").match_coding(coding(SOPT, "23")) is not None
    assert registry.get("coverage_commercial").match_coding(coding(SOPT, "523")) is None
    assert registry.get("coverage_commercial").match_coding(coding(SOPT, "512")) is not None
    assert registry.get("coverage_medicare_advantage").match_coding(coding(SOPT, "141")) is None
    assert registry.get("coverage_dual_medicare_medicaid").match_coding(coding(SOPT, "141")) is not None


def test_other_aliases_and_case(registry: ValueSetRegistry) -> None:
    assert canonical_system("https://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets") == HCPCS
    assert canonical_system("http://loinc.org/") == LOINC
    assert canonical_system(None) == ""
    assert canonical_system("http://snomed.info/sct/731000124108") == SNOMED
    assert canonical_system("http://snomed.info/sct/version") == "http://snomed.info/sct/version"
    assert registry.get("hcpcs_unclassified_drug").match_coding(coding(HCPCS, "j3490")) is not None
    assert registry.get("prac_psychiatrist").match_coding(coding(NUCC, "2084p0800x")) is not None
    assert registry.get("dx_trd").match_coding(coding("urn:oid:2.16.840.1.113883.6.96", "1153570009")) is not None


def test_nucc_prefix_sets(registry: ValueSetRegistry) -> None:
    assert registry.get("prac_physician_md").match_coding(coding(NUCC, "207RC0000X")).via == "prefix"
    assert registry.get("prac_aprn").match_coding(coding(NUCC, "363LF0000X")) is not None
    assert registry.get("prac_anesthesiology").match_coding(coding(NUCC, "207L00000X")) is not None
    assert registry.get("prac_psychiatrist").match_coding(coding(NUCC, "2084N0400X")) is None  # neurology
    assert registry.get("prac_neurology").match_coding(coding(NUCC, "2084V0102X")) is not None


# -- CodeableConcepts and text patterns --------------------------------------------------------------


def test_text_pattern_troche_matches_ketamine(registry: ValueSetRegistry) -> None:
    hit = registry.get("order_ketamine").match_concept({"text": "Ketamine HCl compounded troche"})
    assert hit is not None and hit.via == "text"
    assert hit.display == "Ketamine HCl compounded troche"
    assert hit.label() == 'text "Ketamine HCl compounded troche"'


@pytest.mark.parametrize("text", ["esketamine", "Esketamine 28 mg nasal", "Spravato 56 mg"])
def test_esketamine_text_does_not_match_ketamine(registry: ValueSetRegistry, text: str) -> None:
    assert registry.get("order_ketamine").match_concept({"text": text}) is None
    assert registry.get("order_esketamine").match_concept({"text": text}) is not None


def test_codings_win_over_text_and_text_is_a_fallback(registry: ValueSetRegistry) -> None:
    ket = registry.get("order_ketamine")
    coded = ket.match_concept({"coding": [coding(RXNORM, "238083")], "text": "ketamine"})
    assert coded is not None and coded.via == "exact"
    # an unknown local coding whose display names the drug: matched by text, keeping its system/code
    local = ket.match_concept({"coding": [coding("urn:local:med", "K-999", "KETAMINE 50 mg/5 mL syringe")]})
    assert local is not None and local.via == "text"
    assert (local.system, local.code) == ("urn:local:med", "K-999")
    # an esketamine coding must not fall through to the ketamine text pattern via its display
    esk = {"coding": [coding(RXNORM, "2119381", "esketamine 140 MG/ML Nasal Spray")]}
    assert ket.match_concept(esk) is None


def test_sets_without_patterns_never_match_text(registry: ValueSetRegistry) -> None:
    assert registry.get("dx_mdd").match_concept({"text": "major depressive disorder"}) is None


def test_match_text(registry: ValueSetRegistry) -> None:
    assert registry.get("obs_madrs_total").match_text("MADRS total score") is not None
    assert registry.get("obs_madrs_total").match_text("PHQ-9 total") is None
    assert registry.get("obs_hamd_total").match_concept({"text": "HAM-D (17 item) total"}) is not None
    assert registry.get("obs_hamd_total").match_text("HAM-D17 score") is not None
    assert registry.get("obs_hamd_total").match_text("HAM-A total") is None  # anxiety scale


def test_second_coding_can_match(registry: ValueSetRegistry) -> None:
    concept = {"coding": [coding("urn:local", "X1"), coding(LOINC, "44261-6")]}
    hit = registry.get("obs_phq9_total").match_concept(concept)
    assert hit is not None and hit.label() == "LOINC 44261-6"


def test_label_short_names() -> None:
    assert CodeMatch("dx_mdd", ICD10CM, "F33.2", None, "exact").label() == "ICD-10-CM F33.2"
    assert CodeMatch("x", RXNORM, "36437", None, "ingredient:36437").label() == "RxNorm 36437"
    assert CodeMatch("x", "http://example.org/cs/thing", "A", None, "exact").label() == "thing A"


# -- search codes, extend, fingerprint ---------------------------------------------------------------


def test_search_codes_are_exact_codes_only(registry: ValueSetRegistry) -> None:
    assert registry.get("obs_phq9_total").search_codes() == [(LOINC, "44261-6"), (LOINC, "89204-2")]
    mdd = registry.get("dx_mdd").search_codes()
    assert (SNOMED, "370143000") in mdd
    assert not any(system == ICD10CM for system, _ in mdd)  # ICD part is a prefix include
    assert registry.get("med_ssri").search_codes() == []  # ingredient include
    ket = registry.get("order_ketamine").search_codes()
    assert (RXNORM, "238082") in ket and (NDC, "00409205105") in ket and (RXNORM, "6130") not in ket
    both = registry.search_codes(["obs_bp_systolic", "obs_bp_diastolic", "obs_bp_systolic"])
    assert both[0] == (LOINC, "8480-6") and (LOINC, "8462-4") in both
    assert len(both) == len(set(both))
    with pytest.raises(KeyError):
        registry.search_codes(["no_such_set"])


def test_extend_adds_a_local_code_and_changes_the_fingerprint() -> None:
    reg = ValueSetRegistry.load()
    before = reg.fingerprint
    assert reg.fingerprint == before  # stable
    hamd = reg.get("obs_hamd_total")
    site = {"system": "urn:oid:1.2.3.4.5", "code": "HAMD17", "display": "HAM-D 17 total (Epic flowsheet)"}
    assert hamd.match_coding(site) is None
    reg.extend("obs_hamd_total", [site])
    hit = hamd.match_coding({"system": "urn:oid:1.2.3.4.5", "code": "HAMD17"})
    assert hit is not None and hit.via == "exact" and hit.display == "HAM-D 17 total (Epic flowsheet)"
    assert ("urn:oid:1.2.3.4.5", "HAMD17") in hamd.search_codes()
    assert reg.fingerprint != before
    # a fresh load does not see the site addition and has the original fingerprint
    assert ValueSetRegistry.load().fingerprint == before


def test_extend_validates_input() -> None:
    reg = ValueSetRegistry.load()
    with pytest.raises(ValueSetError, match="obs_hamd_total"):
        reg.extend("obs_hamd_total", [{"system": "urn:x", "code": ""}])
    with pytest.raises(ValueSetError, match="unknown key"):
        reg.extend("obs_hamd_total", [{"system": "urn:x", "code": "1", "match": "prefix"}])
    with pytest.raises(ValueSetError, match="system"):
        reg.extend("obs_hamd_total", [{"code": "1"}])
    with pytest.raises(KeyError):
        reg.extend("obs_hamd_totl", [{"system": "urn:x", "code": "1"}])


# -- loading custom directories and refusals ---------------------------------------------------------

GOOD = """
valuesets:
  demo_set:
    title: Demo
    verification: verified
    source: test
    include:
      - system: http://snomed.info/sct
        concepts:
          - {code: "123", display: "one two three"}
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_custom_directory_uses_packaged_rxnorm_map(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", GOOD)
    write(
        tmp_path,
        "b.yaml",
        """
        valuesets:
          demo_meds:
            title: Demo meds
            verification: verified
            source: test
            include:
              - system: http://www.nlm.nih.gov/research/umls/rxnorm
                match: ingredient
                concepts: [{code: "36437", display: sertraline}]
          demo_gap:
            title: Nothing verified
            verification: gap
            source: searched
            include: []
        """,
    )
    reg = ValueSetRegistry.load(tmp_path)
    assert reg.ids() == ["demo_gap", "demo_meds", "demo_set"]
    assert reg.get("demo_meds").match_coding(coding(RXNORM, "312941")) is not None
    assert len(reg.get("demo_gap")) == 0
    assert reg.get("demo_gap").match_concept({"text": "anything"}) is None


def test_fingerprint_changes_with_file_content(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", GOOD)
    first = ValueSetRegistry.load(tmp_path).fingerprint
    write(tmp_path, "a.yaml", GOOD.replace('"123"', '"124"'))
    assert ValueSetRegistry.load(tmp_path).fingerprint != first


BAD_CASES = {
    "unknown set key": (
        """
        valuesets:
          bad_one:
            title: T
            verification: verified
            source: s
            colour: red
            include: []
        """,
        "bad_one",
        "unknown key",
    ),
    "unknown include key": (
        """
        valuesets:
          bad_two:
            title: T
            verification: verified
            source: s
            include:
              - system: http://snomed.info/sct
                filter: x
                concepts: [{code: "1"}]
        """,
        "bad_two",
        "unknown key",
    ),
    "prefixes without match prefix": (
        """
        valuesets:
          bad_three:
            title: T
            verification: verified
            source: s
            include:
              - system: http://hl7.org/fhir/sid/icd-10-cm
                prefixes: ["F32"]
                concepts: [{code: "F32.0"}]
        """,
        "bad_three",
        "prefixes",
    ),
    "empty system": (
        """
        valuesets:
          bad_four:
            title: T
            verification: verified
            source: s
            include:
              - system: ""
                concepts: [{code: "1"}]
        """,
        "bad_four",
        "system",
    ),
    "concept without code": (
        """
        valuesets:
          bad_five:
            title: T
            verification: verified
            source: s
            include:
              - system: http://snomed.info/sct
                concepts: [{display: "no code"}]
        """,
        "bad_five",
        "without 'code'",
    ),
    "unquoted numeric code": (
        """
        valuesets:
          bad_six:
            title: T
            verification: verified
            source: s
            include:
              - system: http://snomed.info/sct
                concepts: [{code: 12345}]
        """,
        "bad_six",
        "quoted string",
    ),
    "bad verification": (
        """
        valuesets:
          bad_seven:
            title: T
            verification: probably
            source: s
            include: []
        """,
        "bad_seven",
        "verification",
    ),
    "ingredient on a non-RxNorm system": (
        """
        valuesets:
          bad_eight:
            title: T
            verification: verified
            source: s
            include:
              - system: http://snomed.info/sct
                match: ingredient
                concepts: [{code: "1"}]
        """,
        "bad_eight",
        "ingredient",
    ),
    "prefix include without prefixes": (
        """
        valuesets:
          bad_nine:
            title: T
            verification: verified
            source: s
            include:
              - system: http://hl7.org/fhir/sid/icd-10-cm
                match: prefix
                concepts: [{code: "F32.0"}]
        """,
        "bad_nine",
        "prefixes",
    ),
    "empty set not marked gap": (
        """
        valuesets:
          bad_ten:
            title: T
            verification: verified
            source: s
            include: []
        """,
        "bad_ten",
        "gap",
    ),
    "missing source": (
        """
        valuesets:
          bad_eleven:
            title: T
            verification: gap
            include: []
        """,
        "bad_eleven",
        "source",
    ),
    "invalid NDC": (
        """
        valuesets:
          bad_twelve:
            title: T
            verification: verified
            source: s
            include:
              - system: http://hl7.org/fhir/sid/ndc
                concepts: [{code: "1234567890"}]
        """,
        "bad_twelve",
        "not a valid",
    ),
    "bad id": (
        """
        valuesets:
          Bad-Id:
            title: T
            verification: gap
            source: s
            include: []
        """,
        "Bad-Id",
        "lower_snake_case",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_files_raise_with_file_and_id(tmp_path: Path, case: str) -> None:
    text, vs_id, fragment = BAD_CASES[case]
    path = write(tmp_path, "bad.yaml", text)
    with pytest.raises(ValueSetError) as err:
        ValueSetRegistry.load(tmp_path)
    message = str(err.value)
    assert str(path) in message
    assert vs_id in message
    assert fragment in message


def test_duplicate_id_across_files(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", GOOD)
    write(tmp_path, "b.yaml", GOOD)
    with pytest.raises(ValueSetError, match=r"demo_set.*duplicate id.*a\.yaml") as err:
        ValueSetRegistry.load(tmp_path)
    assert "b.yaml" in str(err.value)


def test_duplicate_id_within_one_file(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", GOOD + GOOD.split("valuesets:\n", 1)[1])
    with pytest.raises(ValueSetError, match=r"a\.yaml.*duplicate key 'demo_set'"):
        ValueSetRegistry.load(tmp_path)


def test_file_level_refusals(tmp_path: Path) -> None:
    with pytest.raises(ValueSetError, match=r"no \*\.yaml"):
        ValueSetRegistry.load(tmp_path)
    with pytest.raises(ValueSetError, match="not found"):
        ValueSetRegistry.load(tmp_path / "missing")
    write(tmp_path, "a.yaml", "sets: {}\n")
    with pytest.raises(ValueSetError, match="valuesets"):
        ValueSetRegistry.load(tmp_path)
    write(tmp_path, "a.yaml", "valuesets: [unclosed\n")
    with pytest.raises(ValueSetError, match="YAML error"):
        ValueSetRegistry.load(tmp_path)


def test_broken_rxnorm_map_is_refused(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", GOOD)
    (tmp_path / "rxnorm_ingredients.json").write_text(json.dumps({"products": [{"rxcui": 1}]}), encoding="utf-8")
    with pytest.raises(ValueSetError, match=r"rxnorm_ingredients\.json"):
        ValueSetRegistry.load(tmp_path)


def test_shipped_files_reload_from_a_copy(tmp_path: Path) -> None:
    for path in PACKAGE_DIR.iterdir():
        shutil.copy(path, tmp_path / path.name)
    assert ValueSetRegistry.load(tmp_path).fingerprint == ValueSetRegistry.load().fingerprint


def test_levothyroxine_is_not_a_t3_augmentation(registry: ValueSetRegistry) -> None:
    """Levothyroxine (T4) for hypothyroidism must not count as thyroid hormone T3 augmentation (MGB 031
    criterion 4); a levothyroxine / liothyronine combination does contain T3."""
    rx = "http://www.nlm.nih.gov/research/umls/rxnorm"
    t3 = registry.get("med_augment_t3")
    assert t3.match_coding({"system": rx, "code": "966220"}) is None  # levothyroxine sodium 0.025 MG Oral Tablet
    assert t3.match_coding({"system": rx, "code": "224920"}) is None  # Synthroid
    assert t3.match_coding({"system": rx, "code": "10814"}) is not None  # liothyronine itself


# -- issue 8: every shape of a fact, negative answers kept apart from positive ones, the dose table ----------------

V3_INTERP = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
DOSING_FILE = PACKAGE_DIR.parent / "dosing" / "antidepressant_doses.yaml"


def _codes(registry: ValueSetRegistry, vs_id: str) -> set[tuple[str, str]]:
    return {(system, code) for system, code, _display in registry.get(vs_id).concepts()}


@pytest.mark.parametrize(
    "group",
    [
        ["ans_positive", "ans_negative", "ans_indeterminate"],
        ["ans_yes", "ans_no"],
        ["ans_pregnant", "ans_not_pregnant", "ans_possibly_pregnant", "ans_unknown"],
        ["ans_breastfeeding", "ans_not_breastfeeding"],
        ["ans_wants_pregnancy", "ans_no_pregnancy_intent", "ans_pregnancy_intent_unsure"],
        ["ans_medication_adherent", "ans_medication_nonadherent"],
        ["interp_positive", "interp_negative", "interp_indeterminate", "interp_high", "interp_low", "interp_normal"],
    ],
)
def test_positive_negative_and_unknown_answers_never_overlap(registry: ValueSetRegistry, group: list[str]) -> None:
    seen: dict[tuple[str, str], str] = {}
    for vs_id in group:
        for key in _codes(registry, vs_id):
            assert key not in seen, f"{key} is in both {seen[key]} and {vs_id}"
            seen[key] = vs_id


def test_the_answer_codes_the_brief_names_are_on_the_right_side(registry: ValueSetRegistry) -> None:
    def has(vs_id: str, system: str, code: str) -> bool:
        return registry.get(vs_id).match_coding(coding(system, code)) is not None

    assert has("ans_positive", LOINC, "LA6576-8") and has("ans_negative", LOINC, "LA6577-6")
    assert has("ans_positive", SNOMED, "10828004") and has("ans_negative", SNOMED, "260385009")
    assert has("ans_yes", LOINC, "LA33-6") and has("ans_no", LOINC, "LA32-8")
    assert has("ans_yes", SNOMED, "373066001") and has("ans_no", SNOMED, "373067005")
    assert has("ans_not_pregnant", SNOMED, "60001007") and not has("ans_pregnant", SNOMED, "60001007")
    for code in ("POS", "DET"):
        assert has("interp_positive", V3_INTERP, code)
    for code in ("NEG", "ND"):
        assert has("interp_negative", V3_INTERP, code)
    for vs_id, codes in {"interp_high": ("H", "HH"), "interp_low": ("L", "LL"), "interp_abnormal": ("A", "AA")}.items():
        assert all(has(vs_id, V3_INTERP, c) for c in codes), vs_id


def test_every_blood_pressure_panel_and_component_code(registry: ValueSetRegistry) -> None:
    panel = {code for _s, code in _codes(registry, "obs_bp_panel")}
    assert {"85354-9", "55284-4", "35094-2", "55417-0", "96607-7"} <= panel
    systolic = {code for _s, code in _codes(registry, "obs_bp_systolic")}
    diastolic = {code for _s, code in _codes(registry, "obs_bp_diastolic")}
    assert {"8480-6", "8459-0", "8460-8", "8461-6", "96608-5", "271649006"} <= systolic
    assert {"8462-4", "96609-3", "271650006"} <= diastolic
    assert not systolic & diastolic and not panel & (systolic | diastolic)


def test_phq2_is_never_a_phq9_total(registry: ValueSetRegistry) -> None:
    phq2 = coding(LOINC, "55758-7")
    assert registry.get("obs_phq2_total").match_coding(phq2) is not None
    for vs_id in ("obs_phq9_total", "obs_phq9_panel", "obs_phq9_item9"):
        assert registry.get(vs_id).match_coding(phq2) is None, vs_id
    assert registry.get("obs_phq9_total").match_coding(coding(LOINC, "44261-6")) is not None
    assert registry.get("obs_phq9_panel").match_coding(coding(LOINC, "44249-1")) is not None


def test_pregnancy_tests_split_into_qualitative_and_quantitative(registry: ValueSetRegistry) -> None:
    allt = _codes(registry, "obs_pregnancy_test")
    qual = _codes(registry, "obs_pregnancy_test_qualitative")
    quant = _codes(registry, "obs_pregnancy_test_quantitative")
    assert qual <= allt and quant <= allt and not qual & quant
    assert (LOINC, "2106-3") in qual and (LOINC, "2118-8") in qual
    assert {(LOINC, "21198-7"), (LOINC, "19080-1"), (LOINC, "2119-6")} <= quant
    assert allt - qual - quant == {(LOINC, "55870-0")}  # cord blood: the newborn's specimen, not the patient's test


def test_psychiatric_aprn_holds_only_psychiatric_specialties(registry: ValueSetRegistry) -> None:
    psych, generic = registry.get("prac_aprn_psychiatric"), registry.get("prac_aprn")
    for code in ("363LF0000X", "363L00000X", "364S00000X", "363LP2300X", "367500000X"):
        assert psych.match_coding(coding(NUCC, code)) is None, code
        assert generic.match_coding(coding(NUCC, code)) is not None, code
    codes = _codes(registry, "prac_aprn_psychiatric")
    assert (NUCC, "363LP0808X") in codes and (NUCC, "364SP0808X") in codes
    assert all(generic.match_coding(coding(system, code)) is not None for system, code in codes)
    assert all(code.startswith(("363LP08", "364SP08")) for _s, code in codes)


def test_licensed_mental_health_covers_the_named_licences(registry: ValueSetRegistry) -> None:
    lmh = registry.get("prac_licensed_mental_health")
    for code in ("1041C0700X", "101YP2500X", "106H00000X", "103T00000X", "103TC0700X"):
        assert lmh.match_coding(coding(NUCC, code)) is not None, code
    for code in ("363LF0000X", "101YS0200X", "1041S0200X"):  # family NP, school counsellor, school social worker
        assert lmh.match_coding(coding(NUCC, code)) is None, code


def test_other_indications_are_not_depression(registry: ValueSetRegistry) -> None:
    other, mdd = registry.get("dx_non_depression_indication"), registry.get("dx_mdd")
    for code in ("G43.909", "G43009", "F17.210", "G47.00", "M79.7", "E11.42", "N39.44", "N95.1", "E03.9"):
        assert other.match_coding(coding(ICD10CM, code)) is not None, code
        assert mdd.match_coding(coding(ICD10CM, code)) is None, code
    for code in ("F33.2", "F32.9", "F41.1", "F42.2", "F43.10"):  # depression, and the ambiguous anxiety/OCD/PTSD
        assert other.match_coding(coding(ICD10CM, code)) is None, code
    assert other.match_text("amitriptyline 10 mg at night for migraine") is not None


def test_ketamine_nonpsychiatric_reasons_exclude_psychiatric_ones(registry: ValueSetRegistry) -> None:
    nonpsych = registry.get("dx_ketamine_nonpsychiatric_indication")
    for code in ("G89.18", "S72.001A", "R45.1", "J45.902"):
        assert nonpsych.match_coding(coding(ICD10CM, code)) is not None, code
    for code in ("R45.851", "F33.2", "F32.A", "F43.10"):
        assert nonpsych.match_coding(coding(ICD10CM, code)) is None, code
    sedation = registry.get("proc_anaesthesia_sedation")
    for system, code in ((CPT, "99152"), (SNOMED, "314271007"), (SNOMED, "50697003")):
        assert sedation.match_coding(coding(system, code)) is not None, code
    assert sedation.match_coding(coding(CPT, "96365")) is None  # the IV-ketamine infusion itself is not sedation
    assert registry.get("encounter_class_emergency").match_coding(coding(V3_ACTCODE, "EMER")) is not None


def test_not_cleared_text_is_a_local_default_with_patterns(registry: ValueSetRegistry) -> None:
    vs = registry.get("ans_not_cleared")
    assert vs.verification == "local-default" and vs.site_configurable
    assert vs.match_text("Patient NOT cleared for ketamine by cardiology") is not None
    assert vs.match_text("Cleared for IV ketamine") is None


# -- the dose table (fhir_mappings/dosing/antidepressant_doses.yaml) ------------------------------------------------

ANTIDEPRESSANT_SETS = _words("""
med_ssri med_snri med_tca med_maoi med_mirtazapine med_bupropion med_other_antidepressant med_augment_lithium
med_augment_atypical_antipsychotic med_augment_t3
""")
DOSE_ROW_KEYS = frozenset(
    _words(
        "rxcui name class role valueset min_daily_mg route min_serum_meq_l source source_keys verification"
        " other_indication note"
    )
)


@pytest.fixture(scope="module")
def doses() -> dict:
    import yaml

    with DOSING_FILE.open(encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def test_dose_table_loads_with_the_engine_loader() -> None:
    from fhir_mappings.doses import load_dose_table

    table = load_dose_table(DOSING_FILE.stem)
    sertraline = table.minimum("36437", None, "antidepressant")
    assert sertraline is not None and sertraline.min_daily_mg == 50 and "ATRQ" in sertraline.source
    assert sertraline.note == ""  # never the string "None"
    salt = table.minimum(None, "lithium carbonate 300 MG Oral Capsule", "augmentation")
    assert salt is not None and salt.min_daily_mg == 600
    gap = table.minimum("1040028", None, "augmentation")  # lurasidone: a row without a dose -> unknown
    assert gap is not None and gap.min_daily_mg is None and gap.source.startswith("GAP")
    assert table.minimum("51272", None, "antidepressant") is None  # quetiapine is only an augmenting agent here


def _dose_rows(doses: dict) -> list[dict]:
    return [*doses["ingredients"], *doses["name_only_ingredients"]]


def test_dose_table_rows_are_regular_and_sourced(doses: dict, registry: ValueSetRegistry) -> None:
    assert doses["version"] == 1
    sources = doses["sources"]
    for row in _dose_rows(doses):
        assert set(row) == DOSE_ROW_KEYS, row["name"]
        assert row["role"] in {"antidepressant", "augmentation"}, row["name"]
        assert row["verification"] in {"verified", "secondary", "unverified", "gap"}, row["name"]
        assert isinstance(row["source"], str) and row["source"].strip(), row["name"]
        assert isinstance(row["note"], str), row["name"]
        assert all(key in sources for key in row["source_keys"]), row["name"]
        dose = row["min_daily_mg"]
        if row["verification"] == "gap":
            assert dose is None and row["source_keys"] == [] and row["source"].startswith("GAP"), row["name"]
        else:
            assert isinstance(dose, (int, float)) and dose > 0 and row["source_keys"], row["name"]
        vs = registry.get(row["valueset"])
        if row["rxcui"] is not None:
            assert isinstance(row["rxcui"], str)
            assert vs.match_coding(coding(RXNORM, row["rxcui"])) is not None, row["name"]
        else:  # no verified RxCUI: the set must still find the drug by its name
            assert vs.match_text(row["name"]) is not None, row["name"]
        if row["min_serum_meq_l"] is not None:
            assert row["class"] == "lithium"
    assert all(row["rxcui"] is not None for row in doses["ingredients"])  # the loader needs one
    assert all(row["rxcui"] is None for row in doses["name_only_ingredients"])


def test_dose_table_covers_every_antidepressant_and_augmenting_drug(doses: dict, registry: ValueSetRegistry) -> None:
    rows = {row["rxcui"] for row in doses["ingredients"]}
    missing = [
        (vs_id, code, display)
        for vs_id in ANTIDEPRESSANT_SETS
        for _system, code, display in registry.get(vs_id).concepts()
        if code not in rows
    ]
    assert missing == []
    by_name = {row["name"]: row for row in _dose_rows(doses)}
    assert by_name["sertraline"]["min_daily_mg"] == 50 and by_name["venlafaxine"]["min_daily_mg"] == 150
    assert by_name["amitriptyline"]["min_daily_mg"] == 150 and by_name["trazodone"]["min_daily_mg"] == 300
    assert by_name["quetiapine"]["min_daily_mg"] == 150 and by_name["selegiline"]["route"] == "transdermal"
    assert by_name["lithium"]["min_serum_meq_l"] == 0.5 and by_name["liothyronine"]["min_daily_mg"] == 0.025
    assert {"amoxapine", "maprotiline"} <= set(by_name)


def test_ketamine_dose_bands_and_context_codes(doses: dict, registry: ValueSetRegistry) -> None:
    ket = doses["ketamine"]
    assert registry.get("order_ketamine").match_coding(coding(RXNORM, ket["rxcui"]["ketamine"])) is not None
    assert registry.get("order_esketamine").match_coding(coding(RXNORM, ket["rxcui"]["esketamine"])) is not None
    assert (ket["anesthesia_cpt_range"]["from"], ket["anesthesia_cpt_range"]["to"]) == ("00100", "01999")
    bands = {(b["purpose"], b["route"]): b for b in ket["dose_bands"]}
    psych, anaesthesia = bands[("psychiatric", "intravenous")], bands[("anesthesia", "intravenous")]
    assert psych["dose_mg_per_kg"]["typical"] == 0.5 and anaesthesia["dose_mg_per_kg"]["min"] == 1.0
    assert all(key in doses["sources"] for b in ket["dose_bands"] for key in b["source_keys"])
    assert all(key in doses["sources"] for p in doses["product_notes"] for key in p["source_keys"])


# -- codes the issue-8 fidelity corpus sends that had no value set -------------------------------------------------


def test_phq9_items_are_the_nine_panel_members_with_scored_answers(registry: ValueSetRegistry) -> None:
    items = registry.get("obs_phq9_items")
    assert len(items) == 9
    assert items.match_coding(coding(LOINC, "44260-8")) is not None  # item 9 is also obs_phq9_item9
    for code in ("44261-6", "44249-1", "55758-7"):  # the total, the panel and PHQ-2 are not items
        assert items.match_coding(coding(LOINC, code)) is None, code
    answers = registry.get("ans_phq9_item_frequency")
    assert {code for _system, code, _display in answers.concepts()} == {"LA6568-5", "LA6569-3", "LA6570-1", "LA6571-9"}


def test_no_known_allergy_is_not_a_ketamine_allergy(registry: ValueSetRegistry) -> None:
    none_known, ketamine = registry.get("allergy_none_known"), registry.get("allergy_ketamine")
    for code in ("409137002", "716186003"):
        assert none_known.match_coding(coding(SNOMED, code)) is not None, code
        assert ketamine.match_coding(coding(SNOMED, code)) is None, code
    assert none_known.match_text("NKDA") is not None


def test_pregnancy_potential_sets_keep_possible_pregnancy_out(registry: ValueSetRegistry) -> None:
    no_potential = registry.get("dx_no_pregnancy_potential")
    assert no_potential.match_coding(coding(ICD10CM, "Z90.710")) is not None
    for code in ("Z90.712", "Z90.721", "Z97.5", "Z33.1"):  # cervix only, one ovary, IUD, pregnant state
        assert no_potential.match_coding(coding(ICD10CM, code)) is None, code
    contraception = registry.get("dx_contraception")
    assert contraception.match_coding(coding(ICD10CM, "Z97.5")) is not None
    assert contraception.match_coding(coding(ICD10CM, "Z30.011")) is not None
    assert contraception.match_coding(coding(ICD10CM, "Z90.710")) is None


def test_lab_and_vital_sets_hold_the_codes_the_corpus_sends(registry: ValueSetRegistry) -> None:
    for vs_id, code in (
        ("obs_lithium_level", "14334-7"),
        ("obs_tsh", "3016-3"),
        ("obs_free_t4", "3024-7"),
        ("obs_heart_rate", "8867-4"),
    ):
        assert registry.get(vs_id).match_coding(coding(LOINC, code)) is not None, vs_id
    assert registry.get("obs_tsh").match_coding(coding(LOINC, "3024-7")) is None
