"""Where the cores went during a bench's measured load: CPU seconds per part of the stack.

Every service, Kafka and stripe-mock runs in its own session (deploy.infra starts each with
`start_new_session`) and a service's own child processes (its outbox relay, its webhook worker) stay
in it, so summing the CPU of every live process by session id (/proc/<pid>/stat utime + stime, and
cutime + cstime for children already reaped) splits the machine into the stack's parts. PostgreSQL's
backends each start a session of their own: it is summed over the postmaster's process tree. The
load generator is this process. What the machine used beyond them (/proc/stat) is "other": other
sessions' work, the kernel's, noise.

    meter = CpuMeter.of(stack)        # or CpuMeter({"payments": sid, ...})
    meter.start(); ...load...; split = meter.stop()
    print(split.table(ops=2000, unit="event"))
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bench.report import Report

if TYPE_CHECKING:
    from bench.stack import Stack

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
LOAD_GENERATOR = "bench (load generator)"


@dataclass(frozen=True)
class _Snapshot:
    by_session: dict[int, float]
    by_pid: dict[int, float]
    parent: dict[int, int]

    def tree(self, root: int) -> float:
        """CPU of `root` and all its descendants (PostgreSQL's backends each start a session of their own)."""
        total, frontier = 0.0, {root}
        while frontier:
            total += sum(self.by_pid.get(pid, 0.0) for pid in frontier)
            frontier = {pid for pid, parent in self.parent.items() if parent in frontier}
        return total


def _process_cpu() -> _Snapshot:
    """CPU seconds of every live process, summed by session id, by pid, and who is whose parent."""
    by_session: dict[int, float] = {}
    by_pid: dict[int, float] = {}
    parent: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # from field 3 (state) on; the name may hold spaces
        session, seconds = int(fields[3]), sum(int(f) for f in fields[11:15]) / CLOCK_TICKS
        by_session[session] = by_session.get(session, 0.0) + seconds
        by_pid[int(entry.name)] = seconds
        parent[int(entry.name)] = int(fields[1])
    return _Snapshot(by_session, by_pid, parent)


def children_of(pid: int) -> list[int]:
    """The live processes whose parent is `pid`."""
    return sorted(child for child, parent in _process_cpu().parent.items() if parent == pid)


def _own_cpu() -> float:
    times = os.times()
    return times.user + times.system  # this process and its threads (not the services: other sessions)


def _machine_busy() -> float:
    """CPU seconds the whole machine spent not idle, since boot (/proc/stat, every core)."""
    first = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in first[:8])
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def session_of(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        return os.getsid(pid)
    except OSError:
        return None


@dataclass(frozen=True)
class CpuSplit:
    """CPU seconds per part over `wall` seconds, and the machine's busy seconds over the same time."""

    wall: float
    parts: dict[str, float]
    machine: float
    cores: int

    @property
    def other(self) -> float:
        return max(0.0, self.machine - sum(self.parts.values()))

    def table(self, ops: int = 0, unit: str = "op") -> str:
        capacity = self.wall * self.cores
        lines = [f"CPU over {self.wall:.1f} s ({self.cores} cores = {capacity:.1f} core-s; machine busy "
                 f"{self.machine / capacity:.0%}):" if capacity else "CPU: no time measured"]
        rows = sorted(self.parts.items(), key=lambda kv: -kv[1]) + [("other (not this stack)", self.other)]
        for name, seconds in rows:
            per = f"   {seconds / ops * 1000:7.2f} ms per {unit}" if ops else ""
            share = seconds / capacity if capacity else 0.0
            lines.append(f"  {name:<26} {seconds:7.2f} s  {share:5.1%} of the cores{per}")
        if ops:
            lines.append(f"  {'the stack, all parts':<26} {sum(self.parts.values()) / ops * 1000:7.2f} ms per {unit}"
                         f" ({ops} {unit}s)")
        return "\n".join(lines)

    def record(self, rep: Report, label: str, ops: int, unit: str) -> None:
        """Each part's CPU per operation as a figure of the bench (in its JSON)."""
        for name, seconds in self.parts.items():
            rep.figure(f"{label} CPU {name} per {unit}", seconds / ops * 1000 if ops else 0.0, "ms")
        rep.figure(f"{label} CPU stack per {unit}", sum(self.parts.values()) / ops * 1000 if ops else 0.0, "ms")
        rep.figure(f"{label} CPU other", self.other, "s")


class CpuMeter:
    """`sessions`: a part per session (a service and its children); `pids`: a part per single process
    (one that shares the bench's session, e.g. its Kafka probe)."""

    def __init__(self, sessions: Mapping[str, int | None], pids: Mapping[str, int | None] | None = None,
                 trees: Mapping[str, int | None] | None = None) -> None:
        self.sessions = {name: sid for name, sid in sessions.items() if sid is not None}
        self.pids = {name: pid for name, pid in (pids or {}).items() if pid is not None}
        self.trees = {name: pid for name, pid in (trees or {}).items() if pid is not None}
        self._start: tuple[float, _Snapshot, float, float] | None = None

    @classmethod
    def of(cls, stack: Stack, **own_pids: int | None) -> CpuMeter:
        """Postgres, Kafka, stripe-mock when running, every service of `stack`, and `own_pids` (the
        bench's helper processes, counted one by one)."""
        pids: dict[str, int | None] = {"kafka": stack.kafka.pid}
        if stack.stripe_pid is not None:
            pids["stripe-mock"] = stack.stripe_pid
        pids.update({name: process.pid for name, process in stack.processes.items()})
        return cls({name: session_of(pid) for name, pid in pids.items()}, own_pids,
                   trees={"postgres": stack.postgres.postmaster_pid()})

    def start(self) -> None:
        self._start = (time.monotonic(), _process_cpu(), _own_cpu(), _machine_busy())

    def stop(self) -> CpuSplit:
        if self._start is None:
            raise RuntimeError("CpuMeter.stop() before start()")
        began, before, own_before, machine_before = self._start
        after, own_after, machine_after = _process_cpu(), _own_cpu(), _machine_busy()
        parts = {name: max(0.0, after.by_session.get(sid, 0.0) - before.by_session.get(sid, 0.0))
                 for name, sid in self.sessions.items()}
        parts.update({name: max(0.0, after.by_pid.get(pid, 0.0) - before.by_pid.get(pid, 0.0))
                      for name, pid in self.pids.items()})
        # Backends that ended in the window are in the postmaster's reaped-children time (cutime).
        parts.update({name: max(0.0, after.tree(root) - before.tree(root)) for name, root in self.trees.items()})
        parts[LOAD_GENERATOR] = own_after - own_before
        return CpuSplit(wall=time.monotonic() - began, parts=parts, machine=machine_after - machine_before,
                        cores=os.cpu_count() or 1)
