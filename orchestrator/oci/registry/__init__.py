"""A small OCI distribution API client over requests.

Enough for what the pipeline needs from a registry: does a tag or blob
exist, read a manifest, put a manifest under another tag (retagging without
moving bytes), stream blobs up from files or across registries, list and
delete tags.

  transport.py  sessions, TLS trust (certs.d, SSL_CERT_FILE), HTTPS first with
                plain HTTP only for loopback/insecure registries, retries, redirects
  auth.py       credential sources (env, Docker's config.json and helpers),
                challenges and the token flow
  client.py     the Registry class: manifests, blobs, tags
"""

from orchestrator.common.errors import EnvironmentProblem, UserError
from orchestrator.oci.registry.auth import (
    Credentials,
    EnvLogin,
    credentials_for,
    docker_auth_config,
    env_login,
    find_credentials,
    parse_challenge,
)
from orchestrator.oci.registry.client import (
    CHUNK,
    DOCKER_LIST,
    DOCKER_MANIFEST,
    EMPTY_JSON,
    MANIFEST_TYPES,
    OCI_EMPTY,
    OCI_INDEX,
    OCI_MANIFEST,
    Manifest,
    Registry,
    sha256_digest,
    split_ref,
)
from orchestrator.oci.registry.transport import (
    TransportError,
    Unreachable,
    is_loopback,
    registry_host,
)

__all__ = [
    "CHUNK", "DOCKER_LIST", "DOCKER_MANIFEST", "EMPTY_JSON", "MANIFEST_TYPES", "OCI_EMPTY", "OCI_INDEX",
    "OCI_MANIFEST", "Credentials", "EnvLogin", "EnvironmentProblem", "Manifest", "Registry", "TransportError",
    "Unreachable", "UserError", "credentials_for", "docker_auth_config", "env_login", "find_credentials",
    "is_loopback", "parse_challenge", "registry_host", "sha256_digest", "split_ref",
]
