# Per recorded pp2 x dp2 step: how long stage 1's last backward is held beyond its CPU time (DDP's reducer
# waits for the all-reduce inside it) against its other backwards, and when stage 0's last backward starts
# after stage 1's last compute. From the repository root:
#   python benchmarks/results/2026-12-07-oversubscribed-replay/reduction_wait.py
import glob
import json
import statistics as st

RUNS = 'benchmarks/results/2026-12-0[67]-fidelity-session*/gpt2-tiny-pp2-dp2-zero1-r*.run.json'
held, gap, other = [], [], []
for f in sorted(glob.glob(RUNS)):
    ev = json.load(open(f))['events']
    last = max(e['microbatch'] for e in ev)
    for r1, r0 in ((2, 0), (3, 1)):  # stage 1's rank and the stage-0 rank of the same replica
        b1 = next(e for e in ev if e['rank'] == r1 and e['kind'] == 'B' and e['microbatch'] == last)
        b0 = next(e for e in ev if e['rank'] == r0 and e['kind'] == 'B' and e['microbatch'] == last)
        held.append((b1['end_s'] - b1['start_s']) - b1['cpu_s'])
        gap.append(b0['start_s'] - (b1['start_s'] + b1['cpu_s']))  # each rank's own clock: +-1 ms
    other += [(e['end_s'] - e['start_s']) - e['cpu_s'] for e in ev
              if e['rank'] in (2, 3) and e['kind'] == 'B' and e['microbatch'] < last]
ms = lambda xs: f"median {st.median(xs) * 1e3:.2f} ms, {min(xs) * 1e3:.2f} to {max(xs) * 1e3:.2f}"
print(f"{len(held)} stage-1 last backwards: wall - CPU {ms(held)}")
print(f"{len(other)} stage-1 earlier backwards: wall - CPU {ms(other)}")
print(f"stage 0's last backward starts after stage 1's last compute ends: {ms(gap)}")
