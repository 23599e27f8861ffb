"""The OIDC issuer: ``server { oidc_issuer }`` in the agent config, the discovery document
served from it (never from the request's Host header) and the ``iss`` of signed tokens."""

from __future__ import annotations

import copy
import ipaddress
import json
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import jwt
import pytest

from nomad_client.agent.config import (
    AgentFlags,
    ConfigError,
    advertise_http_url,
    build_agent_config,
)
from nomad_client.server.keyring import DEFAULT_AUDIENCE, Keyring
from tests.unit.factories import make_server, serve_api

ISSUER = "https://nomad.example.com/team-a"


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# -- configuration -------------------------------------------------------------------


def test_oidc_issuer_is_read_from_the_server_block(tmp_path: Path) -> None:
    f = write(tmp_path, "a.hcl", f'data_dir = "/d"\nserver {{\n  enabled = true\n'
                                 f'  oidc_issuer = "{ISSUER}"\n}}\n')
    cfg = build_agent_config([f], AgentFlags())
    assert cfg.server.oidc_issuer == ISSUER
    assert cfg.to_api_dict()["Server"] == {"Enabled": True, "Store": "embedded",
                                           "OIDCIssuer": ISSUER}


def test_oidc_issuer_from_json(tmp_path: Path) -> None:
    f = write(tmp_path, "a.json", json.dumps(
        {"data_dir": "/d", "server": {"enabled": True, "oidc_issuer": "http://10.0.0.1:4646"}}))
    assert build_agent_config([f], AgentFlags()).server.oidc_issuer == "http://10.0.0.1:4646"


def test_oidc_issuer_is_unset_by_default(tmp_path: Path) -> None:
    f = write(tmp_path, "a.hcl", 'data_dir = "/d"\nserver { enabled = true }\n')
    cfg = build_agent_config([f], AgentFlags())
    assert cfg.server.oidc_issuer is None
    assert "OIDCIssuer" not in cfg.to_api_dict()["Server"]


@pytest.mark.parametrize(("value", "fragment"), [
    ('"nomad.example.com"', "http:// or https:// URL"),
    ('"ftp://nomad.example.com"', "http:// or https:// URL"),
    ('"https://"', "http:// or https:// URL"),
    ('"https://nomad.example.com:99999"', "http:// or https:// URL"),
    ('"https://nomad.example.com/?x=1"', "query or fragment"),
    ('"https://nomad.example.com/#top"', "query or fragment"),
    ('"https://nomad.example.com/a b"', "spaces"),
    ('""', "must not be empty"),
    ("42", "expected a string"),
])
def test_bad_oidc_issuer_is_a_config_error_naming_the_key(tmp_path: Path, value: str,
                                                          fragment: str) -> None:
    f = write(tmp_path, "a.hcl", f"data_dir = \"/d\"\nserver {{\n  enabled = true\n"
                                 f"  oidc_issuer = {value}\n}}\n")
    with pytest.raises(ConfigError) as info:
        build_agent_config([f], AgentFlags())
    message = str(info.value)
    assert "server.oidc_issuer" in message and fragment in message, message
    assert f"{f}:4" in message  # file and line


def test_an_issuer_with_a_password_is_refused_without_echoing_it(tmp_path: Path) -> None:
    f = write(tmp_path, "a.hcl", 'data_dir = "/d"\nserver {\n  enabled = true\n'
                                 '  oidc_issuer = "https://admin:hunter2@nomad.example.com"\n}\n')
    with pytest.raises(ConfigError) as info:
        build_agent_config([f], AgentFlags())
    assert "server.oidc_issuer" in str(info.value) and "hunter2" not in str(info.value)


def test_oidc_issuer_is_not_a_top_level_key(tmp_path: Path) -> None:
    f = write(tmp_path, "a.hcl", f'data_dir = "/d"\nserver {{ enabled = true }}\n'
                                 f'oidc_issuer = "{ISSUER}"\n')
    with pytest.raises(ConfigError, match="oidc_issuer: unknown configuration key"):
        build_agent_config([f], AgentFlags())


def test_advertised_http_url() -> None:
    assert advertise_http_url("127.0.0.1", 4646) == "http://127.0.0.1:4646"
    assert advertise_http_url("::1", 80) == "http://[::1]:80"
    # A wildcard bind names no address anyone can use: a real one of the host stands in.
    for wildcard in ("0.0.0.0", "::"):
        host = urlsplit(advertise_http_url(wildcard, 4646)).hostname
        assert host is not None and not ipaddress.ip_address(host).is_unspecified


# -- discovery and tokens ------------------------------------------------------------


@pytest.fixture
async def served(keyring: Keyring) -> AsyncIterator[tuple[str, Keyring]]:
    """A router with the identity endpoints on a real listener, and its own keyring (a copy
    of the session's: the tests set its issuer)."""
    own = copy.copy(keyring)
    api = await serve_api(make_server(own))
    try:
        yield api.url, own
    finally:
        await api.close()


async def discovery(url: str, host: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s, \
            s.get(f"{url}/.well-known/openid-configuration", headers={"Host": host}) as resp:
        return resp.status, await resp.text()


async def test_discovery_serves_the_configured_issuer_whatever_the_host_header(
        served: tuple[str, Keyring]) -> None:
    url, keyring = served
    keyring.issuer = ISSUER
    for host in ("evil.example", "evil.example:4646", urlsplit(url).netloc):
        status, text = await discovery(url, host)
        assert status == 200, text
        doc = json.loads(text)
        assert doc["issuer"] == ISSUER
        assert doc["jwks_uri"] == f"{ISSUER}/.well-known/jwks.json"
        assert "evil" not in text


async def test_discovery_is_off_without_an_issuer(served: tuple[str, Keyring]) -> None:
    url, keyring = served
    keyring.issuer = None
    status, text = await discovery(url, "evil.example")
    assert (status, text) == (404, "OIDC Discovery endpoint disabled")


async def test_tokens_carry_the_issuer(keyring: Keyring) -> None:
    keyring = copy.copy(keyring)  # the session's, with an issuer of its own
    fields = dict(namespace="default", job_id="j", alloc_id="a", task="t", group="g",
                  region="global")
    assert "iss" not in jwt.decode(keyring.sign_identity(**fields),
                                   options={"verify_signature": False})
    keyring.issuer = ISSUER
    token = keyring.sign_identity(**fields)
    assert jwt.decode(token, options={"verify_signature": False})["iss"] == ISSUER
    assert keyring.verify(token, audience=DEFAULT_AUDIENCE).task == "t"
