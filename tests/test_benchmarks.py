"""CI smoke of the benchmarks: the Spec-Bench harness (kangaroo_rt.bench / kangaroo-rt bench), bench_steps,
the README table generator, and gpu_suite.sh --dry-run (which smoke-runs every benchmarks/bench_*.py)."""
import glob
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from bench_loader import BENCH_DIR, load_benchmark, run_benchmark
from kangaroo_rt import bench, cli
from kangaroo_rt.config import KangarooConfig
from kangaroo_rt.generate import KangarooModel
from kangaroo_rt.loading import save_model
from kangaroo_rt.testing import agreeing_pair, tiny_config


QUESTIONS = [
    {"question_id": 7, "category": "qa", "turns": ["Who wrote the Iliad?"]},
    {"question_id": 8, "category": "translation", "turns": ["Translate 'good morning' into German.", "And French?"]},
    {"question_id": 9, "category": "qa", "turns": ["How far is the Moon from the Earth?"]},
]


def _write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


@pytest.fixture(scope="module")
def smoke_result(tmp_path_factory):
    """One spec_bench smoke run with every method, on Spec-Bench-format questions of two categories."""
    tmp = tmp_path_factory.mktemp("spec_bench")
    questions = _write_jsonl(tmp / "question.jsonl", QUESTIONS)
    out = tmp / "out"
    rc = bench.main(["--smoke", "--questions", questions, "--max-new-tokens", "12", "--out", str(out),
                     "--no-progress", "--gamma", "4", "--eta", "0.3"])
    with open(out / "spec_bench-smoke.json") as f:
        return rc, json.load(f), out


def test_spec_bench_smoke_runs_all_methods_and_agrees(smoke_result):
    rc, result, out = smoke_result
    assert rc == 0
    assert result["greedy_mismatches"] == []
    assert result["smoke_run"] and result["prompts"] == 3 and result["gamma"] == 4
    for name in ("ar", "kangaroo", "hf_generate", "hf_assisted_early_exit"):
        assert result["methods"][name]["available"], result["methods"][name]
    assert not result["methods"]["kangaroo_graphs"]["available"]  # CUDA only
    assert set(result["results"]) == {"qa", "translation", "overall"}
    overall = result["results"]["overall"]
    assert {r["tokens"] for r in overall.values()} == {3 * 12}  # ignore-eos not needed: the smoke model has no EOS
    k = overall["kangaroo"]
    assert 1.0 <= k["mat"] <= 5.0 and k["rounds"] > 0
    assert len(k["acceptance_by_position"]) == 4 and 0.0 < k["draft_time_fraction"] < 1.0
    assert k["speedup_vs"]["hf_generate"] == pytest.approx(k["tokens_per_s"] / overall["hf_generate"]["tokens_per_s"])
    assert result["results"]["qa"]["ar"]["tokens"] == 2 * 12
    ar = overall["ar"]
    assert ar["decode_tokens"] == 3 * 11 and 0 < ar["prefill_time_s"] < ar["time_s"]
    cost = k["round_cost_in_plain_steps"]  # the round in plain steps: an identity of the run's own totals
    assert cost["tokens_per_round"] == pytest.approx(k["decode_tokens"] / k["rounds"])
    assert cost["decode_speedup"] == pytest.approx(cost["tokens_per_round"] / cost["round"])
    assert cost["round"] == pytest.approx(cost["draft"] + cost["verify"] + cost["other"])
    assert cost["draft"] > 0 and cost["verify"] > 0
    by = cost["verify_by_tokens"]  # one verify pass a round, each over k + 1 <= gamma + 1 tokens
    assert set(by) <= {"1", "2", "3", "4", "5"} and sum(v["share"] for v in by.values()) == pytest.approx(1.0)
    assert sum(v["passes"] for v in k["verify_by_tokens"].values()) == k["rounds"]
    assert sum(v["share"] * v["plain_steps"] for v in by.values()) == pytest.approx(cost["verify"])
    assert "round_cost_in_plain_steps" not in overall["hf_generate"]
    for png in ("spec_bench-smoke-speedup.png", "spec_bench-smoke-acceptance.png"):
        assert (out / png).stat().st_size > 1000


def test_spec_bench_sampled_smoke(tmp_path, capsys):
    """--temperature samples every method with the same settings; tokens are not compared, every method of ours
    runs, the JSON and the README table say how it sampled, and bad settings are refused."""
    questions = _write_jsonl(tmp_path / "question.jsonl", QUESTIONS[:2])
    out = tmp_path / "out"
    rc = bench.main(["--smoke", "--questions", questions, "--max-new-tokens", "10", "--out", str(out),
                     "--no-progress", "--no-plots", "--temperature", "0.8", "--top-p", "0.9", "--top-k", "20",
                     "--seed", "3"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "sampling (temperature 0.8, top-k 20, top-p 0.9, seed 3)" in text
    assert "tokens are not compared" in text
    with open(out / "spec_bench-smoke.json") as f:
        result = json.load(f)
    assert result["sampling"] == {"temperature": 0.8, "top_k": 20, "top_p": 0.9, "seed": 3}
    assert result["greedy_mismatches"] == []
    overall = result["results"]["overall"]
    for name in ("ar", "kangaroo", "hf_generate"):
        assert overall[name]["tokens"] == 2 * 10, name  # the smoke model has no EOS
    assert overall["kangaroo"]["mat"] >= 1.0
    make = load_benchmark("make_readme_table")
    assert "sampling (temperature 0.8, top-k 20, top-p 0.9, seed 3" in make.spec_bench_section("x.json", result)[0]
    for bad in (["--top-p", "0.9"], ["--temperature", "-1"], ["--temperature", "1", "--top-p", "1.5"],
                ["--temperature", "1", "--top-k", "0"]):
        assert bench.main(["--smoke", "--no-hf", "--prompts", "1", "--out", str(out), "--no-progress", *bad]) == 2


def test_cli_bench_smoke(tmp_path, capsys):
    rc = cli.main(["bench", "--smoke", "--no-hf", "--prompts", "1", "--max-new-tokens", "6", "--out", str(tmp_path),
                   "--no-plots", "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "| kangaroo |" in text and "skipped (--no-hf)" in text
    assert (tmp_path / "spec_bench-smoke.json").exists() and not list(tmp_path.glob("*.png"))


def test_bench_draft_vocab_sizes_side_by_side(tmp_path):
    """--draft-vocab K...: Kangaroo per draft-vocabulary size in the same run, all equal to plain decoding."""
    import shutil

    from kangaroo_rt import draft_vocab, models

    shutil.copytree(os.path.join(models.ASSETS, "embedded"), tmp_path / "embedded")
    adapter = tmp_path / "embedded" / "adapter"
    vocab = json.loads((adapter / "config.json").read_text())["vocab_size"]
    counts = torch.arange(vocab, 0, -1)  # a made-up frequency order: low ids first
    draft_vocab.save(adapter, draft_vocab.from_counts(counts, 512, always=[0]), vocab, "test", counts, always=[0])
    rc = cli.main(["bench", "--model", str(tmp_path / "embedded"), "--no-hf", "--prompts", "2", "--max-new-tokens", "8",
                   "--draft-vocab", "full", "64", "--out", str(tmp_path / "out"), "--no-plots", "--no-progress"])
    assert rc == 0
    result = json.loads((tmp_path / "out" / "spec_bench-cpu.json").read_text())
    assert {"kangaroo", "kangaroo_vocab_full", "kangaroo_vocab_64"} <= set(result["results"]["overall"])
    assert result["methods"]["kangaroo_vocab_64"]["label"].endswith("64-token draft vocabulary")
    assert not result["greedy_mismatches"]
    with pytest.raises(SystemExit):
        cli.main(["bench", "--draft-vocab", "0"])


def test_missing_model_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["bench", "--model", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_read_questions_names_the_bad_line(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps(QUESTIONS[0]) + "\n" + json.dumps({"question_id": 2, "turns": ["x"]}) + "\n")
    with pytest.raises(ValueError, match=r"q.jsonl:2: missing field\(s\) \['category'\]"):
        bench.read_questions(str(path))
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match="q.jsonl:1: not valid JSON"):
        bench.read_questions(str(path))


def test_first_mismatch():
    assert bench.first_mismatch([1, 2, 3], [1, 2, 3]) is None
    assert bench.first_mismatch([1, 2, 3], [1, 5, 3]) == 1
    assert bench.first_mismatch([1, 2, 3], [1, 2]) == 2


def _tiny(eos_token_id=None):
    cfg = tiny_config(vocab_size=256, hidden_size=64, num_layers=6, eos_token_id=eos_token_id)
    target, adapter = agreeing_pair(cfg, exit_layer=2, deep_scale=0.1, head_scale=4.0)
    return target, adapter


def test_mismatches_are_reported_with_first_index_and_fail(capsys):
    target, adapter = _tiny()
    model = KangarooModel(target, adapter, exit_layer=2)
    methods = bench.our_methods(model, KangarooConfig(gamma=4, eta=0.3), 10, None, True)
    kangaroo = next(m for m in methods if m.name == "kangaroo")
    honest = kangaroo.run

    def corrupted(ids):
        new, stats = honest(ids)
        new = new.clone()
        new[3] = (new[3] + 1) % 256
        return new, stats

    kangaroo.run = corrupted
    def last_differs(ids):
        new = methods[0].run(ids)[0].clone()
        new[-1] = (new[-1] + 1) % 256
        return new, None

    hf_like = bench.Method("hf_generate", "fake baseline differing at the last token", last_differs)
    prompts = bench.build_prompts(QUESTIONS, bench.byte_ids, "none")
    tallies, mismatches, measured = bench.run_methods(prompts, methods + [hf_like], torch.device("cpu"),
                                                      progress=False)
    assert {(m["method"], m["first_index"]) for m in mismatches} >= {("kangaroo", 3)}
    assert [m["first_index"] for m in mismatches if m["method"] == "hf_generate"] == [9, 9, 9]
    assert bench._verdict(mismatches, methods, strict=False) == 1
    assert bench._verdict(mismatches, methods, strict=False, exact=False) == 0  # half precision: reported only
    assert "GREEDY TOKEN MISMATCH" in capsys.readouterr().err
    only_hf = [m for m in mismatches if m["method"] == "hf_generate"]
    assert bench._verdict(only_hf, methods, strict=False) == 0
    assert bench._verdict(only_hf, methods, strict=True) == 1
    assert measured == len(prompts) == 3


def test_time_limit_stops_between_prompts():
    """No prompt starts after the limit; every method runs each prompt that did start."""
    calls = []

    def slow(ids):
        calls.append(ids.shape[1])
        time.sleep(0.05)
        return ids[0, :4], None

    prompts = bench.build_prompts(QUESTIONS, bench.byte_ids, "none")
    methods = [bench.Method("ar", "slow", slow), bench.Method("kangaroo", "slow too", slow)]
    tallies, _, measured = bench.run_methods(prompts, methods, torch.device("cpu"), progress=False,
                                             time_limit_s=0.01)
    assert measured == 1 and len(calls) == 2 + 2  # warm-up, then the first prompt by both methods
    assert {name: t.tokens for name, t in tallies["overall"].items()} == {"ar": 4, "kangaroo": 4}


@pytest.mark.parametrize("ignore_eos", [True, False])
def test_eos_handling_matches_transformers(tmp_path, ignore_eos):
    target, adapter = _tiny()
    model = KangarooModel(target, adapter, exit_layer=2)
    ids = torch.tensor([bench.byte_ids("def read_lines(path):")])
    free = model.generate(ids, max_new_tokens=20, ignore_eos=True)[0, ids.shape[1]:].tolist()
    eos = free[4]  # a token the model emits early: stopping there is observable
    target.config.eos_token_id = eos
    save_model(target, tmp_path)
    methods = (bench.our_methods(model, KangarooConfig(gamma=4, eta=0.3), 20, eos, ignore_eos)
               + bench.hf_methods(str(tmp_path), torch.float32, torch.device("cpu"), 2, 20, eos, ignore_eos))
    expected = free if ignore_eos else free[:free.index(eos) + 1]
    for m in methods:
        if m.available:
            assert m.run(ids)[0].tolist() == expected, m.name
    assert {m.name for m in methods if m.available} >= {"ar", "kangaroo", "hf_generate", "hf_assisted_early_exit"}


def test_bench_steps_smoke(tmp_path):
    steps = load_benchmark("bench_steps")
    profile = tmp_path / "spec_bench-cpu.json"
    profile.write_text(json.dumps({"benchmark": "spec_bench", "smoke_run": False, "embedded_model": True,
                                   "date": "2026-01-01", "results": {"overall": {"kangaroo": {
                                       "acceptance_by_position": [0.9, 0.8, 0.7]}}}}))
    out = tmp_path / "out"
    assert steps.main(["--smoke", "--out", str(out), "--acceptance", "0.8,0.7", "--profile-from", str(profile)]) == 0
    with open(out / "bench_steps-smoke.json") as f:
        result = json.load(f)
    assert result["smoke_run"] and result["copy_bandwidth_gbs"] > 0
    # plain_per_op: the CPU with the extension, where the layers otherwise run as one call; chain: the decoder's
    # one-call draft chain there, for gamma = k - 1 of each verify step; pass / vpass: its one-call target pass from
    # the tokens and over each verify step's k exit states
    assert {r["step"] for r in result["rows"]} == {"plain", "draft", "draft_vocab", "shallow", "verify"} | (
        {"plain_per_op", "chain", "pass", "vpass"} if steps._cpu_ext.is_available() else set())
    if steps._cpu_ext.is_available():
        chains = {(r["batch"], r["tokens"]) for r in result["rows"] if r["step"] == "chain"}
        assert chains == {(b, g) for b in (1, 2) for g in (1, 2)}
        passes = {(r["step"], r["batch"], r["tokens"]) for r in result["rows"] if r["step"] in ("pass", "vpass")}
        assert passes == {("pass", b, 1) for b in (1, 2)} | {("vpass", b, k) for b in (1, 2) for k in (2, 3)}
        one = {r["batch"]: r for r in result["rows"] if r["step"] == "pass"}
        assert all(r["bytes"] < one[r["batch"]]["bytes"] for r in result["rows"] if r["step"] == "vpass")
        assert {m["drafts"] for m in result["modeled_speedup"]} == {"one-call chain"}
    for sub in (r for r in result["rows"] if r["step"] == "draft_vocab"):  # a 64-row head reads less than 256 rows
        full = next(r for r in result["rows"] if r["step"] == "draft" and r["exit_layer"] == sub["exit_layer"]
                    and (r["batch"], r["context"]) == (sub["batch"], sub["context"]))
        assert sub["draft_vocab"] == 64 and sub["bytes"] < full["bytes"]
    assert all(r["floor_ms"] > 0 and r["eager_ms"] > 0 for r in result["rows"])
    for r in result["rows"]:  # the CPU's floor uses the copy timed in turns with the steps of its (batch, context)
        assert r["floor_ms"] == pytest.approx(r["bytes"] / (r["floor_bandwidth_gbs"] * 1e9) * 1e3)
    assert len({r["floor_bandwidth_gbs"] for r in result["rows"]}) == len({(r["batch"], r["context"])
                                                                          for r in result["rows"]})
    plain = next(r for r in result["rows"] if r["step"] == "plain")
    verify = [r for r in result["rows"] if r["step"] == "verify"]
    assert all(v["bytes"] < plain["bytes"] for v in verify)  # verify skips the shallow layers
    assert {m["profile"] for m in result["modeled_speedup"]} >= {"--acceptance", "embedded model (measured)"}
    assert result["profiles"]["embedded model (measured)"] == [0.9, 0.8, 0.7]
    assert steps.expected_tokens([0.5], 2) == pytest.approx(1.75)
    assert steps.expected_tokens([1.0, 0.5], 3) == pytest.approx(1 + 1 + 0.5 + 0.25)


def test_bench_phases_smoke(tmp_path):
    """benchmarks/bench_phases.py --smoke: plain steps and Kangaroo rounds of a tiny agreeing pair, each op's body
    and wait per step or round, the same tokens both ways."""
    from kangaroo_rt import _cpu_ext

    if not _cpu_ext.is_available():
        pytest.skip("kangaroo_rt._cpu is not built")
    assert run_benchmark("bench_phases", ["--smoke", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench_phases-smoke.json").read_text())
    assert result["smoke_run"] and result["tokens_identical"] and result["prompts"] == 2
    plain, kangaroo = result["plain"], result["kangaroo"]
    assert plain["unit"] == "step" and kangaroo["unit"] == "round" and kangaroo["mat"] >= 1
    for mode in (plain, kangaroo):
        assert mode["wall_ms_per_unit"] > 0 and mode["body_ms_per_unit"] > 0
        assert mode["body_ms_per_unit"] == pytest.approx(sum(k["body_ms"] for k in mode["kinds"].values()))
    # the prefill is taken out: plain steps run the layers over one row only
    assert plain["kinds"]["layers.gate_up"]["phases_per_unit"] == pytest.approx(6)  # the smoke model's 6 layers
    assert not [name for name in plain["kinds"] if name.endswith("[n]")]
    assert {"shallow.qkv", "draft_head"} <= set(kangaroo["kinds"])


def test_bench_phases_switch_smoke(tmp_path):
    """bench_phases --switch: Kangaroo with the int8 draft head on and off, in turns; both sides' rounds and kinds,
    the same tokens, and the switch restored."""
    import os

    from kangaroo_rt import _cpu_ext

    if not _cpu_ext.is_available():
        pytest.skip("kangaroo_rt._cpu is not built")
    env = _cpu_ext.DRAFT_INT8_ENV
    assert run_benchmark("bench_phases", ["--smoke", "--switch", env, "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / f"bench_phases-smoke-{env}.json").read_text())
    assert result["switch"] == env and result["tokens_identical"] and result["on_over_off"] > 0
    for side in (result["on"], result["off"]):
        assert side["unit"] == "round" and side["mat"] >= 1 and "draft_head" in side["kinds"]
    assert env not in os.environ


def test_bench_phases_chains_smoke(tmp_path):
    """bench_phases --chains: Kangaroo with fixed chains (eta 0) against plain decoding, a row per chain length with
    the round's verification and drafting in plain steps; the verification's kinds are the target's layers and head,
    and bad counts are refused."""
    from kangaroo_rt import _cpu_ext

    if not _cpu_ext.is_available():
        pytest.skip("kangaroo_rt._cpu is not built")
    assert run_benchmark("bench_phases", ["--smoke", "--chains", "3,1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench_phases-smoke-chains.json").read_text())
    assert result["tokens_identical"] and [r["drafts"] for r in result["rows"]] == [1, 3]
    for row in result["rows"]:
        assert row["verify_tokens"] == row["drafts"] + 1 and row["mat"] >= 1
        assert row["verification_plain_steps"] > 0 and row["drafting_plain_steps"] > 0 and row["round_ms"] > 0
    phases = load_benchmark("bench_phases")
    assert [phases.part_of(k) for k in ("layers.qkv[n]", "screen", "shallow.down", "draft_head", "other")] == [
        "verification", "verification", "drafting", "drafting", "other"]
    for bad in ("0,2", "a"):
        with pytest.raises(SystemExit):
            phases.parse_args(["--chains", bad])


def test_bench_steps_times_cpu_steps_in_turns():
    """On the CPU every repeat calls each step once, in order (after each step's warm-up calls), so that the host's
    bandwidth drift hits all steps alike; one median per step comes back."""
    steps = load_benchmark("bench_steps")
    calls = []
    fns = [lambda name=name: calls.append(name) for name in "abc"]
    ms = steps.interleaved_cpu_ms(fns, cpu_repeats=4)
    assert len(ms) == 3 and all(m >= 0 for m in ms)
    assert calls == ["a"] * 3 + ["b"] * 3 + ["c"] * 3 + ["a", "b", "c"] * 4


def test_bench_linear_quick(tmp_path):
    """benchmarks/bench_linear.py --quick: every table row and fused comparison, in the JSON."""
    from kangaroo_rt import _cpu_ext

    if not _cpu_ext.is_built():
        pytest.skip("kangaroo_rt._cpu is not built (KANGAROO_RT_BUILD_CPU=1 pip install --no-build-isolation -e .)")
    assert run_benchmark("bench_linear", ["--quick", "--repeats", "1", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "bench_linear-smoke.json") as f:
        result = json.load(f)
    assert result["smoke_run"] and result["read_bandwidth_gbs"] > 0 and result["isa"] in ("avx512_bf16", "avx512", "avx2", "portable")
    assert result["other_processes_cores"] is None or result["other_processes_cores"] >= 0
    assert [(r["weights"], r["rows"]) for r in result["rows"]] == [("fp32", 1), ("fp32", 8), ("bf16", 1), ("bf16", 8)]
    assert {(r["weights"], r["k"], r["rows"]) for r in result["by_k"]} == {
        (w, k, m) for w in ("fp32", "bf16") for k in (576, 1536) for m in (1, 8)}
    assert all(r["ms"] > 0 and r["vs_m1"] > 0 for r in result["by_k"])
    assert all(r["vs_m1"] == 1.0 for r in result["by_k"] if r["rows"] == 1)
    assert [(r["weights"], r["rows"]) for r in result["hot"]] == [("fp32", 1), ("fp32", 8), ("bf16", 1), ("bf16", 8)]
    for r in result["hot"]:
        assert r["ms"] > 0 and 0 < r["fraction_of_peak"] and r["hot_vs_read_bw"] > 0
        assert r["gmacs"] == pytest.approx(r["macs"] / r["ms"] / 1e6)
        assert r["weight_gbs"] == pytest.approx(r["bytes"] / r["ms"] / 1e6)
        assert r["matrix_bytes"] * r["passes"] == r["bytes"]
    block = "\n".join(load_benchmark("make_readme_table").linear_section("bench_linear-smoke.json", result))
    assert "matrix swept 16 times in one call" in block and "| bf16 | 8 |" in block
    in_turns = result["read_bandwidth_in_turns_gbs"]
    assert set(in_turns) == {"fp32", "bf16"} and all(v > 0 for v in in_turns.values())
    for r in result["rows"]:
        assert r["kernel_ms"] > 0 and r["torch_ms"] > 0 and r["speedup"] == pytest.approx(r["torch_ms"] / r["kernel_ms"])
        assert r["kernel_gbs"] == pytest.approx(r["bytes"] / r["kernel_ms"] / 1e6)
        assert r["read_bandwidth_gbs"] == in_turns[r["weights"]]
        assert r["kernel_fraction_of_read_bw"] == pytest.approx(r["kernel_gbs"] / in_turns[r["weights"]])
    assert {(f["weights"], f["group"], f["rows"], f["impl"]) for f in result["fused"]} == {
        (w, g, m, i) for w in ("fp32", "bf16") for g in ("qkv", "gate_up") for m in (1, 8) for i in ("kernel", "torch")}
    assert [(p["weights"], p["rows"]) for p in result["prefill"]] == [("fp32", 8), ("bf16", 8)]
    assert all(p["kernel_gflops"] > 0 and p["torch_gflops"] > 0 for p in result["prefill"])
    assert [(p["weights"], p["part"]) for p in result["parts"]] == [
        (w, p) for w in ("fp32", "bf16") for p in ("torch.sum of each matrix", "head", "layers")]
    for p in result["parts"]:
        ms, gbs = ("kernel_ms", "kernel_gbs") if "kernel_ms" in p else ("read_ms", "read_gbs")
        assert p[gbs] == pytest.approx(p["bytes"] / p[ms] / 1e6)
    for r in result["rows"]:  # the pass in one call (linear_sweep) beside the per-call one
        assert r["sweep_ms"] > 0 and r["sweep_gbs"] == pytest.approx(r["bytes"] / r["sweep_ms"] / 1e6)


def test_make_readme_table_rewrites_only_the_block(smoke_result, tmp_path):
    _, result, _ = smoke_result
    make = load_benchmark("make_readme_table")
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n\n{make.BEGIN}\nold\n{make.END}\n\noutro\n")
    results = tmp_path / "results" / "cpu-x"
    results.mkdir(parents=True)
    (results / "smoke.json").write_text(json.dumps(result))  # smoke runs never reach the README
    assert make.main(["--readme", str(readme), "--results", str(tmp_path / "results")]) == 0
    assert "No measured results" in readme.read_text()
    measured = dict(result, smoke_run=False, device="Test CPU")
    (results / "spec_bench-cpu.json").write_text(json.dumps(measured))
    assert make.main(["--readme", str(readme), "--results", str(tmp_path / "results"), "--check"]) == 1
    assert make.main(["--readme", str(readme), "--results", str(tmp_path / "results")]) == 0
    text = readme.read_text()
    assert text.startswith("intro\n\n") and text.endswith("\n\noutro\n") and "old" not in text
    assert "**Test CPU**" in text and "| hf_assisted_early_exit |" in text
    kangaroo = result["results"]["overall"]["kangaroo"]
    assert f"| kangaroo | {kangaroo['tokens_per_s']:.1f} |" in text
    assert make.main(["--readme", str(readme), "--results", str(tmp_path / "results"), "--check"]) == 0
    embedded = {"benchmark": "bench_embedded", "smoke_run": False, "device": "Test CPU", "date": "2026-12-01",
                "torch": "2.13.0", "prompts": 24, "new_tokens_per_prompt": 128, "exit_layer": 2, "gamma": 6,
                "eta": 0.6, "greedy_mismatches": 0, "plain_tokens_per_s": 30.0, "kangaroo_tokens_per_s": 48.6,
                "speedup": 1.62, "mat": 2.9, "acceptance_by_position": [0.7, 0.65, None]}
    (results / "bench_embedded.json").write_text(json.dumps(embedded))
    (results / "bench_embedded-smoke.json").write_text(json.dumps(dict(embedded, smoke_run=True, speedup=9.0)))
    assert make.main(["--readme", str(readme), "--results", str(tmp_path / "results")]) == 0
    text = readme.read_text()
    assert "| Kangaroo | 48.6 | 1.62x | 2.90 |" in text and "9.00x" not in text
    assert "Acceptance by draft position: 0.70, 0.65, -." in text
    later = dict(embedded, prompts=33, skipped_prompts=12, speedup=1.41, kangaroo_tokens_per_s=42.3, mat=2.5)
    (results / "bench_embedded-skip12.json").write_text(json.dumps(later))  # a subset: a section of its own
    assert make.main(["--readme", str(readme), "--results", str(tmp_path / "results")]) == 0
    text = readme.read_text()
    assert "| Kangaroo | 48.6 | 1.62x | 2.90 |" in text and "| Kangaroo | 42.3 | 1.41x | 2.50 |" in text
    assert "33 held-out prompts after the first 12" in text and "24 held-out prompts x" in text


def test_gpu_suite_dry_run_smoke_runs_every_benchmark(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", os.path.join(BENCH_DIR, "gpu_suite.sh"), "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    with open(tmp_path / "gpu_suite.json") as f:
        summary = json.load(f)
    steps = {s["name"]: s for s in summary["steps"]}
    assert summary["mode"] == "dry-run" and summary["status"] == "ok"
    assert steps["build_extension"]["status"] == steps["memcheck"]["status"] == "skipped"
    assert steps["pytest_gpu"]["status"] == "ok"  # the GPU tests collect on CPU
    collected = open(tmp_path / "pytest-gpu.txt").read()
    assert "tests/test_gpu_realistic.py::" in collected and "tests/test_gpu_graphs.py::" in collected
    for path in glob.glob(os.path.join(BENCH_DIR, "bench_*.py")):
        step = steps[os.path.basename(path)[:-3]]
        assert step["status"] == "ok" or (step["status"] == "skipped" and step["note"]), step
    assert steps["bench_steps"]["status"] == steps["spec_bench"]["status"] == steps["bench_graphs"]["status"] == "ok"
    assert {"bench_steps-smoke", "spec_bench-smoke", "bench_graphs-smoke"} <= set(summary["results"])
    assert summary["results"]["bench_graphs-smoke"]["smoke_run"] is True
    names = [s["name"] for s in summary["steps"]]
    assert names[:6] == ["build_extension", "pytest_gpu", "memcheck", "bench_graphs", "bench_steps", "spec_bench"], \
        names
    assert summary["skipped_over_budget"] == [] and summary["elapsed_s"] <= summary["budget_s"]


def test_gpu_suite_only_runs_the_named_steps_and_skips_what_overruns_the_budget(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, SUITE_BUDGET="0")
    proc = subprocess.run(["bash", os.path.join(BENCH_DIR, "gpu_suite.sh"), "--dry-run", "--only",
                           "spec_bench,bench_accept"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    with open(tmp_path / "gpu_suite.json") as f:
        summary = json.load(f)
    assert [s["name"] for s in summary["steps"]] == ["spec_bench", "bench_accept"]
    assert all(s["status"] == "skipped" and s["note"].startswith("over budget") for s in summary["steps"])
    assert summary["skipped_over_budget"] == ["spec_bench", "bench_accept"] and summary["results"] == {}
    bad = subprocess.run(["bash", os.path.join(BENCH_DIR, "gpu_suite.sh"), "--dry-run", "--only"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--only needs" in bad.stdout


def test_per_category_takes_the_first_n_of_each_category_in_file_order():
    from kangaroo_rt.bench import per_category, read_questions

    questions = read_questions(os.path.join(os.path.dirname(__file__), "..", "benchmarks", "data", "spec_bench",
                                            "question.jsonl"))
    picked = per_category(questions, 2)
    counts = {}
    for q in picked:
        counts[q["category"]] = counts.get(q["category"], 0) + 1
    assert set(counts) == {q["category"] for q in questions} and set(counts.values()) == {2}
    assert [q["question_id"] for q in picked] == [q["question_id"] for q in questions if q in picked]


def test_bench_ab_smoke_compares_two_trees(tmp_path):
    """bench_ab --quick: the working tree against itself (no checkout, no build), every case on both sides."""
    bench_ab = load_benchmark("bench_ab")
    assert bench_ab.main(["--quick", "--out", str(tmp_path), "--dtypes", "float32"]) == 0
    result = json.loads((tmp_path / "bench_ab-smoke.json").read_text())
    assert result["base"]["commit"] == result["this"]["commit"] and result["rounds"] == 1
    assert result["linear_rows"] == [1, 4] and result["dtypes"] == ["float32"] and result["decode_tokens"] == 256
    cases = result["cases"]
    assert {"float32 linear M=1", "float32 plain", "float32 verify 5"} <= set(cases)
    for row in cases.values():
        assert len(row["base"]) == len(row["this"]) == 1 and row["this_vs_base"] > 0


def test_bench_ab_probe_gets_every_option_that_shapes_a_case():
    """The probe process parses back the options the parent was given (its command once left out --decode-prompts and
    --decode-tokens, so the decode and engine cases ran 3 prompts x 256 tokens whatever was asked)."""
    bench_ab = load_benchmark("bench_ab")
    args = bench_ab.parse_args(["--dtypes", "float32", "--cases", "linear,steps,engine", "--context", "96",
                                "--decode-prompts", "5", "--decode-tokens", "40", "--rows", "1,6,7",
                                "--verify-tokens", "6,8,6", "--repeats", "4", "--rounds", "2", "--threads", "1",
                                "--attention", "5:2048,1:300,5:2048"])
    assert args.rows == (1, 6, 7) and args.verify_tokens == (6, 8)  # (a repeated count is timed once)
    assert args.attention == ((5, 2048), (1, 300))
    cmd = bench_ab.probe_command(args, base_module="/elsewhere/_cpu.so")
    probe = bench_ab.parse_args(cmd[2:])
    assert probe.probe and probe.base_module == "/elsewhere/_cpu.so"
    for option in ("dtypes", "cases", "context", "decode_prompts", "decode_tokens", "rows", "verify_tokens",
                   "attention", "repeats", "rounds", "threads", "quick"):
        assert getattr(probe, option) == getattr(args, option), option
    for bad in (["--rows", "0"], ["--rows", "65"], ["--verify-tokens", "two"], ["--rows", ""], ["--attention", "5"],
                ["--attention", "0:64"], ["--attention", "65:64"], ["--attention", "5:0"], ["--attention", "5:x"],
                ["--attention", "1:2:3"], ["--attention", ""]):
        with pytest.raises(SystemExit):
            bench_ab.parse_args(bad)


def test_bench_ab_decode_case_reports_kangaroo_over_plain(tmp_path):
    """bench_ab --quick --cases decode: real decoding (a tiny agreeing pair) plain and Kangaroo on both sides, and each
    side's Kangaroo / plain ratio from those two cases."""
    argv = ["--quick", "--out", str(tmp_path), "--dtypes", "float32", "--cases", "decode"]
    assert run_benchmark("bench_ab", argv) == 0
    result = json.loads((tmp_path / "bench_ab-smoke.json").read_text())
    cases = result["cases"]
    assert set(cases) == {"float32 decode plain", "float32 decode kangaroo"}
    ratio = result["decode_kangaroo_vs_plain"]["float32"]
    for side in ("base", "this"):
        assert ratio[side] == pytest.approx(
            cases["float32 decode plain"][f"{side}_ms"] / cases["float32 decode kangaroo"][f"{side}_ms"])
    with pytest.raises(SystemExit):
        load_benchmark("bench_ab").parse_args(["--cases", "decode", "--decode-tokens", "0"])


def test_bench_ab_in_process_swaps_the_extension_under_the_cases(tmp_path, monkeypatch):
    """bench_ab --quick --in-process: both sides in one process; every case runs on the base's module and on this
    tree's (counted by wrapping the loader), and the tree's own module is back in place afterwards. The decode
    cases' tokens come back as a digest per side (the same build on both sides here: the same tokens)."""
    bench_ab = load_benchmark("bench_ab")
    from kangaroo_rt import _cpu_ext

    if not _cpu_ext.is_available():
        pytest.skip("no CPU extension built")
    this = _cpu_ext.load()
    args = bench_ab.parse_args(["--quick", "--in-process", "--dtypes", "float32", "--cases",
                                "linear,attention,decode"])
    args.base_module = bench_ab.extension_file(bench_ab.ROOT)
    monkeypatch.chdir(bench_ab.ROOT)
    seen = []
    real_load = _cpu_ext.load
    monkeypatch.setattr(_cpu_ext, "load", lambda: seen.append(_cpu_ext._loaded) or real_load())
    threads = torch.get_num_threads()
    try:
        sides = bench_ab.probe_in_process(args)
    finally:
        torch.set_num_threads(threads)
    assert _cpu_ext._loaded is this
    tokens = sides.pop("decode_tokens")
    pairs = sides.pop("pairs")  # one repeat: each case's base and this time, back to back
    assert len(pairs) == args.repeats and set(pairs[0]) == set(sides["this"][0])
    assert all(len(p) == 2 and min(p) > 0 for p in pairs[0].values())
    assert set(sides) == {"base", "this"} and len(sides["base"]) == len(sides["this"]) == 1
    assert set(sides["base"][0]) == set(sides["this"][0]) >= {"float32 linear M=1", "float32 attention q=1 ctx=16"}
    assert all(t > 0 for side in sides.values() for t in side[0].values())
    assert set(tokens["base"]) == {"float32 decode plain", "float32 decode kangaroo"} and tokens["base"] == tokens["this"]
    used = {id(m) for m in seen}
    assert id(this) in used and len(used) == 2  # the base's module is another object, and both ran


def test_bench_ab_paired_ratios_split_by_the_host_phase():
    """paired_ratios: the median of this / base within each repeat, and over the third of the repeats whose plain step
    (the mean of both sides) was fastest and the third where it was slowest."""
    bench_ab = load_benchmark("bench_ab")
    # six repeats: the host fast in the first three (plain ~4 ms), slow in the last three (~8 ms); the change wins
    # 10% on "x" while fast, nothing while slow
    pairs = [{"bfloat16 plain": [p, p], "bfloat16 x": [10.0, r]}
             for p, r in ((4.0, 9.0), (4.1, 9.0), (4.2, 9.0), (8.0, 10.0), (8.1, 10.0), (8.2, 10.0))]
    out = bench_ab.paired_ratios(pairs, ["bfloat16"])
    x = out["per_case"]["bfloat16 x"]
    assert x["fast"] == pytest.approx(0.9) and x["slow"] == pytest.approx(1.0)
    assert x["all"] == pytest.approx(0.95)
    assert out["plain_ms"]["fast"] == pytest.approx(4.05)  # thirds of six: two repeats each
    assert out["plain_ms"]["slow"] == pytest.approx(8.15)
    no_steps = bench_ab.paired_ratios([{"bfloat16 x": [2.0, 1.0]}], ["bfloat16"])  # no plain case: no phases
    assert no_steps == {"per_case": {"bfloat16 x": {"all": 0.5}}, "plain_ms": {}}
    assert bench_ab.paired_ratios([], ["bfloat16"]) == {"per_case": {}, "plain_ms": {}}


def test_bench_host_bandwidth_smoke_reports_a_timeline(tmp_path):
    """bench_host_bandwidth --smoke: no idling, a second of passes, bucketed; every bucket's GB/s positive and the
    passes all counted."""
    assert run_benchmark("bench_host_bandwidth", ["--smoke", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench_host_bandwidth-smoke.json").read_text())
    assert result["smoke_run"] and result["idle_s"] == 0 and result["bytes_per_pass"] > 0
    buckets = result["buckets"]
    assert buckets and all(b["gbs"] > 0 and b["passes"] >= 1 for b in buckets)
    assert [b["start_s"] for b in buckets] == sorted(b["start_s"] for b in buckets)
    assert result["first_10s_median_gbs"] > 0 and result["second_half_median_gbs"] > 0


def test_bench_host_bandwidth_buckets_and_medians():
    """timeline() puts each pass in the bucket of its end time and a bucket's GB/s is its bytes over its passes' time;
    summary() takes the medians of the buckets in the first 10 s and in the second half."""
    bench = load_benchmark("bench_host_bandwidth")
    clock = iter([0.0, 0.0, 0.4, 0.4, 0.9, 0.9, 1.2, 1.2, 2.6])  # start, then (t0, t1) of each pass
    passes = []
    rows = bench.timeline(lambda: passes.append(1), 1e9, 2.5, 1.0, clock=lambda: next(clock))
    assert len(passes) == 4  # the pass ending at 2.6 s >= 2.5 s is the last
    assert [(r["start_s"], r["passes"]) for r in rows] == [(0.0, 2), (1.0, 1), (2.0, 1)]
    assert rows[0]["gbs"] == pytest.approx(2 / 0.9) and rows[2]["gbs"] == pytest.approx(1 / 1.4)
    totals = bench.summary([{"start_s": float(t), "gbs": g} for t, g in enumerate([80, 82, 50, 48, 49, 47])], 6.0)
    assert totals == {"first_10s_median_gbs": pytest.approx(49.5), "second_half_median_gbs": 48}
    assert bench.summary([], 4.0) == {"first_10s_median_gbs": None, "second_half_median_gbs": None}
    with pytest.raises(SystemExit):
        bench.parse_args(["--seconds", "0"])


def test_bench_hugepages_smoke_compares_the_pages(tmp_path):
    """bench_hugepages --smoke: a tiny model in 4 KB and in 2 MB pages, plain and Kangaroo; every output the same."""
    from kangaroo_rt import hugepages

    assert run_benchmark("bench_hugepages", ["--smoke", "--out", str(tmp_path)]) == 0
    if not hugepages.available():
        assert not (tmp_path / "bench_hugepages-smoke.json").exists()
        return
    result = json.loads((tmp_path / "bench_hugepages-smoke.json").read_text())
    assert result["identical_outputs"] and set(result["two_mb_vs_four_kb"]) == {"ar", "kangaroo"}
    assert set(result["tokens_per_s"]) == {"4k ar", "4k kangaroo", "2m ar", "2m kangaroo"}
    assert result["compared"] == "weights"


def test_bench_hugepages_kv_cache_smoke_compares_the_cache_pages(tmp_path):
    """bench_hugepages --kv-cache --smoke: both tiny models placed, the KV caches in 4 KB against 2 MB pages; every
    output the same."""
    from kangaroo_rt import hugepages

    assert run_benchmark("bench_hugepages", ["--kv-cache", "--smoke", "--out", str(tmp_path)]) == 0
    if not hugepages.available():
        return
    result = json.loads((tmp_path / "bench_hugepages-kv-smoke.json").read_text())
    assert result["identical_outputs"] and result["compared"] == "kv_cache"
    assert set(result["tokens_per_s"]) == {"4k ar", "4k kangaroo", "2m ar", "2m kangaroo"}


def test_bench_greedy_decode_smoke_compares_the_loops(tmp_path):
    """bench_greedy_decode --smoke: a tiny model decoded by the Python loop and by the one-call loop, plain and
    Kangaroo; every output the same, and the Python loop's patch undone."""
    from kangaroo_rt import _cpu_ext
    from kangaroo_rt.speculative import Decoder

    one_call = Decoder._cpu_decode
    assert run_benchmark("bench_greedy_decode", ["--smoke", "--out", str(tmp_path)]) == 0
    assert Decoder._cpu_decode is one_call
    if not _cpu_ext.is_available():
        assert not (tmp_path / "bench_greedy_decode-smoke.json").exists()
        return
    result = json.loads((tmp_path / "bench_greedy_decode-smoke.json").read_text())
    assert result["identical_outputs"] and set(result["one_call_vs_python"]) == {"ar", "kangaroo"}
    assert set(result["tokens_per_s"]) == {"python ar", "python kangaroo", "one_call ar", "one_call kangaroo"}


def test_make_readme_table_renders_the_committed_results():
    """Every committed result loads and renders: a benchmark whose JSON reuses a key the tables read (bench_ab once
    wrote "rows" as a list of row counts, which crashed the kernel table's scan) must not break the README."""
    make = load_benchmark("make_readme_table")
    block = make.render(make.load_results(os.path.join(BENCH_DIR, "results")))
    assert "**CPU linear kernel**" in block


def test_make_readme_table_skips_marked_folders(tmp_path):
    """A folder with a NOT_IN_README file, and every folder under it, is left out of the tables; its siblings are
    not. Without the marker the newer end-to-end run would replace the older one."""
    make = load_benchmark("make_readme_table")

    def write(rel: str, date: str) -> None:
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"benchmark": "spec_bench", "device": "Test CPU", "model": "m",
                                    "dtype": "bfloat16", "max_new_tokens": 64, "date": date}))

    write("full/spec_bench-cpu.json", "2026-12-05T10:00")
    write("quick-ab/spec_bench-cpu.json", "2026-12-06T10:00")
    write("quick-ab/sub/spec_bench-cpu.json", "2026-12-06T11:00")
    newest = lambda: [os.path.relpath(p, make.ROOT) for p, _ in  # noqa: E731
                      make.newest_per_device(make.load_results(str(tmp_path)), "spec_bench")]
    assert newest() == [os.path.relpath(str(tmp_path / "quick-ab/sub/spec_bench-cpu.json"), make.ROOT)]
    (tmp_path / "quick-ab" / make.MARKER).write_text("a quick A/B, not the README's run\n")
    assert newest() == [os.path.relpath(str(tmp_path / "full/spec_bench-cpu.json"), make.ROOT)]
    assert not make.excluded(str(tmp_path / "full/spec_bench-cpu.json"), str(tmp_path))
    assert make.excluded(str(tmp_path / "quick-ab/sub/spec_bench-cpu.json"), str(tmp_path))
    assert not make.excluded(str(tmp_path / "quick-ab/spec_bench-cpu.json"), str(tmp_path / "full"))  # outside
    (tmp_path / make.MARKER).write_text("everything\n")  # a marker in the results folder itself leaves out all
    assert make.load_results(str(tmp_path)) == []


def test_make_readme_table_keeps_the_newest_days_lengths():
    """End-to-end runs: the newest per number of new tokens, among the lengths run on the group's newest day."""
    make = load_benchmark("make_readme_table")

    def run(length: int, date: str, tag: str):
        return (f"{tag}.json", {"benchmark": "spec_bench", "device": "Test CPU", "model": "m", "dtype": "bfloat16",
                                "max_new_tokens": length, "date": date})

    results = [run(64, "2026-12-04T10:00", "old64"), run(256, "2026-12-04T11:00", "old256"),
               run(64, "2026-12-05T09:00", "new64"), run(1024, "2026-12-05T10:00", "new1024"),
               run(1024, "2026-12-05T08:00", "early1024")]
    assert [path for path, _ in make.newest_per_device(results, "spec_bench")] == ["new64.json", "new1024.json"]
    sampled = run(1024, "2026-12-05T11:00", "sampled1024")  # newer, but sampled: a result of its own
    sampled[1]["sampling"] = {"temperature": 0.7, "top_k": None, "top_p": 0.9, "seed": 0}
    assert sorted(path for path, _ in make.newest_per_device(results + [sampled], "spec_bench")) == [
        "new1024.json", "new64.json", "sampled1024.json"]


def test_bench_cpu_dtype_smoke_checks_every_dtype(tmp_path):
    """bench_cpu_dtype --smoke: a random tiny Llama in the HF layout, decoded by transformers, plain and Kangaroo in
    each dtype; Kangaroo == plain everywhere, plain == transformers in float32, and a recommendation among them."""
    assert run_benchmark("bench_cpu_dtype", ["--smoke", "--threads", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "cpu_dtype-smoke.json").read_text())
    assert result["smoke_run"] and result["model"] == "smoke" and result["new_tokens_per_prompt"] == 8
    assert [r["dtype"] for r in result["results"]] == ["float32", "bfloat16", "float16"]
    assert all(r["greedy_mismatches"] == 0 for r in result["results"])
    assert result["results"][0]["hf_mismatches"] == 0 and result["results"][0]["lossless"]
    assert result["recommended"] in {"float32", "bfloat16", "float16"}


def test_bench_engine_smoke_compares_budgets_with_plain_decoding(tmp_path):
    """bench_engine --smoke: plain, Kangaroo and a verification budget at 1 and 3 concurrent greedy requests, every
    method's tokens those of plain decoding, and a budget capping drafts where three requests share it."""
    assert run_benchmark("bench_engine", ["--smoke", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench_engine-smoke.json").read_text())
    rows = {(r["requests"], r["method"]): r for r in result["rows"]}
    assert set(rows) == {(n, m) for n in (1, 3) for m in ("plain", "kangaroo", "budget 3")}
    assert all(r["same_tokens_as_plain"] and r["tok_s"] > 0 for r in rows.values())
    assert rows[(3, "budget 3")]["mean_draft_length"] == 0 < rows[(3, "kangaroo")]["mean_draft_length"]
    assert rows[(1, "budget 3")]["mean_draft_length"] > 0  # one request: 3 // 1 - 1 = 2 drafts a round
