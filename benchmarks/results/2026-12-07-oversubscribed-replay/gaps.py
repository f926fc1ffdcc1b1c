# Per action of a recorded step: when it could start (its own previous action and its producer), when it started,
# and how much the other ranks computed in between.
#   python benchmarks/results/2026-12-07-oversubscribed-replay/gaps.py benchmarks/results/2026-12-07-fidelity-session22/gpt2-tiny-pp2-dp2-zero1-r1.run.json
import json, sys
d = json.load(open(sys.argv[1])); ev = d['events']; mesh = d['plan_data']['mesh']; dp, tp = mesh['dp'], mesh['tp']
nst = max(e['stage'] for e in ev)+1
idx = {(e['rank'], e['kind'], e['stage'], e['microbatch']): e for e in ev}
owner = {(e['stage'], (e['rank']//tp)%dp): e['rank'] for e in ev}
byr = {}
for e in ev: byr.setdefault(e['rank'], []).append(e)
for r in sorted(byr):
    prev_end = 0
    for e in sorted(byr[r], key=lambda e: e['start_s']):
        s, m, k = e['stage'], e['microbatch'], e['kind']; dd = (r//tp)%dp
        if k == 'F' and s > 0: p = idx[(owner[(s-1, dd)], 'F', s-1, m)]
        elif k != 'F' and s < nst-1: p = idx[(owner[(s+1, dd)], 'B', s+1, m)]
        else: p = None
        dep_end = p['end_s'] if p else 0
        ready = max(prev_end, dep_end)
        # how many other ranks were computing during [ready, start]
        busy = 0.0
        for o in ev:
            if o['rank'] == r: continue
            busy += max(0, min(o['end_s'], e['start_s']) - max(o['start_s'], ready))
        print(f"r{r} {k}{s}.{m} start {e['start_s']*1e3:6.2f} ready {ready*1e3:6.2f} (own {prev_end*1e3:6.2f} dep {dep_end*1e3:6.2f}) late {1e3*(e['start_s']-ready):5.2f} others-busy-in-gap {busy*1e3:5.2f} wall {1e3*(e['end_s']-e['start_s']):5.2f} cpu {1e3*e['cpu_s']:5.2f}")
        prev_end = e['end_s']
