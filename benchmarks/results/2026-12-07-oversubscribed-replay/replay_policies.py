# Runs from the repository root: python benchmarks/results/2026-12-07-oversubscribed-replay/replay_policies.py
import json, glob, statistics as st, sys
sys.path.insert(0, 'benchmarks/results/2026-12-07-oversubscribed-replay')
from replay import prep

def run(acts, cores, Lf, Lb, Lloss, send_block, policy, dt=2.5e-5, X=0.0):
    """policy 'waker': a rank becoming ready after blocking preempts the running rank that started running longest ago.
    send_block: the sender of a transfer cannot start its next action for this long after its action ends."""
    ranks = sorted(acts)
    done = {}; pos = {r: 0 for r in ranks}; rem = {r: None for r in ranks}
    blocked = {r: True for r in ranks}; since = {r: 0.0 for r in ranks}; prio = {r: 0.0 for r in ranks}
    hold = {r: 0.0 for r in ranks}
    running = []; t = 0.0; end = 0.0
    lat = {'f': Lf, 'b': Lb, 'loss': Lloss}
    sends = set()
    for r in ranks:
        for k, d, c in acts[r]:
            if d is not None and d[4] in ('f', 'b'): sends.add(d[:4])
    def ready(r):
        if pos[r] >= len(acts[r]) or t < hold[r] - 1e-12: return False
        key, dep, c = acts[r][pos[r]]
        if dep is None: return True
        dk = dep[:4]
        return dk in done and done[dk] + lat[dep[4]] <= t + 1e-12
    while any(pos[r] < len(acts[r]) for r in ranks):
        rd = []
        for r in ranks:
            if rem[r] is None and ready(r):
                rem[r] = acts[r][pos[r]][2] + (X if acts[r][pos[r]][1] is not None and acts[r][pos[r]][1][4] in 'fb' else 0)
                if blocked[r]:
                    blocked[r] = False; prio[r] = t
            if rem[r] is not None: rd.append(r)
        running = [r for r in running if r in rd]
        if policy == 'waker':
            waiting = sorted([r for r in rd if r not in running], key=lambda x: -prio[x])
        else:
            waiting = sorted([r for r in rd if r not in running], key=lambda x: prio[x])
        while len(running) < cores and waiting:
            x = waiting.pop(0); running.append(x); since[x] = t
        if policy == 'waker':
            while waiting and prio[waiting[0]] > max(since[x] for x in running) :
                old = min(running, key=lambda x: since[x])
                if prio[waiting[0]] <= since[old]: break
                running.remove(old); x = waiting.pop(0); running.append(x); since[x] = t
        for r in running: rem[r] -= dt
        t += dt
        for r in list(running):
            if rem[r] <= 0:
                key = acts[r][pos[r]][0]; done[key] = t; end = max(end, t)
                pos[r] += 1; rem[r] = None
                if key in sends: hold[r] = t + send_block
                if not ready(r): blocked[r] = True; running.remove(r)
        if t > 10: raise RuntimeError('stuck')
    return end

sets = {
 'pp2dp2': sorted(glob.glob('benchmarks/results/2026-12-0[67]-fidelity-session*/gpt2-tiny-pp2-dp2-zero1-r*.run.json')),
 'pp4': sorted(glob.glob('benchmarks/results/2026-12-0[67]-fidelity-session*/llama-tiny-pp4-1f1b-r*.run.json')),
 'gpt2pp2': sorted(glob.glob('benchmarks/results/2026-12-07-fidelity-session2*/gpt2-tiny-pp2-1f1b-r*.run.json')),
 'llamapp2': sorted(glob.glob('benchmarks/results/2026-12-07-fidelity-session2*/llama-tiny-pp2-1f1b-r*.run.json')),
}
data = {k: [prep(f) for f in v] for k, v in sets.items()}
for policy in ('waker', 'fifo'):
  for sb in (0.0, 0.0005, 0.00075):
    for L in (0.0005, 0.00075):
        line = []
        for k, runs in data.items():
            errs = [run(a, 2, L, L, 0.0002, sb, policy, dt=5e-5) / m - 1 for a, m, n in runs]
            line.append(f"{k} med {st.median(errs)*100:+5.1f}% [{min(errs)*100:+.0f},{max(errs)*100:+.0f}]")
        print(f"{policy} sendblock {sb*1e3:.2f} L {L*1e3:.2f}: " + '  '.join(line), flush=True)
