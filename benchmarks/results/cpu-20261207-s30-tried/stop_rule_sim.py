import json, sys
rec = json.load(open(sys.argv[1]))
G = 10
rounds = [(c, a) for c, a in zip(rec["confs"], rec["acc"]) if len(c) == G]
print("rounds", len(rounds), "of", len(rec["acc"]))
PLAIN = 6.5; S = 0.39; A = 0.16
def run(gamma, thr, V1, v):
    tok = cost = 0.0
    for c, a in rounds:
        k = gamma
        for s in range(1, gamma + 1):
            if c[s - 1] < thr: k = s; break
        tok += min(a, k) + 1
        cost += (k + 1) * S + k * A + V1 + v * k
    return tok / len(rounds), (tok / cost) * PLAIN
for V1, v in ((6.1, 0.3), (6.1, 0.5), (6.1, 0.8)):
    print(f"--- verify(n) = {V1} + {v} (n-1)")
    for gamma in (5, 6, 7, 8, 10):
        best = max((run(gamma, t / 20, V1, v)[1], t / 20) for t in range(6, 19))
        print(f"gamma {gamma}: best eta {best[1]:.2f} speed {best[0]:.3f}  (eta .7: {run(gamma, .7, V1, v)[1]:.3f} MAT {run(gamma,.7,V1,v)[0]:.3f})")
