import json, sys, itertools
rec = json.load(open(sys.argv[1]))
rounds = [(c, a) for c, a in zip(rec["confs"], rec["acc"]) if len(c) == 6]
print("rounds", len(rounds), "of", len(rec["acc"]))
PLAIN = 7.4; S = 0.394; A = 0.16
def run(rule, gamma, thr, V1, v):
    tok = cost = 0.0; nk = 0
    for c, a in rounds:
        k = gamma
        prod = 1.0
        for s in range(1, gamma + 1):
            x = c[s - 1]
            prod *= x
            val = x if rule == "single" else prod
            if val < thr:
                k = s; break
        tok += min(a, k) + 1
        cost += (k + 1) * S + k * A + V1 + v * k
        nk += k
    return tok / len(rounds), cost / len(rounds), (tok / cost) * PLAIN, nk / len(rounds)
for V1, v in ((6.95, 0.3), (6.95, 0.8)):
    print(f"--- verify(n) = {V1} + {v} (n-1)")
    best = []
    for rule in ("single", "product"):
        for gamma in (3, 4, 5, 6):
            for thr in [x / 20 for x in range(0, 20)]:
                mat, cost, sp, k = run(rule, gamma, thr, V1, v)
                best.append((sp, rule, gamma, thr, mat, k))
    best.sort(reverse=True)
    for rule in ("single", "product"):
        rows = [b for b in best if b[1] == rule][:5]
        for b in rows: print(f"{b[1]:8s} gamma {b[2]} thr {b[3]:.2f}: speed {b[0]:.3f}x MAT {b[4]:.3f} k {b[5]:.2f}")
    print("shipped", run("single", 6, 0.7, V1, v))
