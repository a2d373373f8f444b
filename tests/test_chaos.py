"""The short chaos run of `make test`: `python -m deploy.chaos` on a stack of its own (free loopback
ports), 30 s of load with kill -9 of payments and invoice, a PostgreSQL crash (`-m immediate`) and a
kill -9 of Kafka; nothing lost, doubled or inconsistent, every fault really injected, and nothing
left running afterwards."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.infra import REPO_ROOT, pid_alive

FAULTS = ["payments", "invoice", "postgres", "kafka"]


@pytest.mark.infra
def test_a_short_chaos_run_loses_and_doubles_nothing(tmp_path: Path) -> None:
    report_path = tmp_path / "chaos.json"
    proc = subprocess.run(
        [sys.executable, "-m", "deploy.chaos", "--duration", "30", "--faults", ",".join(FAULTS),
         "--json", str(report_path), "--logs", str(tmp_path / "logs")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=420, check=False,
    )
    output = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert report_path.is_file(), output
    report = json.loads(report_path.read_text())
    assert (report["lost"], report["doubled"], report["inconsistent"]) == (0, 0, 0), report["findings"]
    assert [f["name"] for f in report["faults"]] == FAULTS
    for fault in report["faults"]:
        assert fault["injected"] and fault["restarted"], fault
        assert fault["recover_s"] is not None, fault
        if fault["name"] != "postgres":
            assert fault["old_pid"] != fault["new_pid"], fault  # a new process, not the old one
    assert report["invoices_accepted"] > 0 and report["requests_accepted"] > report["invoices_accepted"]
    assert report["unknown_unresolved"] == 0 and report["drained"], output
    assert proc.returncode == 0, output
    # Clean-up: every process it started is gone, and so is its stack directory.
    assert report["pids"] and not [name for name, pid in report["pids"].items() if pid_alive(pid)]
    assert not Path(report["stack_root"]).exists()
