"""ciphertwin.config: typed deployment settings and the principals' credentials file."""

from ciphertwin.config.passwords import generate_password, hash_password, verify_password
from ciphertwin.config.principals import (
    CredentialsFile,
    Principal,
    Role,
    add_client,
    remove_client,
    twins_of_owner,
)
from ciphertwin.config.settings import (
    BrokerSettings,
    Deployment,
    LoggingSettings,
    PrincipalSettings,
    StorageSettings,
    TlsSettings,
    load_deployment,
)

__all__ = [
    "BrokerSettings",
    "CredentialsFile",
    "Deployment",
    "LoggingSettings",
    "Principal",
    "PrincipalSettings",
    "Role",
    "StorageSettings",
    "TlsSettings",
    "add_client",
    "generate_password",
    "hash_password",
    "load_deployment",
    "remove_client",
    "twins_of_owner",
    "verify_password",
]
