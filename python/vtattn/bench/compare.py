"""`--compare OLD.json`: each row's time against the matching row of a recorded run.

A row is flagged slower when its new p20 is above the old p80: the new run's fast end is slower
than the old run's slow end, so the gap exceeds the run-to-run spread measured in both runs."""
import json


def _key(r):
    return r["op"], r["case"], r["dtype"], r["backend"]


def compare(rows, old_path):
    """[(row, old row, new / old median ratio, slower flag)] for rows timed in both runs."""
    with open(old_path) as f:
        old = {_key(r): r for r in json.load(f)["rows"]}
    out = []
    for r in rows:
        o = old.get(_key(r))
        if o is None or r["median_ms"] is None or o.get("median_ms") is None:
            continue
        out.append((r, o, r["median_ms"] / o["median_ms"], r["p20_ms"] > o["p80_ms"]))
    return out


def format_compare(pairs, old_path) -> str:
    if not pairs:
        return f"compare: no row matches {old_path}"
    lines = [f"compare with {old_path} (ratio = new / old median; SLOWER = new p20 > old p80):"]
    w = max(len("/".join(_key(r))) for r, *_ in pairs)
    for r, o, ratio, slower in pairs:
        lines.append(f"  {'/'.join(_key(r)):<{w}}  {o['median_ms']:10.3f} -> {r['median_ms']:10.3f} ms  "
                     f"x{ratio:6.2f}{'  SLOWER' if slower else ''}")
    n = sum(s for *_, s in pairs)
    lines.append(f"{n} of {len(pairs)} matching rows slower than the measured spread")
    return "\n".join(lines)
