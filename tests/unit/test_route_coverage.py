"""scripts/route_coverage.py: the template matcher, the reason table, and the check that keeps
its table of prefix sub-templates honest, on a tiny fake Nomad checkout."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "route_coverage.py"


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("route_coverage", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("route_coverage", module)
    spec.loader.exec_module(module)
    return module


rc = _load_script()

HTTP_GO = """package agent

func (s *HTTPServer) registerHandlers(enableDebug bool) {
\ts.mux.HandleFunc("/v1/jobs", s.wrap(s.JobsRequest))
\ts.mux.HandleFunc("/v1/job/", s.wrap(s.JobSpecificRequest))
\ts.mux.HandleFunc("GET /v1/volumes", s.wrap(s.ListVolumesRequest))
\ts.mux.Handle("/v1/var/", wrapCORSWithAllowedMethods(s.wrap(s.VariableSpecificRequest), "GET"))
\ts.mux.Handle("/ui/", http.StripPrefix("/ui/", s.handleUI()))
\ts.mux.Handle("/", s.handleRootFallthrough())
\ts.mux.HandleFunc("/debug/pprof/", pprof.Index)
}
"""

HTTP_CE_GO = """package agent

func (s *HTTPServer) registerEnterpriseHandlers() {
\ts.mux.HandleFunc("/v1/quotas", s.wrap(s.entOnly))
}
"""

JOB_ENDPOINT_GO = """package agent

func (s *HTTPServer) JobSpecificRequest(resp http.ResponseWriter, req *http.Request) (any, error) {
\tpath := strings.TrimPrefix(req.URL.Path, "/v1/job/")
\tswitch {
\tcase strings.HasSuffix(path, "/summary"):
\t\treturn s.jobSummaryRequest(resp, req, strings.TrimSuffix(path, "/summary"))
\tcase strings.HasSuffix(path, "/periodic/force"):
\t\treturn s.periodicForceRequest(resp, req, strings.TrimSuffix(path, "/periodic/force"))
\tdefault:
\t\treturn s.jobCRUD(resp, req, path)
\t}
}

func (s *HTTPServer) VariableSpecificRequest(resp http.ResponseWriter, req *http.Request) (any,
	error) {
\treturn s.variableQuery(resp, req, strings.TrimPrefix(req.URL.Path, "/v1/var/"))
}
"""

GOOD_TABLE = {
    "/v1/job/": (":id", ":id/summary", ":id/periodic/force"),
    "/v1/var/": (":path",),
}


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    agent = tmp_path / "command" / "agent"
    agent.mkdir(parents=True)
    (agent / "http.go").write_text(HTTP_GO)
    (agent / "http_ce.go").write_text(HTTP_CE_GO)
    (agent / "job_endpoint.go").write_text(JOB_ENDPOINT_GO)
    # A test file (read first, by name) must not be taken for the handler's source.
    (agent / "a_test.go").write_text('func (s *HTTPServer) JobSpecificRequest() {\n}\n')
    return tmp_path


def test_mux_patterns_name_their_handlers_and_skip_ui_and_debug(checkout: Path) -> None:
    patterns = rc.mux_patterns(checkout, "http.go", "registerHandlers")
    assert patterns == {
        "/v1/jobs": "JobsRequest",
        "/v1/job/": "JobSpecificRequest",
        "/v1/volumes": "ListVolumesRequest",
        "/v1/var/": "VariableSpecificRequest",
    }


def test_prefixes_expand_into_the_tabled_templates(checkout: Path) -> None:
    routes = rc.nomad_routes(checkout, GOOD_TABLE)
    assert routes.community == [
        "/v1/jobs", "/v1/job/:id", "/v1/job/:id/summary", "/v1/job/:id/periodic/force",
        "/v1/volumes", "/v1/var/:path",
    ]
    assert routes.enterprise == ["/v1/quotas"]
    assert routes.prefixes == ["/v1/job/", "/v1/var/"]


def test_a_tabled_literal_missing_from_the_handler_is_reported(checkout: Path) -> None:
    table = {**GOOD_TABLE, "/v1/job/": GOOD_TABLE["/v1/job/"] + (":id/versions",)}
    problems = rc.check_table(
        checkout, rc.mux_patterns(checkout, "http.go", "registerHandlers"), table)
    assert problems == ["/v1/job/:id/versions: versions no longer appears in JobSpecificRequest"]
    with pytest.raises(rc.TableRotError, match="versions no longer appears"):
        rc.nomad_routes(checkout, table)


def test_a_route_the_handler_dispatches_but_the_table_lacks_is_reported(checkout: Path) -> None:
    table = {**GOOD_TABLE, "/v1/job/": (":id", ":id/summary")}
    problems = rc.check_table(
        checkout, rc.mux_patterns(checkout, "http.go", "registerHandlers"), table)
    assert problems == ["/v1/job/: JobSpecificRequest dispatches on force, periodic, "
                        "which no tabled template has"]


def test_dispatch_segments_reads_suffixes_prefixes_cases_and_comparisons() -> None:
    source = """
    case strings.HasSuffix(path, "/dispatch/payload"):
    case strings.HasPrefix(path, "fail/"):
    case "create", "":
    if tokens[1] == "detach" || suffixParts[0] != "name" {
    """
    assert rc.dispatch_segments(source) == {"dispatch", "payload", "fail", "create", "detach",
                                            "name"}


def test_a_prefix_without_an_entry_and_a_stale_entry_are_reported(checkout: Path) -> None:
    table = {"/v1/job/": GOOD_TABLE["/v1/job/"], "/v1/gone/": (":id",)}
    problems = rc.check_table(
        checkout, rc.mux_patterns(checkout, "http.go", "registerHandlers"), table)
    assert "/v1/var/: mux prefix without a SUB_TEMPLATES entry" in problems
    assert "/v1/gone/: SUB_TEMPLATES entry for a prefix the mux no longer registers" in problems
    assert len(problems) == 2


def test_a_handler_missing_from_the_checkout_is_reported(checkout: Path) -> None:
    (checkout / "command" / "agent" / "job_endpoint.go").write_text("package agent\n")
    problems = rc.check_table(
        checkout, rc.mux_patterns(checkout, "http.go", "registerHandlers"), GOOD_TABLE)
    assert problems == [
        "/v1/job/: handler JobSpecificRequest not found in command/agent",
        "/v1/var/: handler VariableSpecificRequest not found in command/agent",
    ]


def test_the_real_table_is_well_formed() -> None:
    for prefix, suffixes in rc.SUB_TEMPLATES.items():
        assert prefix.startswith("/v1/") and prefix.endswith("/")
        assert suffixes and len(set(suffixes)) == len(suffixes)
        assert all(not s.startswith("/") and not s.endswith("/") for s in suffixes)
    reasons = [reason for reason, _ in rc.REASONS]
    assert len(set(reasons)) == len(reasons) and "unclassified" not in reasons


def test_placeholders_match_placeholders_whatever_their_names() -> None:
    templates = ["/v1/job/:id", "/v1/job/:id/summary", "/v1/var/:path", "/v1/acl/token/self"]
    ours = ["/v1/job/{job_id}", "/v1/var/{path*}", "/v1/acl/token/{accessor}"]
    assert rc.served(templates, ours) == ["/v1/job/:id", "/v1/var/:path"]
    assert rc.matching("/v1/job/{job_id}/summary", templates) == ["/v1/job/:id/summary"]


def test_literals_and_placeholders_do_not_stand_in_for_each_other() -> None:
    # Our catch-all does not serve Nomad's literal "self", nor our literal Nomad's ":id".
    assert rc.served(["/v1/acl/token/self"], ["/v1/acl/token/{accessor}"]) == []
    assert rc.served(["/v1/node/:id"], ["/v1/node/pools"]) == []
    # A route under a prefix does not serve the prefix's other templates.
    assert rc.served(["/v1/job/:id/plan"], ["/v1/job/{job_id}", "/v1/job/{job_id}/plan/x"]) == []


def test_prefix_fallbacks_are_told_apart_from_unknown_routes() -> None:
    prefixes = ["/v1/var/", "/v1/operator/keyring/", "/v1/acl/role/"]
    assert rc.is_prefix_fallback("/v1/var/", prefixes)
    assert rc.is_prefix_fallback("/v1/acl/role/name/", prefixes)
    assert rc.is_prefix_fallback("/v1/operator/keyring/{rest*}", prefixes)
    assert not rc.is_prefix_fallback("/v1/var/{path*}x", prefixes)
    assert not rc.is_prefix_fallback("/v1/made/up/", prefixes)


def test_reasons_match_exactly_or_by_star_and_the_rest_is_unclassified() -> None:
    assert rc.reason_for("/v1/search") == "search not built"
    assert rc.reason_for("/v1/deployment/fail/:id") == "deployments not built"
    assert rc.reason_for("/v1/operator/license") == "enterprise"
    assert rc.reason_for("/v1/nothing/like/it") == "unclassified"
    grouped = rc.by_reason(["/v1/nothing/like/it", "/v1/search", "/v1/agent/join"])
    assert list(grouped) == ["one in-process server: gossip/raft/autopilot/snapshot",
                             "search not built", "unclassified"]


def test_main_fails_loudly_when_the_table_rotted(
        checkout: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(rc, "SUB_TEMPLATES", {"/v1/job/": (":id/versions",)})
    monkeypatch.setattr(sys, "argv", ["route_coverage.py", str(checkout)])
    assert rc.main() == 2
    err = capsys.readouterr().err
    assert "versions no longer appears in JobSpecificRequest" in err
    assert "/v1/var/: mux prefix without a SUB_TEMPLATES entry" in err


def test_main_reports_the_count_and_groups_what_is_missing(
        checkout: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(rc, "SUB_TEMPLATES", GOOD_TABLE)
    monkeypatch.setattr(rc, "our_paths", lambda: ["/v1/jobs", "/v1/job/{job_id}",
                                                   "/v1/var/", "/v1/made/up"])
    monkeypatch.setattr(sys, "argv", ["route_coverage.py", str(checkout)])
    assert rc.main() == 0
    out = capsys.readouterr().out
    assert "Nomad templates we serve: 2 of 6 (33%)" in out
    assert "CSI/host volumes and plugins not built (1):\n    /v1/volumes" in out
    assert "unclassified (3):" in out
    assert "Ours, under no Nomad template:\n  /v1/made/up" in out
    assert "/v1/var/\n" not in out.split("Ours, under no Nomad template:")[1]
