"""Nomad's CLI habits: -json / -t '<go template>', -region and $NOMAD_REGION, -no-color,
``version``, ``node status -self -short -os -allocs``, and the Go-template subset itself."""

from __future__ import annotations

import json

import pytest

from nomad_client.cli.gotemplate import TemplateError, render
from tests.unit.test_cli import Nomad, cli, register_other_nodes, run

DATA = {"ID": "abc", "Items": {"b": "2", "a": "1"}, "Empty": [],
        "Nodes": [{"Name": "x", "Count": 3}, {"Name": "y", "Count": 0}]}


# ---- the template subset ------------------------------------------------------------------

@pytest.mark.parametrize(("template", "expected"), [
    ("{{ .ID }}-{{.Items.a}}", "abc-1"),
    ("{{ .Missing }} {{ .Items }}", "<no value> map[a:1 b:2]"),
    ('{{ index .Items "b" }}', "2"),
    ("{{ range .Nodes }}{{ .Name }};{{ end }}", "x;y;"),
    ("{{ range .Items }}{{ . }}{{ end }}", "12"),
    ("{{ range .Empty }}x{{ else }}none{{ end }}", "none"),
    ("{{ range .Nodes }}{{ if .Count }}{{ .Name }}{{ else }}-{{ end }}{{ end }}", "x-"),
    ("{{ if .Empty }}a{{ else if .ID }}b{{ else }}c{{ end }}", "b"),
    ("{{ if .Empty }}a{{ else if .Missing }}b{{ else }}c{{ end }}", "c"),
    ('{{ printf "%-3s|%03d|%q|%v" .ID 7 .ID true }}', 'abc|007|"abc"|true'),
    ("{{ json .Nodes }}", '[{"Name":"x","Count":3},{"Name":"y","Count":0}]'),
    ("{{ len .Nodes }} {{ .Items | len }} {{ len .ID }}", "2 2 3"),
    ("a\n  {{- .ID -}}\n  b", "aabcb"),
])
def test_template_subset(template: str, expected: str) -> None:
    assert render(template, DATA) == expected


@pytest.mark.parametrize(("template", "problem"), [
    ("{{ $x := .ID }}", "Unsupported template action"),
    ("{{ with .ID }}x{{ end }}", "Unsupported template action"),
    ("{{ sprig_upper .ID }}", "Unsupported template action"),
    ("{{ (len .ID) }}", "Unsupported template action"),
    ("{{ .ID", "unclosed action"),
    ("{{ if .ID }}x", "unclosed {{ if }}"),
    ("{{ end }}", "unexpected {{ end }}"),
    ("{{ range .ID }}x{{ end }}", "range can't iterate"),
])
def test_template_outside_the_subset_is_refused(template: str, problem: str) -> None:
    with pytest.raises(TemplateError, match=problem.replace("{", r"\{").replace("}", r"\}")):
        render(template, DATA)


# ---- flags against a real agent -------------------------------------------------------------

async def test_json_and_template_output(capsys: pytest.CaptureFixture[str],
                                        nomad: Nomad) -> None:
    code, out, _ = await cli(capsys, "node", "status", "-json")
    assert code == 0
    assert [n["ID"] for n in json.loads(out)] == [nomad.client.node_id]
    assert out.startswith("[\n    {")  # Nomad indents by four spaces

    code, out, _ = await cli(capsys, "node", "status", "-t", "{{ range . }}{{ .Name }}{{ end }}")
    assert (code, out) == (0, "client-1\n")

    code, out, _ = await cli(capsys, "node", "status", "-self", "-t", "{{ .ID }}")
    assert (code, out) == (0, f"{nomad.client.node_id}\n")

    code, out, _ = await cli(capsys, "namespace", "list", "-t", "{{ range . }}{{ .Name }}{{ end }}")
    assert (code, out) == (0, "default\n")

    code, _, err = await cli(capsys, "node", "status", "-json", "-t", "{{ . }}")
    assert code == 1 and "Both json and template formatting are not allowed" in err

    code, _, err = await cli(capsys, "node", "status", "-t", "{{ with . }}{{ end }}")
    assert code == 1 and "Unsupported template action {{ with . }}" in err


async def test_region_flag_and_environment(capsys: pytest.CaptureFixture[str], nomad: Nomad,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    region = nomad.server.region
    code, _, _ = await cli(capsys, "node", "status", "-region", region, "-no-color")
    assert code == 0
    assert nomad.seen[-1].query.get("region") == region

    code, _, err = await cli(capsys, "node", "status", "-region", "elsewhere")
    assert code == 1 and "No path to region" in err

    monkeypatch.setenv("NOMAD_REGION", "elsewhere")
    code, _, err = await cli(capsys, "node", "status")
    assert code == 1 and "No path to region" in err
    code, _, _ = await cli(capsys, "node", "status", "-region", region)  # the flag wins
    assert code == 0


async def test_node_status_self_short_os_allocs(capsys: pytest.CaptureFixture[str],
                                                nomad: Nomad) -> None:
    await register_other_nodes(nomad)
    own = nomad.client.node_id
    code, out, _ = await cli(capsys, "node", "status", "-self", "-short")
    lines = out.splitlines()
    assert code == 0 and lines[0] == f"ID            = {own[:8]}"
    assert "Meta" not in lines and "Allocations" not in lines

    code, out, _ = await cli(capsys, "node", "status", "-self")
    assert code == 0 and "Allocations" in out.splitlines()

    code, out, _ = await cli(capsys, "node", "status", "-os", "-allocs")
    header, *rows = out.splitlines()
    assert code == 0
    assert header.split() == ["ID", "Node", "Pool", "DC", "Name", "Class", "OS", "Drain",
                              "Eligibility", "Status", "Running", "Allocs"]
    mine = next(row for row in rows if row.startswith(own[:8]))
    assert mine.split()[-1] == "0"
    assert nomad.queries("/v1/nodes")[-1].get("os") == "true"

    code, _, err = await cli(capsys, "node", "status", "-self", own)
    assert code == 1 and "-self" in err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "version")
    assert code == 0 and out.startswith("Nomad v")


@pytest.mark.parametrize("argv", [["node", "status", "-v"], ["alloc", "status", "-t", "x", "-v",
                                                              "abc"]])
def test_abbreviated_flags_are_refused(capsys: pytest.CaptureFixture[str],
                                       argv: list[str]) -> None:
    code, _, err = run(capsys, *argv)
    assert code == 1 and "unrecognized arguments: -v" in err


def test_a_task_is_named_or_the_only_one_and_checked_with_nomads_words() -> None:
    # logs, fs and exec choose their task the same way alloc restart and signal check it.
    from nomad_client.cli.alloc import alloc_task
    from nomad_client.cli.common import CommandError

    two = {"ID": "0123456789", "TaskGroup": "g",
           "Job": {"TaskGroups": [{"Name": "g", "Tasks": [{"Name": "u"}, {"Name": "t"}]}]}}
    one = {"ID": "0123456789", "TaskStates": {"only": {}}}
    assert alloc_task(two, "t", []) == "t"
    assert alloc_task(two, None, ["u"]) == "u"
    assert alloc_task(two, "t", ["u"]) == "t"  # -task wins over the positional one
    assert alloc_task(one, None, []) == "only"
    with pytest.raises(CommandError) as named:
        alloc_task(two, "nope", [])
    assert str(named.value) == "Could not find task named: nope, found:\n  * t\n  * u"
    with pytest.raises(CommandError, match="Please specify the task"):
        alloc_task(two, None, [])
