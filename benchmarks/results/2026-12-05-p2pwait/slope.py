"""Quiet final fidelity run: per pipeline layout, the number of transfers on the critical path (slope of the
predicted step in a_p2p, re-priced with a borrowed profile cache) and the a_p2p that would zero its error."""
import json, statistics, subprocess, sys, tempfile, tomllib, shutil
from pathlib import Path
import tomli_w
keep = Path(sys.argv[1]); cache = Path(sys.argv[2]); work = Path(tempfile.mkdtemp(prefix="p2pw-slope-"))
for slug in sys.argv[3:]:
    run = json.loads((keep / f"{slug}.run.json").read_text())
    meas = statistics.fmean(run["step_times_s"]); pred = run["plan_data"]["predicted"]["step_time_s"]
    model = run["plan_data"]["model"]["name"]
    out = {}
    for x in (0, 1000):
        cal = tomllib.loads((keep / f"calibrated-{slug}.toml").read_text())
        made = json.loads((keep / f"{slug}.plan.json").read_text())
        cal.setdefault("overheads", {})["p2p_transfer_us"] = x  # 0 as well: the slope is between 0 and 1 ms
        made["cluster"].setdefault("overheads", {})["p2p_transfer_us"] = x
        tp = work / f"{slug}-{x}.toml"; tp.write_text(tomli_w.dumps(cal))
        pin = work / f"{slug}-{x}.in.json"; pin.write_text(json.dumps(made))
        pout = work / f"{slug}-{x}.out.json"
        r = subprocess.run([sys.executable, "-m", "partitioner", "plan", "--plan", str(pin), "--model", model, "--cluster", str(tp),
                        "--profile", "--cache", str(cache), "--quiet", "--json", str(pout)], capture_output=True, text=True)
        if r.returncode: print(slug, r.stderr[-300:]); break
        out[x] = json.loads(pout.read_text())["predicted"]["step_time_s"]
    else:
        k = (out[1000] - out[0]) / 1e-3
        print(f"| {slug} | {pred*1e3:.1f} | {meas*1e3:.1f} | {pred/meas-1:+.1%} | {k:.2f} | {(meas-pred)/k*1e6 if k else float('nan'):.0f} |", flush=True)
