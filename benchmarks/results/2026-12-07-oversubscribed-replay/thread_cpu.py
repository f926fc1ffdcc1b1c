# Runs a command and, after WAIT seconds, meters each autopart rank process thread by thread (schedstat, ns) for SPAN
# seconds, and the machine busy fraction (/proc/stat):
#   WAIT=22 SPAN=8 python thread_cpu.py python -m torch.distributed.run --standalone --nproc-per-node 4 -m partitioner run --plan PLAN --steps 400 --warmup 2 --json RUN.json
import os, time, sys, subprocess, json
def stat():
    v = list(map(int, open('/proc/stat').readline().split()[1:]))
    return sum(v), v[3] + v[4]
def procs():
    out = {}
    for pid in os.listdir('/proc'):
        if not pid.isdigit(): continue
        try:
            cmd = open(f'/proc/{pid}/cmdline').read()
        except Exception: continue
        if 'partitioner' in cmd and 'run' in cmd and 'torch.distributed.run' not in cmd:
            th = {}
            for tid in os.listdir(f'/proc/{pid}/task'):
                try:
                    ns = int(open(f'/proc/{pid}/task/{tid}/schedstat').read().split()[0])
                    name = open(f'/proc/{pid}/task/{tid}/comm').read().strip()
                except Exception: continue
                th[tid] = (name, ns)
            out[pid] = th
    return out
p = subprocess.Popen(sys.argv[1:])
time.sleep(float(os.environ.get('WAIT', 25)))
t0, i0 = stat(); p0 = procs(); w0 = time.time()
time.sleep(float(os.environ.get('SPAN', 8)))
t1, i1 = stat(); p1 = procs(); w1 = time.time()
print(f"window {w1-w0:.2f}s  busy fraction of 2 cores: {1 - (i1-i0)/(t1-t0):.3f}")
hz = 1e9
for pid in sorted(p1):
    tot = 0; parts = {}
    for tid, (name, c) in p1[pid].items():
        d = c - p0.get(pid, {}).get(tid, (name, 0))[1]
        tot += d
        parts[name] = parts.get(name, 0) + d
    print(pid, f"cpu {tot/hz/(w1-w0)*100:.1f}% of a core", {k: round(v/hz/(w1-w0)*100, 1) for k, v in parts.items() if v})
p.wait()
