# A recorded step (a fidelity run.json) replayed on CORES cores: each action takes its measured CPU time, waits for its
# producer plus a latency, and a CFS-like scheduler (virtual runtime, granularity, sleeper credit) gives the cores.
# From the repository root:
#   python benchmarks/results/2026-12-07-oversubscribed-replay/replay.py "benchmarks/results/2026-12-07-fidelity-session2[12]/gpt2-tiny-pp2-dp2-zero1-r*.run.json"
import json, sys, glob, statistics as st, itertools

def prep(path):
    d = json.load(open(path)); ev = d['events']; mesh = d['plan_data']['mesh']
    dp, tp = mesh['dp'], mesh['tp']
    ranks = sorted({e['rank'] for e in ev})
    order = {r: sorted([e for e in ev if e['rank']==r], key=lambda e: e['start_s']) for r in ranks}
    nst = max(e['stage'] for e in ev)+1
    owner = {(e['stage'], (e['rank']//tp) % dp): e['rank'] for e in ev}
    acts = {}
    for r in ranks:
        lst = []
        for e in order[r]:
            s, m, k = e['stage'], e['microbatch'], e['kind']; dd = (r//tp) % dp
            if k == 'F': dep = (owner[(s-1, dd)], 'F', s-1, m, 'f') if s > 0 else None
            else: dep = (owner[(s+1, dd)], 'B', s+1, m, 'b') if s < nst-1 else (r, 'F', s, m, 'loss')
            lst.append(((r, k, s, m), dep, e['cpu_s']))
        acts[r] = lst
    meas = max(e['end_s'] for e in ev) - min(e['start_s'] for e in ev)
    return acts, meas, len(ranks)

def run(acts, cores, gran, bonus, Lf, Lb, Lloss, dt=2.5e-5):
    ranks = sorted(acts)
    done = {}; pos = {r: 0 for r in ranks}; rem = {r: None for r in ranks}; v = {r: 0.0 for r in ranks}
    blocked = {r: True for r in ranks}; running = []; t = 0.0; end = 0.0
    lat = {'f': Lf, 'b': Lb, 'loss': Lloss}
    def ready(r):
        if pos[r] >= len(acts[r]): return False
        key, dep, c = acts[r][pos[r]]
        if dep is None: return True
        dk = dep[:4]
        return dk in done and done[dk] + lat[dep[4]] <= t + 1e-12
    while any(pos[r] < len(acts[r]) for r in ranks):
        rd = []
        for r in ranks:
            if rem[r] is None and ready(r):
                rem[r] = acts[r][pos[r]][2]
                if blocked[r]:
                    others = [v[x] for x in ranks if x != r and (rem[x] is not None)]
                    if others: v[r] = max(v[r], min(others) - bonus)
                    blocked[r] = False
            if rem[r] is not None: rd.append(r)
        running = [r for r in running if r in rd]
        waiting = sorted([r for r in rd if r not in running], key=lambda x: v[x])
        while len(running) < cores and waiting:
            running.append(waiting.pop(0))
        while waiting:
            worst = max(running, key=lambda x: v[x])
            if v[waiting[0]] + gran < v[worst]:
                running.remove(worst); running.append(waiting.pop(0)); waiting.append(worst); waiting.sort(key=lambda x: v[x])
            else: break
        for r in running: rem[r] -= dt; v[r] += dt
        t += dt
        for r in list(running):
            if rem[r] <= 0:
                key = acts[r][pos[r]][0]; done[key] = t; end = max(end, t)
                pos[r] += 1; rem[r] = None
                if not ready(r): blocked[r] = True
        if t > 10: raise RuntimeError('stuck')
    return end

if __name__ == '__main__':
    pat = sys.argv[1]
    files = sorted(glob.glob(pat))
    data = [(f, *prep(f)) for f in files]
    grid = dict(gran=[0.0015, 0.003, 0.006, 1.0], bonus=[0.0, 0.003, 0.006], Lf=[0.0005, 0.00075], Lb=[0.0005, 0.00075], Lloss=[0.0002])
    res = []
    for g, b, lf, lb, ll in itertools.product(*grid.values()):
        errs = [run(a, 2, g, b, lf, lb, ll) / m - 1 for f, a, m, n in data]
        res.append((st.median([abs(e) for e in errs]), g, b, lf, lb, st.mean(errs), max(errs), min(errs)))
        print(f"gran {g*1e3:6.1f} bonus {b*1e3:.1f} Lf {lf*1e3:.2f} Lb {lb*1e3:.2f}: median|err| {res[-1][0]*100:5.1f}% mean {res[-1][5]*100:+5.1f}% range {res[-1][7]*100:+.1f}..{res[-1][6]*100:+.1f}", flush=True)
