"""For each layout of a fidelity run: the plan's prediction with its calibrated a_p2p (as planned) and
re-priced without it (p2p_transfer_us removed from the cluster), against the same measured step."""
import json, statistics, subprocess, sys, tomllib
from pathlib import Path
import tomli_w
keep = Path(sys.argv[1])
rows = []
for run_path in sorted(keep.glob("*.run.json")):
    slug = run_path.name.removesuffix(".run.json")
    run = json.loads(run_path.read_text())
    meas = statistics.fmean(run["step_times_s"])
    with_p2p = run["plan_data"]["predicted"]["step_time_s"]
    cal = tomllib.loads((keep / f"calibrated-{slug}.toml").read_text())
    x = cal.get("overheads", {}).pop("p2p_transfer_us", 0.0)
    tp = keep / f"{slug}.nop2p.toml"; tp.write_text(tomli_w.dumps(cal))
    made = json.loads((keep / f"{slug}.plan.json").read_text())
    made["cluster"].get("overheads", {}).pop("p2p_transfer_us", None)
    pin = keep / f"{slug}.nop2p.in.json"; pin.write_text(json.dumps(made, indent=1))
    pout = keep / f"{slug}.nop2p.plan.json"
    model = run["plan_data"]["model"]["name"]
    subprocess.run([sys.executable, "-m", "partitioner", "plan", "--plan", str(pin), "--model", model, "--cluster", str(tp),
                    "--profile", "--cache", str(keep / "profile.sqlite"), "--quiet", "--json", str(pout)], check=True,
                   capture_output=True)
    without = json.loads(pout.read_text())["predicted"]["step_time_s"]
    rows.append((slug, x, meas, without, with_p2p))
    print(f"| {slug.replace('-', ' ')} | {x:.0f} us | {meas*1e3:.1f} ms | {without*1e3:.1f} ms ({without/meas-1:+.1%}) | {with_p2p*1e3:.1f} ms ({with_p2p/meas-1:+.1%}) |", flush=True)
e0 = [abs(r[3] / r[2] - 1) for r in rows]; e1 = [abs(r[4] / r[2] - 1) for r in rows]
print(f"without a_p2p: median |error| {statistics.median(e0):.1%}, worst {max(e0):.1%}; with: median {statistics.median(e1):.1%}, worst {max(e1):.1%}")
