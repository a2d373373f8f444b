"""`python -m bench.profile BENCH [--duration S] [--out DIR] [-- bench options]`: a bench under py-spy.

Runs one bench (as `python -m bench BENCH` does, its figures in DIR/figures.json) and, from the moment
its measured load on the services starts until it ends (`Stack.load_begins`/`load_ends`; or for
`--duration` seconds from that moment), samples every service process of its stack with
`py-spy record` (and the bench's own process, the load generator, unless `--no-self`). Per process
it writes to DIR:

    <name>.txt              py-spy's raw collapsed stacks ("thread;frame;frame count"; speedscope.app
                            and flamegraph.pl open it as it is)
    <name>.speedscope.json  the same as a speedscope file, one profile per thread
    <name>.top.txt          samples per thread, own time per package, and the top 15 functions by own
                            time (the frame on top of the stack) and by total time (anywhere in it),
                            as % of that process's samples

py-spy needs ptrace (root here, or CAP_SYS_PTRACE); it pauses the process for each sample unless
`--nonblocking`. By default only the thread holding the GIL is sampled (py-spy --gil), at `--rate`
per second: py-spy's idle detection counts a thread pool worker waiting on its queue, or a loop in
epoll, as busy, which buried the real costs under waits; with --gil a process's sample count /
(rate x seconds) is the share of the time its Python code ran, the most one GIL allows being 1.0.
`--all-threads` samples every thread not idle instead. `--summarize DIR` rewrites DIR's summaries.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import stack as bench_stack
from bench.__main__ import BENCHES, run_one
from bench.cpu import children_of
from bench.stack import Stack
from deploy.infra import RUN_DIR

# `name (path:line)`; a thread's root frame ("MainThread", "Thread-2 (run)") has no path.
_FRAME = re.compile(r"^(?P<name>.*) \((?P<path>[^()]*?):(?P<line>\d+)\)$")
_THREAD = re.compile(r"^thread \((?P<tid>\w+)\): (?P<name>.*)$")
TOP = 15
# On (nearly) every stack, so they say nothing in a "total time" list: start-up, threads, the loop.
_PLUMBING = re.compile(r"runpy|/threading\.py|asyncio/(runners|base_events|events)\.py|uvicorn/(main|server|_compat)"
                       r"\.py|kit/cli\.py|serve \(.*kit/service\.py|__main__\.py|concurrent/futures/thread\.py")


def py_spy() -> str:
    found = shutil.which("py-spy", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if not found:
        raise SystemExit("py-spy not found: .venv/bin/pip install py-spy (it is in the dev extra)")
    return found


@dataclass
class Sampler:
    name: str
    pid: int
    raw: Path
    process: subprocess.Popen[bytes]
    started: float


@dataclass
class PySpyProfiler:
    """The bench.stack.OBSERVER: one `py-spy record` per process while the load runs."""

    out: Path
    rate: int = 100
    duration: float | None = None
    nonblocking: bool = False
    gil: bool = True
    include_self: bool = True
    samplers: list[Sampler] = field(default_factory=list)
    done: list[tuple[Sampler, float]] = field(default_factory=list)
    _started: bool = False

    def start(self, stack: Stack) -> None:
        if self._started:  # a bench with two load phases (burst, steady) is profiled across both
            return
        self._started = True
        targets = {name: proc.pid for name, proc in stack.processes.items() if proc.pid is not None}
        for name, pid in list(targets.items()):  # a service's loops in child processes (kit.child)
            for n, child in enumerate(spawned_children(pid), start=1):
                targets[f"{name}-child{n}"] = child
        if self.include_self:
            targets["bench"] = os.getpid()
        exe = py_spy()
        for name, pid in targets.items():
            raw = self.out / f"{name}.txt"
            argv = [exe, "record", "--pid", str(pid), "--format", "raw", "--threads", "--full-filenames",
                    "--function", "--rate", str(self.rate), "--output", str(raw)]
            if self.duration:
                argv += ["--duration", str(int(self.duration))]
            if self.nonblocking:
                argv.append("--nonblocking")
            if self.gil:
                argv.append("--gil")
            log = open(self.out / f"{name}.py-spy.log", "wb")  # noqa: SIM115 - the child holds it
            process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            log.close()
            self.samplers.append(Sampler(name, pid, raw, process, time.monotonic()))
        print(f"[profile] py-spy sampling {', '.join(f'{n} (pid {p})' for n, p in targets.items())} "
              f"at {self.rate}/s", flush=True)

    def stop(self) -> None:
        for sampler in self.samplers:
            if sampler.process.poll() is None:
                sampler.process.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
        for sampler in self.samplers:
            try:
                sampler.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                sampler.process.kill()
                sampler.process.wait()
            self.done.append((sampler, time.monotonic() - sampler.started))
        self.samplers = []


def spawned_children(pid: int) -> list[int]:
    """The multiprocessing children (kit.child: the relay, the webhook worker) of process `pid`."""
    found = []
    for child in children_of(pid):
        try:
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.append(child)
        except OSError:  # gone meanwhile
            continue
    return found


@dataclass
class Profile:
    """Collapsed stacks of one process: (thread, frames root-first) -> samples."""

    name: str
    stacks: Counter[tuple[str, tuple[str, ...]]]

    @classmethod
    def read(cls, name: str, path: Path) -> Profile:
        stacks: Counter[tuple[str, tuple[str, ...]]] = Counter()
        for line in path.read_text(errors="replace").splitlines():
            body, _, count = line.rpartition(" ")
            if not body or not count.isdigit():
                continue
            frames = body.split(";")
            thread = "(thread)"
            if match := _THREAD.match(frames[0]):  # --threads: "thread (tid): Name" is the root frame
                thread, frames = match["name"], frames[1:]
            stacks[(thread, tuple(frames))] += int(count)
        return cls(name, stacks)

    @property
    def total(self) -> int:
        return sum(self.stacks.values())

    def threads(self) -> Counter[str]:
        out: Counter[str] = Counter()
        for (thread, _), n in self.stacks.items():
            out[thread] += n
        return out

    def own(self) -> Counter[str]:
        out: Counter[str] = Counter()
        for (_, frames), n in self.stacks.items():
            out[short(frames[-1]) if frames else "(no Python frame)"] += n
        return out

    def inclusive(self) -> Counter[str]:
        """Samples with the function anywhere on the stack, the entry and event-loop frames left out."""
        out: Counter[str] = Counter()
        for (_, frames), n in self.stacks.items():
            for frame in {short(f) for f in frames if not _PLUMBING.search(f)}:
                out[frame] += n
        return out

    def ours(self) -> Counter[str]:
        """Like inclusive(), of the repository's own code (services/, kit/, contracts/) only."""
        out: Counter[str] = Counter()
        for (_, frames), n in self.stacks.items():
            for frame in {short(f) for f in frames if not _PLUMBING.search(f)}:
                if frame.split("(", 1)[-1].startswith(("services/", "kit/", "contracts/")):
                    out[frame] += n
        return out

    def packages(self) -> Counter[str]:
        out: Counter[str] = Counter()
        for (_, frames), n in self.stacks.items():
            out[package(frames[-1]) if frames else "(no Python frame)"] += n
        return out

    def summary(self, seconds: float, rate: int) -> str:
        total = self.total or 1
        busy = self.total / (seconds * rate) if seconds else 0.0
        lines = [f"# {self.name}: {self.total} samples in {seconds:.1f} s at {rate}/s "
                 f"(~{busy:.2f} of the time a thread held the GIL when sampled with --gil; else busy threads)",
                 "# with uvloop, 'Runner.run' as the top frame is the loop's own C code (HTTP parsing, sockets)"]
        for title, counts, top in [("samples per thread", self.threads(), 10),
                                   ("own time per package (the frame on top of the stack)", self.packages(), TOP),
                                   (f"top {TOP} functions by own time", self.own(), TOP),
                                   (f"top {TOP} functions by total time (anywhere on the stack)",
                                    self.inclusive(), TOP),
                                   (f"top {TOP} of our own functions (services/, kit/, contracts/) by total time",
                                    self.ours(), TOP)]:
            lines.append(f"\n## {title}")
            lines += [f"{n / total:6.1%} {n:7d}  {key}" for key, n in counts.most_common(top)]
        return "\n".join(lines) + "\n"

    def speedscope(self) -> dict[str, Any]:
        frames: dict[str, int] = {}
        shared: list[dict[str, Any]] = []

        def index(frame: str) -> int:
            if frame not in frames:
                frames[frame] = len(shared)
                match = _FRAME.match(frame)
                shared.append({"name": match["name"], "file": match["path"], "line": int(match["line"])}
                              if match else {"name": frame})
            return frames[frame]

        profiles = []
        for thread in self.threads():
            samples, weights = [], []
            for (t, stack_frames), n in self.stacks.items():
                if t == thread:
                    samples.append([index(f) for f in stack_frames])
                    weights.append(n)
            profiles.append({"type": "sampled", "name": f"{self.name} {thread}", "unit": "none",
                             "startValue": 0, "endValue": sum(weights), "samples": samples, "weights": weights})
        return {"$schema": "https://www.speedscope.app/file-format-schema.json", "name": self.name,
                "exporter": "bench.profile", "activeProfileIndex": 0, "shared": {"frames": shared},
                "profiles": profiles}


_REPO = str(Path(__file__).resolve().parent.parent) + "/"


def short(frame: str) -> str:
    """`func (module/path.py:line)` with the site-packages or repo prefix cut off."""
    match = _FRAME.match(frame)
    if not match:
        return frame
    return f"{match['name']} ({_relative(match['path'])}:{match['line']})"


def _relative(path: str) -> str:
    for marker in ("site-packages/", "dist-packages/"):
        if marker in path:
            return path.split(marker, 1)[1]
    if path.startswith(_REPO):
        return path[len(_REPO):]
    if "/lib/python3" in path:
        return "stdlib/" + path.split("/lib/python3", 1)[1].split("/", 1)[-1]
    return path


def package(frame: str) -> str:
    """The package a frame's file is in: sqlalchemy, asyncpg, kit, services/invoice, stdlib/asyncio, ..."""
    match = _FRAME.match(frame)
    if not match:
        return frame
    relative = _relative(match["path"])
    if relative.startswith("/"):  # a file outside the venv, the repo and the stdlib
        return relative
    parts = relative.split("/")
    if parts[0] in ("services", "stdlib") and len(parts) > 2:
        return "/".join(parts[:2])
    return parts[0].removesuffix(".py")


def summarize(out: Path) -> list[Path]:
    """The speedscope file and the top lists of every process sampled into `out` (see profile.json)."""
    meta = json.loads((out / "profile.json").read_text())
    written: list[Path] = []
    for name, seconds in meta["seconds"].items():
        raw = out / f"{name}.txt"
        if not raw.exists():
            log = out / f"{name}.py-spy.log"
            print(f"[profile] {name}: no samples written; {log}:\n{log.read_text(errors='replace')[-2000:]}")
            continue
        profile = Profile.read(name, raw)
        (out / f"{name}.speedscope.json").write_text(json.dumps(profile.speedscope()))
        text = profile.summary(seconds, meta["rate"])
        top = out / f"{name}.top.txt"
        top.write_text(text)
        written.append(top)
        print("\n" + text)
    return written


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    bench_args: list[str] = []
    if "--" in argv:
        argv, bench_args = argv[: argv.index("--")], argv[argv.index("--") + 1:]
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bench", choices=list(BENCHES), nargs="?")
    parser.add_argument("--summarize", type=Path, metavar="DIR",
                        help="only rewrite the summaries of an earlier run's directory")
    parser.add_argument("--duration", type=float, help="seconds to sample from the load's start (default: all of it)")
    parser.add_argument("--out", type=Path, help="directory for the files (default .run/profiles/BENCH-<time>)")
    parser.add_argument("--rate", type=int, default=100, help="samples per second (py-spy's default 100)")
    parser.add_argument("--nonblocking", action="store_true", help="don't pause the processes to sample them")
    parser.add_argument("--no-self", action="store_true", help="don't sample the bench's own process")
    parser.add_argument("--all-threads", action="store_true",
                        help="sample every thread not idle, not only the one holding the GIL (py-spy --gil, "
                             "the default: threads waiting in C, a pool's queue or epoll count as idle then)")
    args = parser.parse_args(argv)
    if args.summarize:
        summarize(args.summarize)
        return 0
    if not args.bench:
        parser.error("name a bench")
    out = args.out or RUN_DIR / "profiles" / f"{args.bench}-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    py_spy()
    profiler = PySpyProfiler(out, rate=args.rate, duration=args.duration, nonblocking=args.nonblocking,
                             gil=not args.all_threads, include_self=not args.no_self)
    bench_stack.OBSERVER = profiler
    try:
        code, entry = run_one(args.bench, bench_args)
    finally:
        bench_stack.OBSERVER = None
        profiler.stop()
    (out / "figures.json").write_text(json.dumps({args.bench: entry}, indent=2) + "\n")
    (out / "profile.json").write_text(json.dumps({
        "bench": args.bench, "args": bench_args, "rate": args.rate, "gil": not args.all_threads,
        "seconds": {sampler.name: round(seconds, 1) for sampler, seconds in profiler.done}}, indent=2) + "\n")
    written = summarize(out)
    print(f"[profile] {len(written)} profiles in {out}")
    return code


if __name__ == "__main__":
    sys.exit(main())
