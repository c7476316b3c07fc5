"""`python -m dpo_core.local serve`: serving beyond loopback needs a key the operator chose (checked before
anything binds; tests never bind a non-loopback address)."""

from __future__ import annotations

import pytest

from dpo_core.local.__main__ import main
from dpo_core.local.launcher import is_loopback


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "gpu-box.example"])
def test_non_loopback_bind_without_key_is_refused(host, monkeypatch, capsys):
    monkeypatch.delenv("TINKER_API_KEY", raising=False)
    assert main(["serve", "--host", host, "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "needs an explicit key" in err and "--api-key" in err and "ready at" not in err


def test_loopback_is_recognised():
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.1.1", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.5", "gpu-box"))
