"""The gateway refuses to start without GATEWAY_JWT_SECRET outside local mode (issue 14, compose point).

Local mode is a gateway bound to loopback (`make run`, the tests): one process, so a per-process key
is harmless. Bound anywhere else it may be one replica of several behind a proxy, where a generated
key would make every token fail on the next replica.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from services.gateway.config import GatewaySettings

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "gateway"])
def test_a_gateway_beyond_loopback_needs_a_jwt_secret(host: str) -> None:
    with pytest.raises(ValidationError, match="GATEWAY_JWT_SECRET is required"):
        GatewaySettings(host=host, jwt_secret=None)
    with pytest.raises(ValidationError, match="GATEWAY_JWT_SECRET is required"):
        GatewaySettings(host=host, jwt_secret="")
    assert GatewaySettings(host=host, jwt_secret="s" * 32).jwt_secret == "s" * 32


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_local_mode_may_generate_its_key(host: str) -> None:
    assert GatewaySettings(host=host, jwt_secret=None).jwt_secret is None


def test_the_process_exits_with_one_line_naming_the_variable() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env |= {"GATEWAY_HOST": "0.0.0.0", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "services.gateway"], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "GATEWAY_JWT_SECRET is required" in lines[0] and "0.0.0.0" in lines[0], lines
