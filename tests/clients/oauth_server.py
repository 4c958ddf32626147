#!/usr/bin/env python3
"""An OAuth 2.1 authorization server for the integration tests, built on the official Python
SDK's own authorization-server routes (`mcp.server.auth.routes.create_auth_routes`: metadata,
dynamic client registration, /authorize with PKCE, /token).

The SDK leaves storage and consent to the application; this one keeps clients and codes in
memory and approves every authorization request at once for one resource owner. Its access
tokens are RS256 JWTs (signed with the given private key, `kid` in the header) that a resource
server verifies locally:

    {"iss": ISSUER, "sub": SUBJECT, "aud": <the RFC 8707 `resource` the client asked for>,
     "roles": [ROLES...], "scope": "...", "client_id": "...", "iat": ..., "exp": ...}

Run it with the peers venv's python (see PEERS.md):

    <peers>/venv/bin/python tests/clients/oauth_server.py --port PORT --key PEM --kid KID \
        --subject alice@example.com [--role developer]...

The issuer is `http://127.0.0.1:PORT/as` (a path, so that RFC 8414 discovery is path-aware and
no URL normalisation blurs the issuer string). It prints one line, `{"issuer": ...}`, once it
accepts connections, and then one line per token issued: `{"issued": {claims}}`.
"""

import argparse
import json
import secrets
import sys
import time
from typing import Any

import jwt
import uvicorn
from pydantic import AnyHttpUrl
from starlette.applications import Starlette
from starlette.routing import Mount, Route

from mcp.server.auth.provider import (
    AccessToken,
    AuthorizationCode,
    AuthorizationParams,
    RefreshToken,
    construct_redirect_uri,
)
from mcp.server.auth.routes import create_auth_routes
from mcp.server.auth.settings import ClientRegistrationOptions
from mcp.shared.auth import OAuthClientInformationFull, OAuthToken

TOKEN_LIFETIME_SECONDS = 600


class AutoApprovingProvider:
    """Everything in memory; every authorization request is granted to `subject`."""

    def __init__(self, issuer: str, key: str, kid: str, subject: str, roles: list[str]):
        self.issuer = issuer
        self.key = key
        self.kid = kid
        self.subject = subject
        self.roles = roles
        self.clients: dict[str, OAuthClientInformationFull] = {}
        self.codes: dict[str, AuthorizationCode] = {}

    async def get_client(self, client_id: str) -> OAuthClientInformationFull | None:
        return self.clients.get(client_id)

    async def register_client(self, client_info: OAuthClientInformationFull) -> None:
        assert client_info.client_id is not None
        self.clients[client_info.client_id] = client_info

    async def authorize(self, client: OAuthClientInformationFull, params: AuthorizationParams) -> str:
        code = AuthorizationCode(
            code=secrets.token_urlsafe(24),
            scopes=params.scopes or [],
            expires_at=time.time() + 300,
            client_id=client.client_id or "",
            code_challenge=params.code_challenge,
            redirect_uri=params.redirect_uri,
            redirect_uri_provided_explicitly=params.redirect_uri_provided_explicitly,
            resource=params.resource,
            subject=self.subject,
        )
        self.codes[code.code] = code
        return construct_redirect_uri(str(params.redirect_uri), code=code.code, state=params.state)

    async def load_authorization_code(
        self, client: OAuthClientInformationFull, authorization_code: str
    ) -> AuthorizationCode | None:
        code = self.codes.get(authorization_code)
        return code if code is not None and code.client_id == client.client_id else None

    async def exchange_authorization_code(
        self, client: OAuthClientInformationFull, authorization_code: AuthorizationCode
    ) -> OAuthToken:
        del self.codes[authorization_code.code]
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": self.subject,
            # Without a `resource`, the token is for no resource in particular.
            "aud": authorization_code.resource or "unspecified",
            "roles": self.roles,
            "scope": " ".join(authorization_code.scopes),
            "client_id": client.client_id,
            "iat": now,
            "exp": now + TOKEN_LIFETIME_SECONDS,
        }
        token = jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": self.kid})
        print(json.dumps({"issued": claims}), flush=True)
        return OAuthToken(
            access_token=token,
            expires_in=TOKEN_LIFETIME_SECONDS,
            scope=claims["scope"] or None,
        )

    async def load_refresh_token(self, client: OAuthClientInformationFull, refresh_token: str) -> RefreshToken | None:
        return None

    async def exchange_refresh_token(
        self, client: OAuthClientInformationFull, refresh_token: RefreshToken, scopes: list[str]
    ) -> OAuthToken:
        raise NotImplementedError

    async def load_access_token(self, token: str) -> AccessToken | None:
        return None

    async def revoke_token(self, token: AccessToken | RefreshToken) -> None:
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--key", required=True, help="PEM private key that signs the tokens (RSA)")
    parser.add_argument("--kid", required=True, help="key id put in each token's header")
    parser.add_argument("--subject", required=True, help="the resource owner every grant is for")
    parser.add_argument("--role", action="append", default=[], help="a role put in the tokens' roles claim")
    args = parser.parse_args()

    issuer = f"http://127.0.0.1:{args.port}/as"
    with open(args.key) as key_file:
        key = key_file.read()
    provider = AutoApprovingProvider(issuer, key, args.kid, args.subject, args.role)
    routes = create_auth_routes(
        provider,
        issuer_url=AnyHttpUrl(issuer),
        client_registration_options=ClientRegistrationOptions(enabled=True),
    )
    # RFC 8414 section 3.1: the metadata of an issuer with a path is at
    # /.well-known/oauth-authorization-server/<path>; the SDK's routes serve it at the root.
    metadata = next(r for r in routes if isinstance(r, Route) and r.path == "/.well-known/oauth-authorization-server")
    app = Starlette(
        routes=[
            Route("/.well-known/oauth-authorization-server/as", endpoint=metadata.app, methods=["GET", "OPTIONS"]),
            Mount("/as", routes=routes),
        ]
    )

    class AnnouncingServer(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets=sockets)
            print(json.dumps({"issuer": issuer}), flush=True)

    config = uvicorn.Config(app, host="127.0.0.1", port=args.port, log_level="warning")
    AnnouncingServer(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
