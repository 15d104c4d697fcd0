"""Who we are to a registry: credential sources, challenges and the token flow.

Credentials come from REGISTRY_USERNAME/REGISTRY_PASSWORD, for one registry
only, else Docker's own config.json (`auths`, `credHelpers`, `credsStore`),
each entry for its own host, so `docker login` works for us too. The
environment pair belongs to the project's registry, or to the host
REGISTRY_HOST names: it is read once at the edge (`env_login`) and handed to
every client as an `EnvLogin` that knows its host, so a base pulled from
Docker Hub or a second registry never sees a CI job's GitLab or GHCR
password. Every lookup also says where the credentials came from (or where
we looked), which is what a 401 message needs to be actionable. Secrets never
reach a repr, a log line or an exception message.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from orchestrator.common.errors import UserError
from orchestrator.oci.registry.transport import Transport, TransportError, registry_host

ENV_SOURCE = "REGISTRY_USERNAME/REGISTRY_PASSWORD"
HOST_VARIABLE = "REGISTRY_HOST"  # the registry the environment pair is for, when not the project's
# Docker Hub's credentials are stored under its v1 index URL, whatever name was used.
HUB_ALIASES = {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}
HUB_KEY = "https://index.docker.io/v1/"
TOKEN_SLACK_S = 20  # refresh a token this long before the service says it expires


@dataclass(frozen=True)
class Credentials:
    username: str = field(repr=False)
    password: str = field(repr=False)  # or an identity (refresh) token when identity_token is set
    source: str = ""
    identity_token: bool = False

    def as_tuple(self) -> tuple[str, str]:
        return self.username, self.password


@dataclass(frozen=True)
class EnvLogin:
    """REGISTRY_USERNAME/REGISTRY_PASSWORD and the one registry host they belong to."""

    host: str  # as registry_host() gives it: 'ghcr.io', '127.0.0.1:5000'
    username: str = field(repr=False)
    password: str = field(repr=False)

    def applies_to(self, host: str) -> bool:
        return _same_registry(self.host, registry_host(host))

    def credentials(self) -> Credentials:
        return Credentials(self.username, self.password, ENV_SOURCE)


def env_login(environ: Mapping[str, str], registry: str | None) -> EnvLogin | None:
    """The environment's login, for REGISTRY_HOST if set, else for `registry` (the project's).

    None when either variable is unset or empty, or when there is no host to tie them to:
    credentials that could go anywhere go nowhere.
    """
    user, password = environ.get("REGISTRY_USERNAME"), environ.get("REGISTRY_PASSWORD")
    host = (environ.get(HOST_VARIABLE) or "").strip() or registry
    if not (user and password and host):
        return None
    return EnvLogin(registry_host(host), user, password)


def docker_config_path() -> Path:
    return Path(os.environ.get("DOCKER_CONFIG") or Path.home() / ".docker") / "config.json"


def _show(path: Path) -> str:
    """A path as a user would type it: ~/.docker/config.json rather than /root/.docker/config.json."""
    try:
        return "~/" + str(Path(path).resolve().relative_to(Path.home().resolve()))
    except ValueError:
        return str(path)


def _hostname_key(key: str) -> str:
    """Docker's convertToHostname: 'https://host:5000/v1/' -> 'host:5000'."""
    return key.split("://", 1)[-1].split("/", 1)[0]


def _same_registry(key: str, host: str) -> bool:
    k = _hostname_key(key)
    return k == host or (k in HUB_ALIASES and host in HUB_ALIASES)


def _run_helper(helper: str, server: str) -> tuple[dict | None, str | None]:
    """`docker-credential-<helper> get` with the server on stdin -> (answer, why not)."""
    try:
        proc = subprocess.run([f"docker-credential-{helper}", "get"], input=server, capture_output=True,
                              text=True, timeout=60)
    except FileNotFoundError:
        return None, f"docker-credential-{helper} is not installed"
    except subprocess.TimeoutExpired:
        return None, f"docker-credential-{helper} did not answer within 60 s"
    if proc.returncode != 0:
        return None, None  # "credentials not found": an ordinary miss
    try:
        answer = json.loads(proc.stdout)
    except ValueError:
        return None, f"docker-credential-{helper} gave an answer that is not JSON"
    return (answer if answer.get("Secret") else None), None


def _from_helper(helper: str, host: str) -> tuple[Credentials | None, str | None]:
    servers = [HUB_KEY] if host in HUB_ALIASES else [host, f"https://{host}"]
    for server in servers:
        answer, problem = _run_helper(helper, server)
        if problem:
            return None, problem
        if answer:
            user = answer.get("Username") or ""
            return Credentials(user, answer["Secret"], f"credential helper docker-credential-{helper}",
                               identity_token=(user == "<token>")), None
    return None, None


def find_credentials(host: str, docker_config: Path | None = None,
                     login: EnvLogin | None = None) -> tuple[Credentials | None, str]:
    """The credentials for host and a description of their source, or (None, where we looked).

    login: the environment's login (env_login), used only when it is for this host.
    """
    if login is not None and login.applies_to(host):
        return login.credentials(), ENV_SOURCE
    path = Path(docker_config) if docker_config else docker_config_path()
    env_note = f"{ENV_SOURCE} (for {login.host} only)" if login is not None else f"{ENV_SOURCE} (not set)"
    looked = [env_note, _show(path)]
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        return None, "no credentials: " + ", ".join(looked[:1] + [f"{_show(path)} (no such file)"])
    except (OSError, ValueError) as e:
        return None, "no credentials: " + ", ".join(looked[:1] + [f"{_show(path)} (unreadable: {type(e).__name__})"])
    notes = []
    # Docker's order: a per-registry helper, then the file's own entry, then the default store.
    for key, helper in (config.get("credHelpers") or {}).items():
        if _same_registry(key, host):
            creds, problem = _from_helper(helper, host)
            if creds:
                return creds, creds.source
            notes.append(problem or f"docker-credential-{helper} has none for {host}")
    for key, entry in (config.get("auths") or {}).items():
        if not _same_registry(key, host) or not isinstance(entry, dict):
            continue
        source = f"{_show(path)} auths"
        if entry.get("identitytoken"):
            return Credentials("", entry["identitytoken"], source, identity_token=True), source
        if entry.get("auth"):
            try:
                user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                notes.append(f"{source}[{key!r}] is not valid base64 user:password")
                continue  # a broken entry is as good as none; the registry will say 401
            return Credentials(user, password, source), source
    if config.get("credsStore"):
        creds, problem = _from_helper(config["credsStore"], host)
        if creds:
            return creds, creds.source
        notes.append(problem or f"docker-credential-{config['credsStore']} has none for {host}")
    detail = f" ({'; '.join(notes)})" if notes else f" (nothing for {host})"
    return None, f"no credentials: {looked[0]}, {_show(path)}{detail}"


def credentials_for(host: str, docker_config: Path | None = None,
                    login: EnvLogin | None = None) -> tuple[str, str] | None:
    """(username, password) for host, or None; see find_credentials for the source."""
    creds, _ = find_credentials(host, docker_config, login)
    return creds.as_tuple() if creds and not creds.identity_token else None


def docker_auth_config(host: str, login: EnvLogin | None = None) -> dict | None:
    """The same credentials in docker-py's shape, for `client.images.pull(..., auth_config=...)`."""
    creds, _ = find_credentials(registry_host(host), login=login)
    if creds is None:
        return None
    if creds.identity_token:
        return {"identitytoken": creds.password}
    return {"username": creds.username, "password": creds.password}


def how_to_change(source: str, host: str) -> str:
    if source == ENV_SOURCE:
        return f"the credentials come from {ENV_SOURCE}: set them to a valid login for {host}, " \
               f"or unset both to use `docker login {host}`"
    if source.startswith("credential helper"):
        return f"the credentials come from the {source}: run `docker login {host}` to replace them, " \
               f"or set {ENV_SOURCE}"
    if source.endswith(" auths"):
        return f"the credentials come from {source}: run `docker login {host}` to replace them, or set {ENV_SOURCE}"
    return f"set {ENV_SOURCE}, or run `docker login {host}`"


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """'Bearer realm="x",service="y"' -> ('bearer', {'realm': 'x', 'service': 'y'})."""
    scheme, _, rest = header.strip().partition(" ")
    return scheme.lower(), dict(re.findall(r'(\w+)="([^"]*)"', rest))


def _merge_scopes(scopes: list[str]) -> tuple[str, ...]:
    """['repository:a:pull', 'repository:a:push'] -> ('repository:a:pull,push',): one entry per resource."""
    merged: dict[str, list[str]] = {}
    for scope in scopes:
        resource, _, actions = scope.rpartition(":")
        have = merged.setdefault(resource, [])
        have += [a for a in actions.split(",") if a and a not in have]
    return tuple(sorted(f"{r}:{','.join(sorted(a))}" for r, a in merged.items()))


class Authenticator:
    """Answers a registry's challenges and hands out the Authorization header for a request."""

    def __init__(self, host: str, transport: Transport, login: EnvLogin | None = None):
        self.host = host
        self.transport = transport
        self.login = login  # the environment's login: used only if it is for this host
        self._creds: Credentials | None = None
        self._source: str | None = None  # None until looked up: a helper process runs only when needed
        self._basic = False
        self._bearer: dict[str, str] | None = None  # realm and service of the token service
        self._tokens: dict[tuple[str, ...], tuple[str, float]] = {}

    def __repr__(self) -> str:
        return f"Authenticator({self.host!r})"

    # -- credentials -------------------------------------------------------
    def credentials(self) -> Credentials | None:
        if self._source is None:
            self._creds, self._source = find_credentials(self.host, login=self.login)
        return self._creds

    @property
    def source(self) -> str:
        self.credentials()
        return self._source or ""

    # -- headers -----------------------------------------------------------
    def header(self, scopes: list[str]) -> str | None:
        """What to send with a request needing these scopes; fetches a token when one is due."""
        if self._basic:
            creds = self.credentials()
            if creds and not creds.identity_token:
                return "Basic " + base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode()
            return None
        if self._bearer is None:
            return None
        key = _merge_scopes(scopes)
        token, expires = self._tokens.get(key, (None, 0.0))
        if token is None or time.monotonic() > expires:
            token = self._fetch_token(key)
        return f"Bearer {token}" if token else None

    def answer(self, resp, scopes: list[str], sent: str | None) -> bool:
        """Take in a 401's challenge; True when a retry would carry something new."""
        scheme, params = parse_challenge(resp.headers.get("WWW-Authenticate", ""))
        if scheme == "basic":
            if self._basic or self.credentials() is None:
                return False
            if not self.transport.may_send_credentials(self.transport.base_url()):
                raise self._plain_http_refusal()
            self._basic = True
            return True
        if scheme == "bearer" and params.get("realm"):
            self._bearer = {"realm": params["realm"], "service": params.get("service", "")}
            key = _merge_scopes(list(scopes) + ([params["scope"]] if params.get("scope") else []))
            token = self._fetch_token(key)
            if token and f"Bearer {token}" != sent:
                self._tokens[_merge_scopes(scopes)] = self._tokens[key]
                return True
        return False

    @property
    def uses_tokens(self) -> bool:
        return self._bearer is not None

    # -- the token flow ------------------------------------------------------
    def _fetch_token(self, scopes: tuple[str, ...]) -> str | None:
        realm = self._bearer["realm"]
        creds = self.credentials()
        withheld = bool(creds) and not self.transport.may_send_credentials(realm)
        if withheld:
            creds = None  # a plain-HTTP realm elsewhere gets an anonymous request, never the password
        query = [("service", self._bearer["service"])] if self._bearer["service"] else []
        query += [("scope", s) for s in scopes]
        if creds and creds.identity_token:
                # An identity token from `docker login` is an OAuth2 refresh token.
            form = dict(query, grant_type="refresh_token", refresh_token=creds.password, client_id="orchestrator")
            form["scope"] = " ".join(scopes)
            r = self.transport.request("POST", realm, data=form, auth_host=None)
        else:
            auth = None
            if creds:
                auth = "Basic " + base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode()
            r = self.transport.request("GET", realm, params=query, auth_header=auth, auth_host=urlsplit(realm).netloc)
        if r.status_code in (401, 403):
            if withheld:
                raise UserError(f"registry {self.host}: its token service {realm.split('?')[0]} wants credentials "
                                "over plain HTTP; they are only sent over HTTPS (or to a loopback address)",
                                "configure the registry's token realm with an https:// URL")
            if creds:
                raise UserError(f"registry {self.host}: the token service refused the credentials "
                                f"from {creds.source} ({r.status_code})", how_to_change(creds.source, self.host))
            raise UserError(f"registry {self.host}: the token service wants credentials and we have none "
                            f"({self.source})", how_to_change("", self.host))
        if r.status_code != 200:
            raise TransportError(f"registry {self.host}: the token service at {urlsplit(realm).netloc} "
                                 f"answered {r.status_code}", "retry later, or check the registry's status")
        try:
            body = r.json()
        except ValueError:
            raise TransportError(f"registry {self.host}: the token service answered something that is not JSON") \
                from None
        token = body.get("token") or body.get("access_token")
        if not token:
            return None
        lifetime = float(body.get("expires_in") or 60)
        self._tokens[scopes] = (token, time.monotonic() + max(lifetime - TOKEN_SLACK_S, lifetime / 2))
        return token

    # -- errors --------------------------------------------------------------
    def refused(self, method: str, path: str) -> UserError:
        """The 401 that remains after answering the challenges, as a message naming the source."""
        creds = self.credentials()
        what = f"registry {self.host} refused {method} {path} (401 unauthorized)"
        if creds:
            return UserError(f"{what} with the credentials from {creds.source}", how_to_change(creds.source, self.host))
        return UserError(f"{what}: {self.source}", how_to_change("", self.host))

    def _plain_http_refusal(self) -> UserError:
        return UserError(f"registry {self.host} asks for credentials over plain HTTP; they are only sent over "
                         "HTTPS (or to a loopback address)",
                         f"serve the registry over TLS (its CA goes in /etc/docker/certs.d/{self.host}/ca.crt)")

