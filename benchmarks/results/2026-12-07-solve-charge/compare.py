"""Per case of two folders of run_matrix reports (.json): the expert's step, and the ILP's step, origin
and wall time in each. Used for benchmarks/results/2026-12-07-solve-charge.md:

    python benchmarks/results/2026-12-07-solve-charge/compare.py OLD_FOLDER NEW_FOLDER
"""

import glob
import json
import os
import sys


def row(case, method):
    for r in case["rows"] if case else ():
        if r["method"] == method and not r.get("error"):
            return r
    return None


def main(old: str, new: str) -> None:
    for path in sorted(glob.glob(os.path.join(new, "*.json"))):
        before = os.path.join(old, os.path.basename(path))
        if not os.path.exists(before) or os.path.basename(path) == "summary.json":
            continue
        olds = {c["title"]: c for c in json.load(open(before))["cases"]}
        for case in json.load(open(path))["cases"]:
            expert, a, b = row(case, "expert"), row(olds.get(case["title"]), "ilp"), row(case, "ilp")
            if expert is None or b is None:
                print(f"{case['title']:42s} no plan")
                continue
            e = expert["predicted"]["step_time_s"]

            def show(r):
                if r is None:
                    return "no plan"
                return f"{r['predicted']['step_time_s']:.4f} s {r['solver']['origin']} ({r['solver']['wall_s']:.1f} s)"

            print(f"{case['title']:42s} expert {e:.4f} s | before {show(a)} | after {show(b)} | after over expert "
                  f"{e / b['predicted']['step_time_s']:.3f}x")


if __name__ == "__main__":
    main(*sys.argv[1:3])
