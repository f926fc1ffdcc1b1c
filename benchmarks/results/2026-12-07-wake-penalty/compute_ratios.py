"""Per fidelity layout: its runs' measured compute (forward and backward, every rank, as `autopart run`'s own
clock counts it, over tp x dp) over the plan's predicted compute (forward, backward and recomputation of every
stage), and its measured step over the predicted one; the median over the layout's runs.

    python benchmarks/results/2026-12-07-wake-penalty/compute_ratios.py "benchmarks/results/2026-12-07-fidelity-session26/*.run.json"
"""
import collections
import glob
import json
import statistics
import sys

rows = collections.defaultdict(list)
for f in sorted(glob.glob(sys.argv[1])):
    run = json.load(open(f))
    plan = run["plan_data"]
    layout = f.split("/")[-1].rsplit("-r", 1)[0]
    predicted = sum(s["predicted"]["components"]["forward_s"] + s["predicted"]["components"]["backward_s"]
                    + s["predicted"]["components"].get("recompute_s", 0) for s in plan["stages"])
    measured = sum(s["forward_s"] + s["backward_s"] for t in run["times"] for s in t["stages"])
    measured /= plan["mesh"]["dp"] * plan["mesh"]["tp"]
    step = statistics.fmean(run["step_times_s"]) / plan["predicted"]["step_time_s"]
    rows[layout].append((measured / predicted, step))
for layout, v in rows.items():
    c = [x[0] for x in v]
    print(f"{layout:36s} runs {len(v)}  compute measured/predicted: median {statistics.median(c):.2f} "
          f"[{min(c):.2f}-{max(c):.2f}]  step measured/predicted: median {statistics.median(x[1] for x in v):.2f}")
