"""Compare two `refactor_check.sh` outputs: every value the older run logged must be equal in the newer
one (bit for bit); keys or lines only the newer run has are listed, not counted as differences.

    python benchmarks/refactor_compare.py runs/check-before runs/check-after
"""

import json
import sys
from collections import defaultdict
from pathlib import Path


def _lines(root: str) -> dict[str, dict[int, dict]]:
    runs: dict[str, dict[int, dict]] = defaultdict(dict)
    for line in (Path(root) / "losses.txt").read_text().splitlines():
        run, record = line.split(" ", 1)
        record = json.loads(record)
        runs[run][record["step"]] = {**runs[run].get(record["step"], {}), **record}
    return runs


def main() -> int:
    before, after = _lines(sys.argv[1]), _lines(sys.argv[2])
    differ, added = [], set()
    for run, steps in before.items():
        for step, record in steps.items():
            new = after.get(run, {}).get(step)
            if new is None:
                differ.append(f"{run} step {step}: missing")
                continue
            differ += [f"{run} step {step} {k}: {v!r} -> {new.get(k)!r}" for k, v in record.items() if new.get(k) != v]
            added |= {f"{run}: {k}" for k in set(new) - set(record)}
        added |= {f"{run}: step {s} line" for s in set(after.get(run, {})) - set(steps)}
    compared = sum(len(r) for steps in before.values() for r in steps.values())
    print(f"{compared} logged values compared, {len(differ)} differ")
    print("\n".join(differ))
    if added:
        print("only in the newer run:\n  " + "\n  ".join(sorted(added)))
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
