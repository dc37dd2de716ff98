"""A node's `auth:` section: parsing, the older fields read as it, conflicts, and the messages
a node gets when its secrets or certificate cannot be used (README "Securing CRM calls").

No servers: `CrmCredentials` is given an environment mapping, certificates are files made
here with trustme. What the methods do on the wire is tests/integration/test_crm_auth.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trustme

from crm_resolver.app import unknown_environment
from crm_resolver.crm_auth import (
    NO_AUTH,
    BearerToken,
    CombinedAuth,
    CrmCredentials,
    MutualTls,
    WebhookSignature,
)
from crm_resolver.oauth2_client import OAuth2ClientCredentials
from shared.node_auth import (
    BearerAuth,
    MutualTlsAuth,
    OAuth2ClientCredentialsAuth,
    WebhookSignatureAuth,
)
from shared.node_sources import node_from_hash
from shared.nodes import ConfigError, NodeConfig, NodeSet, build_node

SECRET = "whsec_" + "A" * 44  # 32 zero bytes, base64
OAUTH = {
    "method": "oauth2_client_credentials",
    "token_url": "https://login.example.com/oauth2/token",
    "client_id": "callerid",
    "client_secret_env": "CALLERID_OAUTH_SECRET",
}


def raw_node(**extra: Any) -> dict[str, Any]:
    return {
        "id": "gold",
        "name": "gold-customers",
        "interaction": "crm_true_false",
        "url": "https://crm.example.com/id",
        "audio": "customer-id-prompt",
        "on_identified": "1,3",
        "on_not_identified": "1,4",
        **extra,
    }


def refused(**extra: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        build_node(raw_node(**extra))
    return str(caught.value)


# --- the section -------------------------------------------------------------------------


def test_no_auth_by_default() -> None:
    node = build_node(raw_node())
    assert node.auth == ()
    assert CrmCredentials({}).for_node(node) is NO_AUTH


def test_one_method_or_a_list() -> None:
    """`auth:` may be one mapping or a list; both are held as a tuple, in the given order."""
    one = build_node(raw_node(auth={"method": "bearer", "token_env": "T"}))
    assert one.auth == (BearerAuth(method="bearer", token_env="T"),)
    listed = build_node(
        raw_node(
            auth=[
                {"method": "mutual_tls", "certificate_file": "/c.pem", "key_file": "/k.pem"},
                OAUTH,
            ]
        )
    )
    tls, oauth = listed.auth
    assert isinstance(tls, MutualTlsAuth)
    assert (tls.certificate_file, tls.key_file) == ("/c.pem", "/k.pem")
    assert isinstance(oauth, OAuth2ClientCredentialsAuth)
    assert oauth.client_authentication == "client_secret_basic"
    assert (oauth.scope, oauth.audience) == (None, None)


def test_the_node_round_trips_through_its_dump() -> None:
    """What tools re-validate (`model_dump` plus a change) parses back to the same section."""
    node = build_node(raw_node(auth=[OAUTH, {"method": "webhook_signature", "secret_env": "S"}]))
    again = NodeConfig.model_validate(node.model_dump())
    assert again.auth == node.auth


# --- the older fields ----------------------------------------------------------------------


def test_older_fields_are_read_as_the_section() -> None:
    """crm_token_env and crm_signing_secret_env become bearer and webhook_signature, in that
    order (the order their headers were always sent in); the fields themselves are gone."""
    node = build_node(raw_node(crm_token_env="CRM_TOKEN", crm_signing_secret_env="CRM_SECRET"))
    bearer, webhook = node.auth
    assert isinstance(bearer, BearerAuth)
    assert isinstance(webhook, WebhookSignatureAuth)
    assert [method.model_dump() for method in node.auth] == [
        {"method": "bearer", "token_env": "CRM_TOKEN"},
        {"method": "webhook_signature", "secret_env": "CRM_SECRET"},
    ]
    assert "crm_token_env" not in node.model_dump()
    auth = CrmCredentials({"CRM_TOKEN": "tok", "CRM_SECRET": SECRET}).for_node(node)
    assert isinstance(auth, CombinedAuth)
    assert repr(auth) == "CombinedAuth(BearerToken(token=set), WebhookSignature(signing_key=set))"


@pytest.mark.parametrize("empty", [None, "", "  "])
def test_empty_older_fields_are_no_auth(empty: str | None) -> None:
    node = build_node(raw_node(crm_token_env=empty, crm_signing_secret_env=empty))
    assert node.auth == ()


def test_older_and_newer_forms_together_are_refused() -> None:
    message = refused(crm_token_env="T", auth={"method": "bearer", "token_env": "T"})
    assert "node 'gold': auth: given together with crm_token_env" in message
    assert "write the method in auth: alone" in message


def test_older_field_messages_name_the_older_field() -> None:
    """An operator who wrote crm_token_env reads crm_token_env in the message."""
    assert "crm_token_env: must name an environment variable" in refused(crm_token_env="A B")
    node = build_node(raw_node(crm_token_env="CALLERID_ABSENT"))
    with pytest.raises(ConfigError) as caught:
        CrmCredentials({}).check([node])
    assert str(caught.value) == (
        "node 'gold': crm_token_env: environment variable CALLERID_ABSENT is not set or empty"
    )


# --- what a node may not say -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("auth", "message"),
    [
        ({"method": "basic"}, "auth: each method needs `method:`, one of bearer, webhook_sig"),
        ({"token_env": "T"}, "auth: each method needs `method:`, one of bearer"),
        ({"method": "bearer"}, "auth.0.bearer.token_env: Field required"),
        ({"method": "bearer", "token_env": "A-B"}, "must name an environment variable"),
        ({"method": "bearer", "token_env": "T", "token": "x"}, "Extra inputs are not permitted"),
        (
            [{"method": "bearer", "token_env": "A"}, {"method": "bearer", "token_env": "B"}],
            "bearer is given twice",
        ),
        (
            [{"method": "bearer", "token_env": "A"}, OAUTH],
            "bearer and oauth2_client_credentials both set the Authorization header",
        ),
        ({**OAUTH, "token_url": "ftp://x/token"}, "must be an http:// or https:// URL"),
        ({**OAUTH, "scope": 'a "b"'}, "scope tokens"),
        ({**OAUTH, "client_authentication": "private_key_jwt"}, "client_secret_basic"),
        ({**OAUTH, "client_secret": "in-the-yaml"}, "client_secret: Extra inputs"),
    ],
)
def test_refused_sections(auth: Any, message: str) -> None:
    found = refused(auth=auth)
    assert found.startswith("node 'gold': ")
    assert message in found


def test_mutual_tls_needs_https() -> None:
    message = refused(
        url="http://crm.example.com/id",
        auth={"method": "mutual_tls", "certificate_file": "/c.pem"},
    )
    assert "auth: mutual_tls needs an https:// url" in message


def test_omnileads_hashes_have_no_auth() -> None:
    """Nodes read from OMniLeads' Redis hashes cannot carry a section: no auth."""
    raw = node_from_hash(
        "7",
        {
            "NAME": "n",
            "TYPE": "2",
            "EXTERNALURL": "https://crm.example.com/id",
            "AUDIO": "a",
            "TRUEDST": "1,3",
            "FALSEDST": "1,4",
        },
        where="redis",
    )
    assert build_node(raw).auth == ()


# --- secrets and certificates at load ------------------------------------------------------


@pytest.mark.parametrize(
    ("auth", "env", "message"),
    [
        (
            {"method": "bearer", "token_env": "T"},
            {},
            "auth: bearer: token_env: environment variable T is not set or empty",
        ),
        (
            {"method": "bearer", "token_env": "T"},
            {"T": "bad token!"},
            "auth: bearer: token_env: T does not hold a bearer token",
        ),
        (
            {"method": "webhook_signature", "secret_env": "S"},
            {"S": "whsec_short"},
            "auth: webhook_signature: secret_env: S: must be 'whsec_' followed by base64",
        ),
        (
            OAUTH,
            {},
            "auth: oauth2_client_credentials: client_secret_env: environment variable "
            "CALLERID_OAUTH_SECRET is not set or empty",
        ),
    ],
)
def test_unusable_secrets_name_node_method_and_field(
    auth: dict[str, str], env: dict[str, str], message: str
) -> None:
    node = build_node(raw_node(auth=auth))
    with pytest.raises(ConfigError) as caught:
        CrmCredentials(env).check([node])
    assert str(caught.value).startswith("node 'gold': ")
    assert message in str(caught.value)
    for value in env.values():
        assert value not in str(caught.value)


def test_each_method_builds_and_never_shows_its_secret(tmp_path: Path) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("client.callerid.test")
    cert, key = tmp_path / "client.pem", tmp_path / "client.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    env = {"T": "tok-123", "S": SECRET, "CALLERID_OAUTH_SECRET": "oauth-secret-456"}
    credentials = CrmCredentials(env)
    built = {
        kind: credentials.for_node(build_node(raw_node(auth=auth)))
        for kind, auth in {
            "bearer": {"method": "bearer", "token_env": "T"},
            "webhook": {"method": "webhook_signature", "secret_env": "S"},
            "oauth": OAUTH,
            "tls": {"method": "mutual_tls", "certificate_file": str(cert), "key_file": str(key)},
        }.items()
    }
    assert isinstance(built["bearer"], BearerToken)
    assert isinstance(built["webhook"], WebhookSignature)
    assert isinstance(built["oauth"], OAuth2ClientCredentials)
    assert isinstance(built["tls"], MutualTls)
    assert built["tls"].client_certificate is not None
    assert built["tls"].client_certificate.certificate_file == str(cert)
    shown = " ".join(map(repr, built.values()))
    assert not any(secret in shown for secret in ("tok-123", SECRET, "oauth-secret-456"))


def test_nodes_configured_alike_share_one_auth() -> None:
    """One OAuth2 client (so one token) for the nodes with the same section, across reloads
    that rebuild the node."""
    credentials = CrmCredentials({"CALLERID_OAUTH_SECRET": "x"})
    first = credentials.for_node(build_node(raw_node(auth=OAUTH)))
    second = credentials.for_node(build_node(raw_node(id="silver", name="s", auth=OAUTH)))
    assert first is second


def test_a_certificate_that_cannot_be_loaded_is_a_config_error(tmp_path: Path) -> None:
    """Missing file, and a key that is not the certificate's: refused at load, naming the
    node, the method and the field (never at the first call)."""
    ca = trustme.CA()
    one, other = ca.issue_cert("one.test"), ca.issue_cert("other.test")
    cert, key = tmp_path / "one.pem", tmp_path / "other.key"
    one.cert_chain_pems[0].write_to_path(str(cert))
    other.private_key_pem.write_to_path(str(key))
    for auth in (
        {"method": "mutual_tls", "certificate_file": str(tmp_path / "absent.pem")},
        {"method": "mutual_tls", "certificate_file": str(cert), "key_file": str(key)},
    ):
        node = build_node(raw_node(auth=auth))
        with pytest.raises(ConfigError) as caught:
            CrmCredentials({}).check([node])
        assert str(caught.value).startswith(
            "node 'gold': auth: mutual_tls: certificate_file: cannot load the client "
            "certificate and key from "
        )


def test_secrets_named_in_auth_are_not_warned_about() -> None:
    """The start-up warning for unknown CALLERID_* variables skips the secrets nodes name."""
    nodes = NodeSet(
        [
            build_node(raw_node(auth=OAUTH)),
            build_node(raw_node(id="b", name="b", crm_token_env="CALLERID_OLD_TOKEN")),
        ]
    )
    environ = {"CALLERID_OAUTH_SECRET": "x", "CALLERID_OLD_TOKEN": "y", "CALLERID_TYPO": "z"}
    warnings = unknown_environment(environ, nodes)
    assert [w.split(":")[0] for w in warnings] == ["CALLERID_TYPO"]
