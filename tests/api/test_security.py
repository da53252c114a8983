"""The rule that keeps an unauthenticated API on this machine: loopback, a key, or --insecure."""

from __future__ import annotations

from pathlib import Path

import pytest

from lamina.api.keys import KeyStore
from lamina.api.security import check_exposure, is_loopback
from lamina.errors import InvalidRequestError
from lamina.infra.db import open_database


@pytest.mark.parametrize(("host", "loopback"), [("127.0.0.1", True), ("127.3.4.5", True), ("::1", True),
                                                ("localhost", True), ("0.0.0.0", False), ("::", False),
                                                ("192.168.1.2", False), ("example.org", False)])
def test_loopback_addresses(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_an_exposed_address_needs_a_key_or_insecure(tmp_path: Path) -> None:
    db = tmp_path / "lamina.db"
    check_exposure("127.0.0.1", insecure=False, database=db, api_key=None)
    assert not db.exists()  # a loopback server opens no key store
    with pytest.raises(InvalidRequestError, match=r"refusing to listen on 0\.0\.0\.0 without an API key"):
        check_exposure("0.0.0.0", insecure=False, database=db, api_key=None)
    check_exposure("0.0.0.0", insecure=True, database=db, api_key=None)
    check_exposure("0.0.0.0", insecure=False, database=db, api_key="static-key")
    KeyStore(open_database(db)).create("ops")
    check_exposure("0.0.0.0", insecure=False, database=db, api_key=None)
