import importlib.util, sys, time, statistics, torch, random
from kangaroo_rt import _cpu_ext
torch.set_num_threads(2)
names = sys.argv[1].split(",")
rows = [int(v) for v in sys.argv[2].split(",")]
reps = int(sys.argv[3]) if len(sys.argv) > 3 else 15
mods = {}
for n in names:
    spec = importlib.util.spec_from_file_location(f"kangaroo_rt_v_{n}._cpu", f"/tmp/s25/v_{n}.so")
    m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); mods[n] = m
torch.manual_seed(0)
heads = [(torch.randn(49152, 576) * 0.05).bfloat16() for _ in range(4)]
screens = [list(_cpu_ext.make_head_screen(w)) for w in heads]
xs = {M: (torch.randn(M, 576) * 3).bfloat16() for M in rows}
times = {(n, M): [] for n in names for M in rows}
for r in range(reps):
    for M in rows:
        order = names[:] if r % 2 == 0 else names[::-1]
        random.Random(r * 31 + M).shuffle(order)
        for n in order:
            m = mods[n]
            [m.screened_argmax(xs[M], w, s) for w, s in zip(heads, screens)]
            t0 = time.perf_counter()
            [m.screened_argmax(xs[M], w, s) for w, s in zip(heads, screens)]
            times[(n, M)].append((time.perf_counter() - t0) / 4 * 1e3)
base = names[0]
print("ms per head (median); ratio vs", base)
for M in rows:
    b = statistics.median(times[(base, M)])
    print(f"M={M}: " + "  ".join(f"{n} {statistics.median(times[(n,M)]):.3f} ({statistics.median(times[(n,M)])/b:.2f}x)" for n in names))
