"""Regenerate README.md's performance tables from the committed results JSON.

Reads every ``*.json`` under benchmarks/results/ (recursively; smoke runs, the gpu_suite summary and every folder
that holds a file named ``NOT_IN_README`` are skipped), keeps the newest result of each benchmark per device (and
per prompt subset: ``skipped_prompts``), and rewrites only the block between ``<!-- perf:begin -->`` and
``<!-- perf:end -->`` in README.md. The marker is for runs that are kept as data but must not become the README's
table: a quick ``kangaroo-rt bench --no-hf`` A/B, say, which as the newest end-to-end run would otherwise replace
the table that has llama.cpp and transformers in it (write the marker's reason into the file).
Nothing is typed in by hand: every number in the block comes from a results file, which the block names
with its device and date.

    python benchmarks/make_readme_table.py            # rewrite the block
    python benchmarks/make_readme_table.py --check    # exit 1 if the block is out of date
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from typing import Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN, END = "<!-- perf:begin -->", "<!-- perf:end -->"
REPRODUCE = """Reproduce: CPU, the embedded model (all four methods, greedy, batch 1):
`kangaroo-rt bench --out benchmarks/results/cpu-$(date +%Y%m%d) && python benchmarks/make_readme_table.py`;
GPU, everything (extension build, GPU tests, kernel and step benchmarks, end to end):
`OUT=benchmarks/results/gpu-$(date +%Y%m%d) bash benchmarks/gpu_suite.sh && python benchmarks/make_readme_table.py`."""


MARKER = "NOT_IN_README"  # a results folder holding this file (any content) is left out, with its subfolders


def excluded(path: str, folder: str) -> bool:
    """Whether a folder between ``folder`` (included) and the file at ``path`` holds the MARKER file."""
    top = os.path.abspath(folder)
    here = os.path.dirname(os.path.abspath(path))
    if os.path.commonpath([top, here]) != top:  # not under folder: nothing of folder's marks it
        return False
    while True:
        if os.path.isfile(os.path.join(here, MARKER)):
            return True
        if here == top:
            return False
        here = os.path.dirname(here)


def load_results(folder: str) -> List[Tuple[str, Dict]]:
    """(path relative to the repo, data) of every non-smoke benchmark JSON under ``folder``, but those in a folder
    marked NOT_IN_README."""
    out = []
    for path in sorted(glob.glob(os.path.join(folder, "**", "*.json"), recursive=True)):
        if excluded(path, folder):
            continue
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"make_readme_table: cannot read {path}: {e}")
        if not isinstance(data, dict) or data.get("smoke_run") or data.get("benchmark") in (None, "gpu_suite"):
            continue
        out.append((os.path.relpath(path, ROOT), data))
    return out


def newest_per_device(results: List[Tuple[str, Dict]], benchmark: str) -> List[Tuple[str, Dict]]:
    """The newest run per (device, model, skipped prompts, dtype); for end-to-end runs (spec_bench), the newest per
    number of new tokens as well, among the lengths measured on the day of that group's newest run (a length last
    run on an older day is left out: its numbers predate the code the other tables measure)."""
    best: Dict[Tuple, Tuple[str, Dict]] = {}
    for path, data in results:
        if data.get("benchmark") != benchmark:
            continue
        key = (str(data.get("device")), str(data.get("model")), int(data.get("skipped_prompts") or 0),
               str(data.get("dtype") or ""),  # a float32 and a bfloat16 run of one model are two results
               int(data.get("max_new_tokens") or 0) if benchmark == "spec_bench" else 0,
               json.dumps(data.get("sampling"), sort_keys=True))  # a sampled run and a greedy one: two results
        if key not in best or str(data.get("date", "")) > str(best[key][1].get("date", "")):
            best[key] = (path, data)
    newest_day: Dict[Tuple, str] = {}
    for key, (_, data) in best.items():
        group = key[:4] + key[5:]
        newest_day[group] = max(newest_day.get(group, ""), str(data.get("date", ""))[:10])
    return [best[k] for k in sorted(best) if str(best[k][1].get("date", ""))[:10] == newest_day[k[:4] + k[5:]]]


def _x(v: Optional[float], spec: str = ".2f", suffix: str = "x") -> str:
    return "-" if v is None else f"{v:{spec}}{suffix}"


def _decoding(sampling: Optional[Dict]) -> str:
    """'greedy', or a sampled run's settings (kangaroo_rt.bench.sampling_settings)."""
    if not sampling:
        return "greedy"
    parts = [f"temperature {sampling['temperature']:g}"]
    parts += [f"top-k {sampling['top_k']}"] if sampling.get("top_k") is not None else []
    parts += [f"top-p {sampling['top_p']:g}"] if sampling.get("top_p") is not None else []
    return f"sampling ({', '.join(parts)}, seed {sampling['seed']}; tokens not compared)"


def spec_bench_section(path: str, d: Dict) -> List[str]:
    overall = d["results"].get("overall", {})
    lines = [f"**End to end** ({d['model'] if not d.get('embedded_model') else 'the embedded model'}, "
             f"{d['prompts']} prompts from {d['prompts_source']}, up to {d['max_new_tokens']} new tokens, "
             f"{_decoding(d.get('sampling'))}, "
             f"batch 1, {d['dtype']}; exit layer {d['exit_layer']}, gamma {d['gamma']}, eta {d['eta']}) on "
             f"**{d['device']}**, {d['date'][:10]}, `{path}`:", "",
             "| method | tokens/s | speedup vs HF generate | speedup vs kangaroo_rt AR | MAT |", "|---|---|---|---|---|"]
    for name, info in d["methods"].items():
        r = overall.get(name)
        if r is None:
            lines.append(f"| {name} | {info.get('reason') or 'did not run'} | | | |")
            continue
        sp = r.get("speedup_vs", {})
        lines.append(f"| {name} | {_x(r.get('tokens_per_s'), '.1f', '')} | {_x(sp.get('hf_generate'))} | "
                     f"{_x(sp.get('ar'))} | {_x(r.get('mat'), '.2f', '')} |")
    k = overall.get("kangaroo", {})
    if k.get("acceptance_by_position"):
        acc = ", ".join("-" if a is None else f"{a:.2f}" for a in k["acceptance_by_position"])
        frac = k.get("draft_time_fraction")
        lines += ["", f"Kangaroo acceptance by draft position: {acc}; drafting takes "
                      f"{_x(None if frac is None else 100 * frac, '.0f', '%')} of decode time."]
    cats = [c for c in d["results"] if c != "overall"]
    if len(cats) > 1:
        base = "hf_generate" if "hf_generate" in overall else "ar"
        names = [n for n in d["methods"] if n in overall and n != base]
        lines += ["", f"Speedup vs {base} by category:", "", "| category | " + " | ".join(names) + " |",
                  "|---" * (len(names) + 1) + "|"]
        for c in cats + ["overall"]:
            lines.append(f"| {c} | " + " | ".join(
                _x(d["results"][c].get(n, {}).get("speedup_vs", {}).get(base)) for n in names) + " |")
    mism = d.get("greedy_mismatches") or []
    if d.get("sampling"):
        lines += ["", "Sampled: each method draws its own tokens, so they are not compared (the sampled distribution "
                      "is tested: tests/test_speculative.py)."]
        return lines
    if not mism:
        lines += ["", "Greedy tokens of all methods identical."]
        return lines
    by_method: Dict[str, List[Dict]] = {}
    for x in mism:
        by_method.setdefault(x["method"], []).append(x)
    same = [n for n in d["methods"] if n in overall and n != "ar" and n not in by_method]
    parts = [f"{n} on {len(xs)} of {d['prompts']} prompts (first at token {min(x['first_index'] for x in xs)})"
             for n, xs in by_method.items()]
    lines += ["", f"Greedy tokens vs kangaroo_rt plain decoding: identical for {', '.join(same) or 'none'}; "
                  f"**differ** for {'; '.join(parts)}."]
    return lines


def steps_section(path: str, d: Dict) -> List[str]:
    rows = d["rows"]

    def best(r: Dict) -> float:
        return min(t for t in (r["eager_ms"], r.get("graph_ms")) if t is not None)

    index = {(r["shape"], r["step"], r["exit_layer"], r["tokens"], r["batch"], r["context"]): r for r in rows}
    verify_k = {shape: max((k[3] for k in index if k[:2] == (shape, "verify") and k[3] <= 7), default=None)
                for shape in {r["shape"] for r in rows}}
    in_turns = sorted({r["floor_bandwidth_gbs"] for r in rows if r.get("floor_bandwidth_gbs") is not None})
    if in_turns:
        lo, hi = in_turns[0], in_turns[-1]
        bandwidth = (f"DRAM read bandwidth timed in turns with the steps (torch.sum), {lo:.0f}"
                     + (f"-{hi:.0f}" if round(hi) > round(lo) else "") + " GB/s")
    else:
        bandwidth = f"copy bandwidth {d['copy_bandwidth_gbs']:.0f} GB/s measured in the same run"
    lines = [f"**Step latency vs the memory floor** (random {d['dtype']} weights, floor = weights + KV bytes / "
             f"{bandwidth}; best of eager and CUDA graph) on **{d['device']}**, {d['date'][:10]}, `{path}`:", "",
             "| shape | batch | context | plain step ms (% of floor) | plain step, ops one by one, ms | "
             "draft step ms (exit layer) | one-call draft chain ms (drafts) | verify ms (tokens) | "
             "verify / plain step, by tokens |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (shape, step, _, _, b, ctx), r in sorted(index.items(), key=lambda kv: (kv[0][0], kv[0][4], kv[0][5])):
        if step != "plain":
            continue
        k = verify_k[shape]
        verifies = sorted((key[3], v) for key, v in index.items() if key[:2] == (shape, "verify") and key[4:] == (b, ctx))
        verify = next((v for tokens, v in verifies if tokens == k), None)
        draft = None if verify is None else index.get((shape, "draft", verify["exit_layer"], 1, b, ctx))
        per_op = index.get((shape, "plain_per_op", None, 1, b, ctx))
        draft_cell = "-" if draft is None else f"{best(draft):.2f} ({draft['exit_layer']})"
        chain = None if verify is None else index.get((shape, "chain", verify["exit_layer"], k - 1, b, ctx))
        chain_cell = "-" if chain is None else f"{best(chain):.2f} ({k - 1})"
        verify_cell = "-" if verify is None else f"{best(verify):.2f} ({k})"
        ratio_cell = ", ".join(f"{tokens}: {best(v) / best(r):.2f}" for tokens, v in verifies) or "-"
        per_op_cell = "-" if per_op is None else f"{best(per_op):.2f}"
        lines.append(f"| {shape} | {b} | {ctx} | {best(r):.2f} ({100 * r['fraction_of_floor']:.0f}%) | {per_op_cell} | "
                     f"{draft_cell} | {chain_cell} | {verify_cell} | {ratio_cell} |")
    passes = sorted(((k[0], k[4], k[5]), r) for k, r in index.items() if k[1] == "pass")
    if passes:  # the decode loop's one-call target pass (bench_steps' pass and vpass rows)
        lines += ["", "The decode loop's one-call target pass, screened head included (the rows above are steps "
                  "driven from Python with the whole head):", "",
                  "| shape | batch | context | plain pass ms | verification / plain pass, by tokens |", "|---|---|---|---|---|"]
        for (shape, b, ctx), r in passes:
            vpasses = sorted((key[3], v) for key, v in index.items() if key[:2] == (shape, "vpass") and key[4:] == (b, ctx))
            cell = ", ".join(f"{tokens}: {best(v) / best(r):.2f}" for tokens, v in vpasses) or "-"
            lines.append(f"| {shape} | {b} | {ctx} | {best(r):.2f} | {cell} |")
    subsets = [r for r in rows if r["step"] == "draft_vocab"]
    if subsets:
        sizes = sorted({r["draft_vocab"] for r in subsets}, reverse=True)
        lines += ["", "Draft step over a draft vocabulary of K tokens (ms, and vs the full-vocabulary draft step):", "",
                  "| shape | batch | context | full vocabulary | " + " | ".join(f"K={k}" for k in sizes) + " |",
                  "|---" * (len(sizes) + 4) + "|"]
        for key in sorted({(r["shape"], r["batch"], r["context"], r["exit_layer"]) for r in subsets}):
            full = index.get((key[0], "draft", key[3], 1, key[1], key[2]))
            cells = []
            for k in sizes:
                r = next((r for r in subsets if (r["shape"], r["batch"], r["context"], r["exit_layer"]) == key
                          and r["draft_vocab"] == k), None)
                cells.append("-" if r is None else f"{best(r):.2f}" + ("" if full is None else
                                                                        f" ({best(full) / best(r):.2f}x)"))
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {'-' if full is None else f'{best(full):.2f}'} | "
                         + " | ".join(cells) + " |")
    model = d.get("modeled_speedup") or []
    if model:
        profiles = sorted({m["profile"] for m in model})
        chained = [m.get("drafts") == "one-call chain" for m in model]
        drafts = ("; a round's drafts timed as the decoder's one-call chain" if all(chained) else
                  "; a round's drafts timed as the decoder's one-call chain where it was measured" if any(chained)
                  else "")
        lines += ["", "Modeled Kangaroo speedup from these latencies (best gamma, fixed-length drafts" + drafts + "):",
                  "",
                  "| shape | batch | context | " + " | ".join(profiles) + " |", "|---" * (len(profiles) + 3) + "|"]
        keys = sorted({(m["shape"], m["batch"], m["context"]) for m in model})
        for key in keys:
            cells = []
            for p in profiles:
                m = next((m for m in model if (m["shape"], m["batch"], m["context"]) == key and m["profile"] == p), None)
                cells.append("-" if m is None else f"{m['speedup']:.2f}x (gamma {m['gamma']})")
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + " |")
    return lines


def embedded_section(path: str, d: Dict) -> List[str]:
    accept = ", ".join("-" if a is None else f"{a:.2f}" for a in d["acceptance_by_position"])
    skipped = int(d.get("skipped_prompts") or 0)
    which = f"{d['prompts']} held-out prompts" + (
        f" after the first {skipped} (scripts/train_embedded_adapter.py tunes gamma/eta on the first 12)"
        if skipped else "")
    return [f"**Kangaroo vs plain decoding on the embedded model** ({d['device']}, {d['date']}, torch {d['torch']}, "
            f"`{path}`): {which} x {d['new_tokens_per_prompt']} new tokens, batch 1, greedy, "
            f"exit layer {d['exit_layer']}, gamma {d['gamma']}, eta {d['eta']}; greedy mismatches: "
            f"{d['greedy_mismatches']}.", "",
            "| method | tokens/s | speedup | MAT |", "|---|---|---|---|",
            f"| plain decoding | {d['plain_tokens_per_s']:.1f} | 1.00x | - |",
            f"| Kangaroo | {d['kangaroo_tokens_per_s']:.1f} | {d['speedup']:.2f}x | {d['mat']:.2f} |", "",
            f"Acceptance by draft position: {accept}."]


def cpu_dtype_section(path: str, d: Dict) -> List[str]:
    base = d["results"][0]
    lines = [f"**CPU dtype for {d['model']}** ({d['device']}, {d['date']}, `{path}`): {d['prompts']} chat prompts x up to "
             f"{d['new_tokens_per_prompt']} new tokens, batch 1, greedy, each method in the dtype of its row; "
             f"recommended: **{d['recommended']}**.", "",
             f"| dtype | HF generate tok/s | plain tok/s | plain vs {base['dtype']} | Kangaroo tok/s | Kangaroo/plain "
             "| Kangaroo == plain | plain == HF |", "|---|---|---|---|---|---|---|---|"]
    for r in d["results"]:
        n = r["prompts"]
        lines.append(f"| {r['dtype']} | {r['hf_tokens_per_s']:.1f} | {r['plain_tokens_per_s']:.1f} | "
                     f"{r['plain_tokens_per_s'] / base['plain_tokens_per_s']:.2f}x | {r['kangaroo_tokens_per_s']:.1f} | "
                     f"{r['speedup']:.2f}x | {n - r['greedy_mismatches']}/{n} | {n - r['hf_mismatches']}/{n} |")
    return lines


def _linear_bandwidth(d: Dict) -> str:
    """What bench_linear's "% of read bandwidth" divides by: the probe timed in turns with each dtype's passes (results
    since 2026-12-06), else the one probe at the start."""
    turns = d.get("read_bandwidth_in_turns_gbs")
    if turns:
        each = ", ".join(f"{label} {gbs:.0f}" for label, gbs in turns.items())
        return f"DRAM read bandwidth {each} GB/s, timed in turns with each dtype's passes"
    return f"DRAM read bandwidth {d['read_bandwidth_gbs']:.0f} GB/s measured in the same run"


def linear_section(path: str, d: Dict) -> List[str]:
    """benchmarks/bench_linear.py: the CPU linear kernel against torch per row count, cold cache."""
    sweep = all("sweep_ms" in r for r in d["rows"])  # results written before the one-call pass have none
    lines = [f"**CPU linear kernel** (`bench_linear`, SmolLM2's 210 layer matrices (30 x q, k, v, o, gate, up, "
             "down) and head streamed cold, "
             f"{d['threads']} threads, variant {d['isa']}; " + _linear_bandwidth(d)
             + f") on **{d['device']}**, {d['date'][:10]}, `{path}`:", "",
             "| weights | rows | kernel ms | torch ms | kernel GB/s (% of read bandwidth) | kernel vs torch | "
             "kernel vs 1 row |" + (" one call per pass: ms | GB/s (%) | vs 1 row |" if sweep else ""),
             "|---|---|---|---|---|---|---|" + ("---|---|---|" if sweep else "")]
    for r in d["rows"]:
        lines.append(f"| {r['weights']} | {r['rows']} | {r['kernel_ms']:.2f} | {r['torch_ms']:.2f} | "
                     f"{r['kernel_gbs']:.1f} ({100 * r['kernel_fraction_of_read_bw']:.0f}%) | {r['speedup']:.2f}x | "
                     f"{r['kernel_vs_m1']:.2f}x |" + (f" {r['sweep_ms']:.2f} | {r['sweep_gbs']:.1f} "
                                                     f"({100 * r['sweep_fraction_of_read_bw']:.0f}%) | "
                                                     f"{r['sweep_vs_m1']:.2f}x |" if sweep else ""))
    if sweep:
        lines += ["", "The kernel columns call it once per matrix from Python, as the head and the adapter do; \"one "
                  "call per pass\" runs the whole pass in one call on one set of threads that claim chunks as the "
                  "decoder stack does (`linear_sweep`): the kernel's stream as the layer stack drives it."]
    if d.get("parts"):
        kernel = [p for p in d["parts"] if "kernel_gbs" in p]
        read = [p for p in d["parts"] if "read_gbs" in p]
        lines += ["", "One row, the head alone and the layer matrices alone: " + "; ".join(
            f"{p['weights']} {p['part']} {p['kernel_gbs']:.1f} GB/s ({100 * p['kernel_fraction_of_read_bw']:.0f}%, "
            f"{p['calls']} calls)" for p in kernel) + "."]
        if read:
            lines[-1] += (" The same pass read by `torch.sum` one matrix at a time (a plain read that stops and "
                          "starts at each matrix, as a decode step's stream does): " + "; ".join(
                              f"{p['weights']} {p['read_gbs']:.1f} GB/s ({100 * p['read_fraction_of_read_bw']:.0f}%)"
                              for p in read) + ".")
    if d.get("hot"):
        h0 = d["hot"][0]
        swept = (f"a {h0['matrix_bytes'] / 1e6:.1f} MB matrix swept {h0['passes']} times in one call"
                 if "passes" in h0 else "one matrix swept several times in one call")  # (the first results: 16)
        lines += ["", f"Decode row counts with the weights in cache ({swept}): the kernel's multiply-add rate, its "
                  "fraction of the inner "
                  "instruction's peak, and the weight bytes a second it stands for, against the read bandwidth above: "
                  "about the fastest M rows can stream. Near the read bandwidth, M rows are unlikely to cost what one "
                  "row does; below it, they cannot.", "",
                  "| weights | rows | GMAC/s (% of peak) | GB/s of weights (x read bandwidth) |", "|---|---|---|---|"]
        lines += [f"| {h['weights']} | {h['rows']} | {h['gmacs']:.0f} ({100 * h['fraction_of_peak']:.0f}%) | "
                  f"{h['weight_gbs']:.0f} ({h['hot_vs_read_bw']:.2f}x) |" for h in d["hot"]]
    if d.get("prefill"):
        lines += ["", "Prefill (weights in cache, compute-bound; `_cpu_ext.linear` sends bf16 calls of more than 64 "
                  "rows to torch):", "", "| weights | rows | kernel GFLOP/s | torch GFLOP/s | kernel vs torch |",
                  "|---|---|---|---|---|"]
        lines += [f"| {p['weights']} | {p['rows']} | {p['kernel_gflops']:.0f} | {p['torch_gflops']:.0f} | "
                  f"{p['kernel_vs_torch']:.2f}x |" for p in d["prefill"]]
    return lines


def kernels_section(items: List[Tuple[str, Dict]]) -> List[str]:
    lines = ["**Kernel microbenchmarks** (the kernel vs the torch reference in the same run; Triton on a GPU against its "
             "copy bandwidth, the CPU extension (`--cpu`) against the DRAM read bandwidth):", "",
             "| benchmark | case | device | kernel | kernel ms | torch ms | speedup | % of bandwidth |",
             "|---|---|---|---|---|---|---|---|"]
    for path, d in items:
        for r in d["rows"]:
            kernel = "cpu" if "cpu_ms" in r else "triton"
            frac = r.get("fraction_of_read_bw", r.get("fraction_of_copy_bw"))
            lines.append(f"| {d['benchmark']} | {r['case']} | {d['device']} | {kernel} | {r[kernel + '_ms']:.4f} | "
                         f"{r['torch_ms']:.4f} | {r['torch_ms'] / r[kernel + '_ms']:.2f}x | "
                         f"{'-' if frac is None else f'{100 * frac:.0f}%'} |")
    return lines


# Benchmarks with a section of their own, in README order; any other result with Triton/torch rows is a kernel.
SECTIONS = {"spec_bench": spec_bench_section, "bench_cpu_dtype": cpu_dtype_section, "bench_embedded": embedded_section,
            "bench_steps": steps_section, "bench_linear": linear_section}


def render(results: List[Tuple[str, Dict]]) -> str:
    parts = [section(path, d) for name, section in SECTIONS.items() for path, d in newest_per_device(results, name)]
    kernel_names = sorted({d["benchmark"] for _, d in results if d["benchmark"] not in SECTIONS
                           and isinstance(d.get("rows"), list) and d["rows"] and isinstance(d["rows"][0], dict)
                           and ("triton_ms" in d["rows"][0] or "cpu_ms" in d["rows"][0])})
    kernels = [item for name in kernel_names for item in newest_per_device(results, name)]
    if kernels:
        parts.append(kernels_section(kernels))
    if not parts:
        parts.append(["No measured results are committed yet (benchmarks/results/ holds none but smoke runs)."])
    body = "\n\n".join("\n".join(p) for p in parts)
    return f"{BEGIN}\n<!-- generated by benchmarks/make_readme_table.py from benchmarks/results/; do not edit -->\n" \
           f"{body}\n\n{REPRODUCE}\n{END}"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
    p.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--check", action="store_true", help="exit 1 if the README block is out of date")
    args = p.parse_args(argv)
    with open(args.readme, encoding="utf-8") as f:
        text = f.read()
    start, stop = text.find(BEGIN), text.find(END)
    if start < 0 or stop < start:
        print(f"make_readme_table: {args.readme} has no {BEGIN} ... {END} block", file=sys.stderr)
        return 2
    block = render(load_results(args.results))
    new = text[:start] + block + text[stop + len(END):]
    if args.check:
        if new != text:
            print(f"make_readme_table: the performance block of {args.readme} is out of date", file=sys.stderr)
            return 1
        return 0
    if new != text:
        with open(args.readme, "w", encoding="utf-8") as f:
            f.write(new)
    print(f"{'updated' if new != text else 'unchanged'}: {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
