"""Go-style flags: whole names only, never a prefix (Go's flag package has no abbreviations)."""

from __future__ import annotations

import pytest

from nomad_client.goflags import GoArgumentParser, UsageError


def _parser() -> GoArgumentParser:
    parser = GoArgumentParser("test")
    parser.add_flag("token")
    parser.add_flag("filter")
    parser.add_bool_flag("verbose")
    return parser


@pytest.mark.parametrize("argv", [["-t", "x"], ["-v"], ["-f", "y"], ["-verb"], ["-tok=x"],
                                  ["--verb"], ["-tokenx", "y"]])
def test_a_prefix_of_a_flag_is_not_that_flag(argv: list[str]) -> None:
    with pytest.raises(UsageError, match="unrecognized arguments"):
        _parser().parse(argv)


@pytest.mark.parametrize("argv", [["-token", "x"], ["-token=x"], ["--token=x"], ["--token", "x"]])
def test_whole_names_with_one_or_two_dashes(argv: list[str]) -> None:
    assert _parser().parse(argv).token == "x"


def test_a_short_flag_is_only_itself_when_a_longer_one_shares_its_start() -> None:
    parser = _parser()
    parser.add_flag("t", dest="template")
    ns = parser.parse(["-t", "{{.ID}}", "-token", "secret", "-verbose"])
    assert (ns.template, ns.token, ns.verbose) == ("{{.ID}}", "secret", True)
