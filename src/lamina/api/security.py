"""Who may reach the server: the rule that refuses to expose an unauthenticated API beyond this machine.

A loopback address (127.0.0.0/8, ::1, localhost) serves only this machine. Any other address serves whoever
can reach it, so the server starts there only when a key is required (a static --api-key or an active
managed key) or when the operator says --insecure on purpose.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from lamina.errors import InvalidRequestError


def is_loopback(host: str) -> bool:
    """True for `localhost` and loopback IP addresses; a host name is never assumed to be one."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, *, insecure: bool, database: str | Path, api_key: str | None) -> None:
    """Refuse to listen on a non-loopback `host` with no API key at all, unless `insecure`.

    The key store in `database` is opened only when the address is exposed (a loopback server needs no key).
    """
    if is_loopback(host) or insecure:
        return
    from lamina.api.keys import KeyStore
    from lamina.infra.db import open_database

    if not KeyStore(open_database(database), api_key).auth_required():
        raise InvalidRequestError(
            f"refusing to listen on {host} without an API key: pass --api-key KEY (or create one with "
            "`lamina keys create --name NAME`), or --insecure to serve anyone who can reach this address"
        )
