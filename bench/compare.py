"""`python -m bench.compare OLD.json NEW.json`: two `python -m bench --json` runs side by side.

Prints, per bench, each figure and ratio of either run with its old value, new value and the change
in %, marked `+` where the change is for the better (higher rate, lower latency) and `-` where it is
worse; then the checks of both runs and the load average each ran under (the machine is shared, so a
change smaller than the load's own swing says little).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:,.3g}" if abs(value) < 1 else f"{value:,.1f}"


def change(old: float | None, new: float | None, better: str) -> str:
    if old is None or new is None:
        return ""
    if old == 0:
        return "" if new == 0 else "(new)"
    pct = (new - old) / abs(old) * 100
    if abs(pct) < 0.05:
        return "0.0%"
    good = (pct > 0) == (better == "higher")
    return f"{pct:+.1f}% {'+' if good else '-'}"


def _load(machine: dict[str, Any] | None) -> str:
    if not machine:
        return "?"
    before, after = machine.get("loadavg_before") or [math.nan], machine.get("loadavg_after") or [math.nan]
    return f"{machine.get('date', '?')}, nproc {machine.get('nproc')}, load {before[0]:.2f} -> {after[0]:.2f}"


def compare(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    width = 56
    for bench in [*old, *(b for b in new if b not in old)]:
        a, b = old.get(bench, {}), new.get(bench, {})
        lines.append(f"\n== {bench}")
        lines.append(f"   old: {_load(a.get('machine'))}")
        lines.append(f"   new: {_load(b.get('machine'))}")
        lines.append(f"{'figure':<{width}} {'old':>12} {'new':>12}  change")
        figures_a, figures_b = a.get("figures", {}), b.get("figures", {})
        for name in [*figures_a, *(n for n in figures_b if n not in figures_a)]:
            fa, fb = figures_a.get(name, {}), figures_b.get(name, {})
            unit = fb.get("unit") or fa.get("unit", "")
            better = fb.get("better") or fa.get("better", "higher")
            va, vb = fa.get("value"), fb.get("value")
            lines.append(f"{name + ' (' + unit + ')':<{width}} {_fmt(va):>12} {_fmt(vb):>12}  {change(va, vb, better)}")
        ratios_a, ratios_b = a.get("ratios", {}), b.get("ratios", {})
        for name in [*ratios_a, *(n for n in ratios_b if n not in ratios_a)]:
            ra, rb = ratios_a.get(name, {}), ratios_b.get(name, {})
            va, vb = ra.get("value"), rb.get("value")
            target = rb.get("target") or ra.get("target")
            shown = [("-" if v is None else f"{v:.1%}") for v in (va, vb)]
            lines.append(f"{'ratio ' + name:<{width}} {shown[0]:>12} {shown[1]:>12}  {change(va, vb, 'higher')}"
                         + (f"  (target {target})" if target else ""))
        checks_a, checks_b = a.get("checks", {}), b.get("checks", {})
        for name in [*checks_a, *(n for n in checks_b if n not in checks_a)]:
            shown = [("-" if name not in c else ("ok" if c[name]["ok"] else "FAIL")) for c in (checks_a, checks_b)]
            detail = (checks_b.get(name) or checks_a.get(name) or {}).get("detail", "")
            lines.append(f"{'check ' + name:<{width}} {shown[0]:>12} {shown[1]:>12}  {detail}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    args = parser.parse_args(argv)
    try:
        old, new = (json.loads(p.read_text()) for p in (args.old, args.new))
    except (OSError, ValueError) as exc:
        print(f"cannot read the runs: {exc}", file=sys.stderr)
        return 2
    print("\n".join(compare(old, new)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
