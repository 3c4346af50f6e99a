"""The CDS Hooks sandbox web app's side of the sandbox: launch URLs, the medication-list patch, the cached build,
the static site, the open FHIR server and the shipped trusted-issuers file for the app's public key."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import jwt
import pytest
import requests

from cds_service.auth import AuthError, JwtVerifier, TrustedIssuers
from sandbox.cli import main
from sandbox.fhir_server import FhirServerError, FhirServerProcess
from sandbox.scenarios import load_all
from sandbox.web_app import (
    KETAMINE_MEDICATIONS,
    MEDICATION_LIST,
    StaticSite,
    WebAppError,
    build_app,
    launch_url,
    patch_medication_list,
    scenario_links,
    source_digest,
)
from tests.e2e.sandbox_app_e2e import find_app_source

ISSUERS_FILE = Path(__file__).parents[2] / "sandbox" / "cds-hooks-sandbox-issuers.json"
APP_ISS = "https://sandbox.cds-hooks.org"
APP_KID = "44823f3d-0b01-4a6c-a80e-b9d3e8a7226f"  # the kid the app puts in every JWT header (jwt-generator.js)
APP_JKU = "https://sandbox.cds-hooks.org/.well-known/jwks.json"
MINI_LIST = (
    "const rxnorm = {\n  cuiToName: {\n    1: 'x',\n  },\n  pillToComponentSets: {\n  },\n"
    "  componentSetsToPrescribables: {\n  },\n};\nexport default rxnorm;\n"
)


# ------------------------------------------------------------------ launch URLs


def test_launch_url_carries_the_apps_parameters() -> None:
    url = launch_url(
        "http://127.0.0.1:8080/",
        fhir_server="http://127.0.0.1:8090/fhir",
        patient_id="sc-mla",
        discovery_url="http://127.0.0.1:8765/cds-services",
    )
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc, parts.path) == ("http", "127.0.0.1:8080", "/")
    assert parse_qs(parts.query) == {
        "fhirServiceUrl": ["http://127.0.0.1:8090/fhir"],
        "patientId": ["sc-mla"],
        "serviceDiscoveryURL": ["http://127.0.0.1:8765/cds-services"],
        "hook": ["order-sign"],
        "screen": ["rx-sign"],
    }


def test_scenario_links_cover_every_story_patient_but_no_background_patient() -> None:
    scenarios = load_all()
    links = scenario_links(scenarios, app_url="http://a/", fhir_server="http://f/fhir", discovery_url="http://s")
    stories = [s for s in scenarios if not s.background]
    assert sorted(link.patient_id for link in links) == sorted(s.patient_id for s in stories)
    by_id = {link.scenario_id: link for link in links}
    assert by_id["mgb-031-initial-likely-authorized"].patient_id == "sc-mla"
    assert by_id["mgb-031-initial-likely-authorized"].expected == "likely-authorized"
    assert by_id["non-ketamine-lithium-no-cards"].expected == "no cards"
    assert all("patientId=" + link.patient_id in link.url for link in links)


def test_web_app_urls_command_prints_a_url_per_scenario_patient(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sandbox", "web-app-urls", "--fhir-server", "http://127.0.0.1:8090/fhir/"]) == 0
    out = capsys.readouterr().out
    assert "first 20 patients" in out and "no route, requester or performer" in out
    expected = (
        "http://127.0.0.1:8080/?fhirServiceUrl=http://127.0.0.1:8090/fhir&patientId=sc-mla"
        "&serviceDiscoveryURL=http://127.0.0.1:8765/cds-services&hook=order-sign&screen=rx-sign"
    )
    lines = out.splitlines()
    heading = next(i for i, line in enumerate(lines) if "(patient sc-mla;" in line)
    assert lines[heading + 1].strip() == expected


# ------------------------------------------------------------------ the medication list


def test_patch_adds_each_medication_to_the_three_maps() -> None:
    patched = patch_medication_list(MINI_LIST)
    assert "    238082: 'ketamine 10 MG/ML Injectable Solution'," in patched
    assert "    6130: [['330467'], ['330468'], ['328379']]," in patched
    assert "    330467: ['238082']," in patched
    assert "    2119381: 'esketamine 140 MG/ML Nasal Spray'," in patched
    assert patched.count("6130:") == 2  # one name, one pill: an ingredient is listed once however many strengths


def test_patch_refuses_a_list_of_another_shape() -> None:
    with pytest.raises(WebAppError, match="changed shape"):
        patch_medication_list(MINI_LIST.replace("pillToComponentSets", "pills"))


@pytest.mark.skipif(shutil.which("node") is None or find_app_source() is None, reason="needs node and the app source")
def test_patched_real_list_offers_ketamine_the_way_the_app_searches_it(tmp_path: Path) -> None:
    """The app's own search (medication-reducers.js: component sets → prescribables, word-start match) finds it."""
    source = find_app_source()
    assert source is not None
    module = tmp_path / "medication-list.mjs"
    module.write_text(patch_medication_list((source / MEDICATION_LIST).read_text(encoding="utf-8")), "utf-8")
    script = f"""
import rxnorm from {json.dumps(module.as_uri())};
const found = [];
for (const pill of Object.keys(rxnorm.pillToComponentSets))
  for (const set of rxnorm.pillToComponentSets[pill])
    for (const id of rxnorm.componentSetsToPrescribables[set.join(',')] || [])
      if (/(?:^|\\s)ketamine/i.test(rxnorm.cuiToName[id]) && /(?:^|\\s)10/i.test(rxnorm.cuiToName[id])) found.push(id);
console.log(JSON.stringify(found));
"""
    done = subprocess.run(["node", "--input-type=module", "-e", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == ["238082", "238083"]  # "ketamine 10" also lists 100 MG/ML, as in the app


# ------------------------------------------------------------------ the cached build


def _fake_app(root: Path) -> Path:
    (root / MEDICATION_LIST).parent.mkdir(parents=True)
    (root / MEDICATION_LIST).write_text(MINI_LIST, encoding="utf-8")
    (root / "package.json").write_text('{"name": "fake"}', encoding="utf-8")
    (root / "package-lock.json").write_text('{"lockfileVersion": 3}', encoding="utf-8")
    for path in (root, root / "src", root / "src/assets"):
        path.chmod(stat.S_IRUSR | stat.S_IXUSR)  # read-only, as ../shared is
    return root


@pytest.fixture
def fake_npm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An `npm` that logs its arguments and, for `run build`, writes build/index.html with the patched list."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "npm.log"
    npm = bin_dir / "npm"
    npm.write_text(
        f"#!{sys.executable}\n"
        "import pathlib, sys\n"
        f"open({str(log)!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')\n"
        "if sys.argv[1:3] == ['run', 'build']:\n"
        "    pathlib.Path('build').mkdir(exist_ok=True)\n"
        "    text = pathlib.Path('src/assets/medication-list.js').read_text()\n"
        "    pathlib.Path('build/index.html').write_text(text)\n"
        "if sys.argv[1] == 'ci':\n"
        "    pathlib.Path('node_modules').mkdir(exist_ok=True)\n",
        encoding="utf-8",
    )
    npm.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return log


def test_build_is_patched_cached_and_npm_ci_runs_once_per_lock_file(tmp_path: Path, fake_npm: Path) -> None:
    source = _fake_app(tmp_path / "app")
    try:
        cache = tmp_path / "cache"
        build = build_app(source, cache)
        assert "ketamine 10 MG/ML Injectable Solution" in (build / "index.html").read_text(encoding="utf-8")
        assert fake_npm.read_text().splitlines() == ["ci --no-audit --no-fund", "run build"]
        assert build_app(source, cache) == build  # same source: the cached build, no npm at all
        assert len(fake_npm.read_text().splitlines()) == 2
        (source / "src").chmod(0o755)
        (source / "src" / "extra.js").write_text("// changed", encoding="utf-8")
        rebuilt = build_app(source, cache)  # changed source, same lock file: build again, keep node_modules
        assert rebuilt != build and not build.exists()
        assert fake_npm.read_text().splitlines()[2:] == ["run build"]
        assert (source / MEDICATION_LIST).read_text(encoding="utf-8") == MINI_LIST  # the source is never written
    finally:
        for path in (source, source / "src", source / "src/assets"):
            path.chmod(0o755)


def test_source_digest_ignores_node_modules_and_build(tmp_path: Path) -> None:
    source = tmp_path / "app"
    (source / "src").mkdir(parents=True)
    (source / "src" / "a.js").write_text("a", encoding="utf-8")
    before = source_digest(source)
    for ignored in ("node_modules", "build"):
        (source / ignored).mkdir()
        (source / ignored / "x.js").write_text("x", encoding="utf-8")
    assert source_digest(source) == before
    (source / "src" / "a.js").write_text("b", encoding="utf-8")
    assert source_digest(source) != before


def test_build_refuses_a_folder_that_is_not_the_app(tmp_path: Path) -> None:
    with pytest.raises(WebAppError, match="does not look like"):
        build_app(tmp_path, tmp_path / "cache")


def test_static_site_serves_the_build_on_loopback(tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("<html>app</html>", encoding="utf-8")
    with StaticSite(tmp_path) as site:
        assert site.url.startswith("http://127.0.0.1:")
        response = requests.get(site.url + "?patientId=sc-mla", timeout=5)
        assert response.status_code == 200 and response.text == "<html>app</html>"


def test_rx_sign_medications_are_in_the_services_ketamine_value_sets() -> None:
    orders = (Path(__file__).parents[2] / "fhir_mappings" / "valuesets" / "orders.yaml").read_text(encoding="utf-8")
    for medication in KETAMINE_MEDICATIONS:
        assert f'code: "{medication.rxcui}"' in orders, medication


# ------------------------------------------------------------------ the open FHIR server


@pytest.mark.fhir_server
def test_open_fhir_server_answers_without_a_token_on_loopback_only() -> None:
    with FhirServerProcess(open_access=True).start() as server:
        assert server.token is None and server.base_url.startswith("http://127.0.0.1:")
        response = requests.get(f"{server.base_url}/Patient", headers={"Accept": "application/fhir+json"}, timeout=5)
        assert response.status_code == 200 and response.json()["resourceType"] == "Bundle"
        assert (
            "Access-Control-Allow-Origin"
            in requests.get(
                f"{server.base_url}/metadata", headers={"Origin": "http://127.0.0.1:8080"}, timeout=5
            ).headers
        )  # the app calls it from the browser


def test_open_fhir_server_takes_no_token() -> None:
    with pytest.raises(FhirServerError, match="no token"):
        FhirServerProcess(open_access=True).start(token="secret")


@pytest.mark.fhir_server
def test_server_command_open_prints_no_token_and_the_launch_urls() -> None:
    command = subprocess.Popen(
        [sys.executable, "-m", "sandbox.cli", "sandbox", "server", "--open"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert command.stdout is not None
        base_line = command.stdout.readline()
        assert base_line.startswith("FHIR base URL: http://127.0.0.1:"), base_line
        base = base_line.split(":", 1)[1].strip()
        assert command.stdout.readline().startswith("bearer token:  none (open server")
        lines = [command.stdout.readline() for _ in range(8)]
        text = "".join(lines)
        assert "add --load" in text and f"fhirServiceUrl={base}&patientId=" in text
        assert requests.get(f"{base}/Patient", timeout=5).status_code == 200
    finally:
        command.terminate()
        command.wait(timeout=15)


# ------------------------------------------------------------------ the app's key, inline


def test_shipped_issuers_file_holds_the_apps_public_key_inline() -> None:
    issuers = TrustedIssuers.load(ISSUERS_FILE)  # the loader refuses private key members
    issuer = issuers.get(APP_ISS)
    assert issuer is not None and issuer.jwks_url is None and issuer.jwks is not None
    (key,) = issuer.jwks["keys"]
    assert key["kid"] == APP_KID and key["kty"] == "EC" and key["crv"] == "P-384" and "d" not in key
    assert issuer.jku == (APP_JKU,)  # the app's jku header stays allow-listed (it is never fetched)
    assert "http://127.0.0.1:8090/fhir" in issuer.fhir_servers  # the README walkthrough's open server


def _app_private_key() -> str:
    source = find_app_source()
    path = source / "keys" / "ecprivkey.pem" if source else None
    if path is None or not path.is_file():
        pytest.skip("the app's (public) private key is in its source, ../shared/clients/cds-hooks-sandbox/keys")
    return path.read_text(encoding="utf-8")


class _Offline(requests.Session):
    def get(self, *_args: object, **_kwargs: object) -> requests.Response:  # type: ignore[override]
        raise requests.ConnectionError("offline")


def _app_token(private_key: str, aud: str, jku: str = APP_JKU) -> str:
    now = int(time.time())
    claims = {"iss": APP_ISS, "aud": aud, "exp": now + 300, "iat": now, "jti": str(uuid.uuid4())}
    return jwt.encode(claims, private_key, algorithm="ES384", headers={"kid": APP_KID, "jku": jku, "typ": "JWT"})


def test_a_token_signed_like_the_app_verifies_offline_and_the_jku_allow_list_holds() -> None:
    private_key = _app_private_key()
    verifier = JwtVerifier(TrustedIssuers.load(ISSUERS_FILE), session=_Offline())
    aud = "http://127.0.0.1:8765/cds-services"
    assert verifier.verify(f"Bearer {_app_token(private_key, aud)}", aud).iss == APP_ISS
    with pytest.raises(AuthError, match="jku not allow-listed"):
        verifier.verify(f"Bearer {_app_token(private_key, aud, jku='https://evil.example/jwks.json')}", aud)
