"""`--compare OLD.json`: each row's time against the matching row of a recorded run.

The ratio new / old median has an interval from the two medians' 95% intervals (new low / old high
to new high / old low; p20-p80 for runs recorded before the intervals). A row is SLOWER when all
of it is above 1, faster when all of it is below 1, and within noise otherwise."""
import json
from typing import Any

Row = dict[str, Any]  # a row of a run (bench.runner.run_case)


def _key(r: Row) -> tuple[str, str, str, str]:
    return r["op"], r["case"], r["dtype"], r["backend"]


def _interval(r: Row) -> tuple[float, float]:
    if r.get("ci_low_ms") is not None:
        return r["ci_low_ms"], r["ci_high_ms"]
    return r["p20_ms"], r["p80_ms"]


def ratio_interval(new: Row, old: Row) -> tuple[float, float]:
    """(low, high) of new / old median."""
    (nlo, nhi), (olo, ohi) = _interval(new), _interval(old)
    return nlo / ohi, nhi / olo


def compare(rows: list[Row], old_path: str) -> list[tuple[Row, Row, float, bool]]:
    """[(row, old row, new / old median ratio, slower flag)] for rows timed in both runs."""
    with open(old_path) as f:
        old = {_key(r): r for r in json.load(f)["rows"]}
    out = []
    for r in rows:
        o = old.get(_key(r))
        if o is None or r["median_ms"] is None or o.get("median_ms") is None:
            continue
        out.append((r, o, r["median_ms"] / o["median_ms"], ratio_interval(r, o)[0] > 1))
    return out


def format_compare(pairs: list[tuple[Row, Row, float, bool]], old_path: str) -> str:
    if not pairs:
        return f"compare: no row matches {old_path}"
    lines = [f"compare with {old_path} (ratio = new / old median and its interval; SLOWER / faster: all of the "
             "interval above / below 1):"]
    w = max(len("/".join(_key(r))) for r, *_ in pairs)
    for r, o, ratio, slower in pairs:
        lo, hi = ratio_interval(r, o)
        verdict = "SLOWER" if slower else "faster" if hi < 1 else "~ (noise)"
        lines.append(f"  {'/'.join(_key(r)):<{w}}  {o['median_ms']:10.4g} -> {r['median_ms']:10.4g} ms  "
                     f"x{ratio:6.3g} [{lo:.3g}-{hi:.3g}]  {verdict}")
    n = sum(s for *_, s in pairs)
    lines.append(f"{n} of {len(pairs)} matching rows slower beyond their intervals")
    return "\n".join(lines)
