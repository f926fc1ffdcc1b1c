# The replay of replay.py (CFS-like policy, granularity 3 ms, sleeper credit 3 ms) with X seconds of core
# work added to each action that follows a received transfer. Run from the repository root:
#   python benchmarks/results/2026-12-07-oversubscribed-replay/replay_transfer_work.py
import glob, statistics as st, sys
sys.path.insert(0, 'benchmarks/results/2026-12-07-oversubscribed-replay')
import replay

def with_x(acts, x):
    return {r: [(k, d, c + (x if d is not None and d[4] in ('f', 'b') else 0.0)) for k, d, c in lst]
            for r, lst in acts.items()}

sets = {
    'pp2dp2': 'benchmarks/results/2026-12-0[67]-fidelity-session*/gpt2-tiny-pp2-dp2-zero1-r*.run.json',
    'pp4': 'benchmarks/results/2026-12-0[67]-fidelity-session*/llama-tiny-pp4-1f1b-r*.run.json',
    'gpt2pp2': 'benchmarks/results/2026-12-07-fidelity-session2*/gpt2-tiny-pp2-1f1b-r*.run.json',
    'llamapp2': 'benchmarks/results/2026-12-07-fidelity-session2*/llama-tiny-pp2-1f1b-r*.run.json',
}
data = {k: [replay.prep(f) for f in sorted(glob.glob(v))] for k, v in sets.items()}
for x in (0.0, 0.0005, 0.001, 0.0015):
    for lat in (0.0005, 0.00075):
        line = []
        for k, runs in data.items():
            errs = [replay.run(with_x(a, x), 2, 0.003, 0.003, lat, lat, 0.0002, dt=5e-5) / m - 1 for a, m, n in runs]
            line.append(f"{k}({len(errs)}) med {st.median(errs)*100:+5.1f}% [{min(errs)*100:+.0f},{max(errs)*100:+.0f}]")
        print(f"X {x*1e3:.2f} L {lat*1e3:.2f}: " + '  '.join(line), flush=True)
