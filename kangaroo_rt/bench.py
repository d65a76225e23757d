"""Spec-Bench-style end-to-end benchmark: this project's plain decoding and Kangaroo against
transformers' ``generate`` and its early-exit assisted generation, in one process, on identical
prompts and weights, interleaved prompt by prompt.

Prompts come from a Spec-Bench-format JSONL (``question_id``, ``category``, ``turns``; the first turn
of each question, in the Vicuna v1.1 template by default) or, by default, from the embedded model's
held-out code prompts. Decoding is greedy at batch 1 (the Spec-Bench protocol); every method's tokens
are compared with this project's plain decoding and any mismatch is reported with its first index.
``--temperature T`` (with ``--top-k``, ``--top-p``, ``--seed``) samples instead, every method with the same
settings; tokens are then not compared (each method draws its own), and speed is tokens/s as before.

Speedups are ratios of tokens/s over the same prompts in the same run (equal to Spec-Bench's ratio of
wall times whenever the methods produce the same tokens). MAT counts the bonus token.

``kangaroo-rt bench`` and ``benchmarks/spec_bench.py`` both call :func:`main`.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .config import KangarooConfig

TEMPLATES = ("auto", "chat", "vicuna", "none")
BASELINES = ("hf_generate", "ar")  # speedups are reported against each of these that ran
EXTERNAL_PREFIXES = ("hf_", "llama_cpp_")  # other runtimes: their token differences are reported, not fatal
# A tiny fixed prompt set in Spec-Bench format for --smoke without --questions.
SMOKE_QUESTIONS = [
    {"question_id": 1, "category": "writing", "turns": ["Write a short note about kangaroos."]},
    {"question_id": 2, "category": "writing", "turns": ["Describe a quiet morning in two sentences."]},
    {"question_id": 3, "category": "math_reasoning", "turns": ["What is 17 times 23? Explain step by step."]},
    {"question_id": 4, "category": "math_reasoning", "turns": ["A train leaves at 3pm at 60 km/h; when is it 90 km away?"]},
]


@dataclass
class Prompt:
    question_id: Any
    category: str
    ids: torch.Tensor  # (1, T) int64


@dataclass
class Method:
    """One decoding method. ``run(ids (1, T)) -> (new token ids (n,), DecodeStats or None)``."""

    name: str
    label: str
    run: Optional[Callable[[torch.Tensor], Tuple[torch.Tensor, Any]]] = None
    reason: Optional[str] = None  # why it is unavailable (run is None)
    kangaroo: bool = False  # reports MAT / acceptance / draft-verify split

    @property
    def available(self) -> bool:
        return self.run is not None


@dataclass
class Tally:
    """Totals of one method over a group of prompts."""

    tokens: int = 0
    time_s: float = 0.0
    prompts: int = 0
    prefill_s: Optional[float] = None  # None: the method does not report its prefill
    rounds: int = 0
    accepted: int = 0
    draft_s: float = 0.0
    verify_s: float = 0.0
    attempts: List[int] = field(default_factory=list)
    accepts: List[int] = field(default_factory=list)
    verify_by: Dict[int, List[float]] = field(default_factory=dict)  # tokens verified -> [passes, seconds]

    def add(self, tokens: int, time_s: float, stats: Any) -> None:
        self.tokens += tokens
        self.time_s += time_s
        prefill = getattr(stats, "prefill_time_s", None)
        if prefill is None or (self.prompts and self.prefill_s is None):
            self.prefill_s = None  # once any prompt lacks it, the totals have none
        else:
            self.prefill_s = (self.prefill_s or 0.0) + prefill
        self.prompts += 1
        if stats is None or not getattr(stats, "rounds", None) or not sum(stats.rounds):
            return
        self.rounds += sum(stats.rounds)
        self.accepted += sum(sum(a) for a in stats.accepted_lengths)
        self.draft_s += stats.draft_time_s
        self.verify_s += stats.verify_time_s
        for tokens, (passes, seconds) in getattr(stats, "verify_by_tokens", {}).items():
            entry = self.verify_by.setdefault(tokens, [0, 0.0])
            entry[0] += passes
            entry[1] += seconds
        for row_attempts, row_accepts in zip(stats.position_attempts, stats.position_accepts):
            width = max(len(self.attempts), len(row_attempts))
            self.attempts += [0] * (width - len(self.attempts))
            self.accepts += [0] * (width - len(self.accepts))
            for i, (t, a) in enumerate(zip(row_attempts, row_accepts)):
                self.attempts[i] += t
                self.accepts[i] += a

    def as_dict(self, kangaroo: bool) -> Dict[str, Any]:
        d: Dict[str, Any] = {"tokens": self.tokens, "time_s": self.time_s,
                             "tokens_per_s": self.tokens / self.time_s if self.time_s > 0 else None}
        decode_s, decode_tokens = self.decode()
        if decode_s is not None:  # after the prefill, which gives each prompt's first token
            d.update({"prefill_time_s": self.prefill_s, "decode_tokens": decode_tokens,
                      "decode_tokens_per_s": decode_tokens / decode_s if decode_s > 0 else None})
        if kangaroo:
            busy = self.draft_s + self.verify_s
            d.update({"rounds": self.rounds, "mat": self.accepted / self.rounds if self.rounds else None,
                      "acceptance_by_position": [a / t if t else None for a, t in zip(self.accepts, self.attempts)],
                      "draft_time_s": self.draft_s, "verify_time_s": self.verify_s,
                      "draft_time_fraction": self.draft_s / busy if busy > 0 else None})
            if self.verify_by:  # rounds timed one by one (not the CUDA-graph host loop)
                d["verify_by_tokens"] = {str(k): {"passes": int(n), "time_s": t}
                                         for k, (n, t) in sorted(self.verify_by.items())}
        return d

    def decode(self) -> Tuple[Optional[float], int]:
        """(seconds after the prefills, tokens after each prompt's first), or (None, 0) without prefill times."""
        if self.prefill_s is None or self.tokens <= self.prompts:
            return None, 0
        return self.time_s - self.prefill_s, self.tokens - self.prompts


def round_cost(ar: Dict[str, Any], kangaroo: Dict[str, Any]) -> Optional[Dict[str, float]]:
    """Kangaroo's round in plain decoding steps, from one run's totals (as_dict of 'ar' and a Kangaroo method):
    drafting (target layers 0..l-1 on each new token, the adapter and the draft head), verification (layers
    l..N-1, the head and acceptance over the k + 1 tokens) and the rest of a round (the loop's own work), each
    per round over ar's time per token after the prefill. decode speedup = MAT / round (up to rounding)."""
    if not (ar.get("decode_tokens_per_s") and kangaroo.get("decode_tokens_per_s") and kangaroo.get("rounds")):
        return None
    step = 1.0 / ar["decode_tokens_per_s"]
    rounds = kangaroo["rounds"]
    draft, verify = kangaroo["draft_time_s"] / rounds / step, kangaroo["verify_time_s"] / rounds / step
    total = kangaroo["decode_tokens"] / kangaroo["decode_tokens_per_s"] / rounds / step
    cost = {"plain_step_ms": 1e3 * step, "draft": draft, "verify": verify, "other": total - draft - verify,
            "round": total, "tokens_per_round": kangaroo["decode_tokens"] / rounds,
            "decode_speedup": kangaroo["decode_tokens_per_s"] / ar["decode_tokens_per_s"]}
    by = kangaroo.get("verify_by_tokens")
    if by:  # each verify length: its share of the passes and one pass in plain steps
        passes = sum(v["passes"] for v in by.values())
        cost["verify_by_tokens"] = {k: {"share": v["passes"] / passes, "plain_steps": v["time_s"] / v["passes"] / step}
                                    for k, v in by.items() if v["passes"]}
    return cost


# ------------------------------------------------------------------------------------------- prompts

def read_questions(path: str) -> List[Dict[str, Any]]:
    """Spec-Bench-format JSONL -> list of {question_id, category, turns}; names the bad line on error."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"questions file {path} does not exist")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
            missing = [k for k in ("question_id", "category", "turns") if k not in row]
            if missing:
                raise ValueError(f"{path}:{n}: missing field(s) {missing} (Spec-Bench format: question_id, "
                                 "category, turns)")
            if not isinstance(row["turns"], list) or not row["turns"] or not isinstance(row["turns"][0], str):
                raise ValueError(f"{path}:{n}: 'turns' must be a non-empty list of strings")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no questions")
    return rows


def heldout_questions(path: str) -> List[Dict[str, Any]]:
    """The embedded model's held-out code prompts ({file, line, prompt} JSONL) as category 'code'."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"held-out prompts {path} do not exist; pass --questions FILE.jsonl")
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [{"question_id": f"{r.get('file', '?')}:{r.get('line', i)}", "category": "code", "turns": [r["prompt"]]}
            for i, r in enumerate(rows)]


def format_turn(text: str, template: str) -> str:
    """The model input for a first user turn: Vicuna v1.1 (as Spec-Bench) or the raw text."""
    if template in ("none", "chat"):  # "chat": the tokenizer's chat template is applied by the encoder
        return text
    if template == "vicuna":
        from .train.data import VICUNA_SYSTEM

        return f"{VICUNA_SYSTEM} USER: {text} ASSISTANT:"
    raise ValueError(f"template must be 'vicuna' or 'none' here, got {template!r}")


def byte_ids(text: str) -> List[int]:
    """UTF-8 bytes as token ids: the smoke model's 'tokenizer' (its vocabulary has 256 ids)."""
    return list(text.encode("utf-8"))


def per_category(questions: Sequence[Dict[str, Any]], k: int) -> List[Dict[str, Any]]:
    """The first ``k`` questions of every category, in file order (a stratified subset of Spec-Bench)."""
    taken: Dict[str, int] = {}
    out = []
    for q in questions:
        c = str(q["category"])
        if taken.get(c, 0) < k:
            taken[c] = taken.get(c, 0) + 1
            out.append(q)
    return out


def build_prompts(questions: Sequence[Dict[str, Any]], encode: Callable[[str], List[int]], template: str,
                  limit: Optional[int] = None, max_prompt_tokens: Optional[int] = None) -> List[Prompt]:
    """Encode the first turn of each question; ``max_prompt_tokens`` keeps the last tokens of long ones."""
    prompts = []
    for q in questions[:limit]:
        ids = encode(format_turn(q["turns"][0], template))
        if max_prompt_tokens is not None:
            ids = ids[-max_prompt_tokens:]
        if not ids:
            raise ValueError(f"question {q['question_id']} encodes to no tokens")
        prompts.append(Prompt(q["question_id"], str(q["category"]), torch.tensor([ids], dtype=torch.long)))
    return prompts


# ------------------------------------------------------------------------------------------- methods

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _generate_kwargs(max_new_tokens: int, eos: Optional[int], ignore_eos: bool,
                     sampling: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """``generate`` keywords; ``sampling`` (:func:`sampling_settings`): do_sample with its temperature, top-k,
    top-p and seed (the same seed for every prompt)."""
    kw: Dict[str, Any] = dict(max_new_tokens=max_new_tokens, ignore_eos=ignore_eos)
    if eos is not None and not ignore_eos:
        kw["eos_token_id"] = eos
    if sampling is not None:
        kw.update(do_sample=True, **sampling)
    return kw


def sampling_settings(temperature: Optional[float], top_k: Optional[int], top_p: Optional[float],
                      seed: int) -> Optional[Dict[str, Any]]:
    """None for greedy decoding (no temperature, or 0), else the sampling keywords every method gets."""
    if temperature is None or temperature == 0:
        if top_k is not None or top_p is not None:
            raise ValueError("--top-k and --top-p need --temperature > 0 (sampling)")
        return None
    if not temperature > 0:
        raise ValueError(f"--temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"--top-k must be positive, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {top_p}")
    return {"temperature": float(temperature), "top_k": top_k, "top_p": top_p, "seed": int(seed)}


def describe_decoding(sampling: Optional[Dict[str, Any]]) -> str:
    """'greedy', or the sampling settings in words."""
    if sampling is None:
        return "greedy"
    parts = [f"temperature {sampling['temperature']:g}"]
    parts += [f"top-k {sampling['top_k']}"] if sampling.get("top_k") is not None else []
    parts += [f"top-p {sampling['top_p']:g}"] if sampling.get("top_p") is not None else []
    return f"sampling ({', '.join(parts)}, seed {sampling['seed']})"


def _kangaroo_runner(model: Any, kcfg: KangarooConfig, kw: Dict[str, Any], graphs: bool = False) -> Callable:
    """``run(ids (1, T)) -> (new token ids, DecodeStats)`` of Kangaroo decoding with ``model``."""
    def run(ids: torch.Tensor):
        out = model.generate(ids, kangaroo=kcfg, return_dict_in_generate=True, cuda_graphs=graphs, **kw)
        return out.sequences[0, ids.shape[1]:], out.stats
    return run


def our_methods(model: Any, kcfg: KangarooConfig, max_new_tokens: int, eos: Optional[int],
                ignore_eos: bool, sampling: Optional[Dict[str, Any]] = None) -> List[Method]:
    """This project's plain decoding and Kangaroo: eager with the default op dispatch; on CUDA also with
    CUDA graphs and eager with the torch reference ops only."""
    from . import ops

    kw = _generate_kwargs(max_new_tokens, eos, ignore_eos, sampling)

    def plain(ids: torch.Tensor):
        out = model.generate(ids, kangaroo=None, return_dict_in_generate=True, **kw)
        return out.sequences[0, ids.shape[1]:], out.stats

    def kangaroo_torch_ops(ids: torch.Tensor):
        ops.set_backend("torch")
        try:
            return _kangaroo_runner(model, kcfg, kw)(ids)
        finally:
            ops.set_backend(None)

    backends = "/".join(sorted(set(ops.backend_table(model.device).values())))
    methods = [Method("ar", "kangaroo_rt plain decoding", plain),
               Method("kangaroo", f"kangaroo_rt Kangaroo, eager ({backends} ops)", _kangaroo_runner(model, kcfg, kw),
                      kangaroo=True)]
    if model.device.type == "cuda":
        methods.append(Method("kangaroo_graphs", f"kangaroo_rt Kangaroo, CUDA graphs ({backends} ops)",
                              _kangaroo_runner(model, kcfg, kw, graphs=True), kangaroo=True))
        methods.append(Method("kangaroo_torch_ops", "kangaroo_rt Kangaroo, eager, torch reference ops",
                              kangaroo_torch_ops, kangaroo=True))
    else:
        methods.append(Method("kangaroo_graphs", "kangaroo_rt Kangaroo, CUDA graphs", reason="CUDA only"))
    return methods


def draft_vocab_methods(model: Any, adapter_dir: Optional[str], sizes: Sequence[str], kcfg: KangarooConfig,
                        max_new_tokens: int, eos: Optional[int], ignore_eos: bool,
                        sampling: Optional[Dict[str, Any]] = None) -> List[Method]:
    """Kangaroo with the adapter's draft vocabulary resized to each of ``sizes`` ("full": none), side by side
    with ``kangaroo`` (the adapter as shipped): one KangarooModel per size over the same target weights."""
    import copy

    from . import draft_vocab
    from .generate import KangarooModel

    kw = _generate_kwargs(max_new_tokens, eos, ignore_eos, sampling)
    methods = []
    for size in sizes:
        name = f"kangaroo_vocab_{size}"
        adapter = copy.deepcopy(model.adapter)
        if size == "full":
            adapter.set_draft_vocab(None)
        else:
            if adapter_dir is None:
                raise ValueError("--draft-vocab needs the adapter folder's draft_vocab.safetensors")
            adapter.set_draft_vocab(draft_vocab.resize(adapter_dir, int(size)), source=f"resized to {size}")
        variant = KangarooModel(model.target, adapter, exit_layer=model.exit_layer, kangaroo=kcfg,
                                max_len=model.max_len)
        label = "full vocabulary" if size == "full" else f"{size}-token draft vocabulary"
        methods.append(Method(name, f"kangaroo_rt Kangaroo, {label}", _kangaroo_runner(variant, kcfg, kw),
                              kangaroo=True))
    return methods


def hf_methods(folder: str, dtype: torch.dtype, device: torch.device, exit_layer: int, max_new_tokens: int,
               eos: Optional[int], ignore_eos: bool, sampling: Optional[Dict[str, Any]] = None) -> List[Method]:
    """transformers ``generate`` (eager attention, the Spec-Bench baseline) and assisted generation with
    an early-exit assistant (``assistant_early_exit``, LayerSkip-style); 'unsupported' entries instead
    of errors when transformers or the feature is missing or the checkpoint does not load. With ``sampling``
    they sample with the same settings, seeded through torch's global generator before each prompt."""
    names = [("hf_generate", "transformers generate (eager)"),
             ("hf_assisted_early_exit", f"transformers assisted, early-exit assistant (layer {exit_layer})")]
    try:
        import transformers
        from transformers import AutoModelForCausalLM, GenerationConfig
    except ImportError as e:
        return [Method(n, label, reason=f"transformers is not installed ({e})") for n, label in names]
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="eager")
        hf = hf.to(device).eval()
    except Exception as e:  # any loading failure makes the baselines unavailable, never the run
        return [Method(n, label, reason=f"transformers could not load {folder}: {type(e).__name__}: {e}")
                for n, label in names]
    stop = None if ignore_eos else eos
    if ignore_eos:  # generate() fills unset (None) fields from the model's own generation config
        hf.generation_config.eos_token_id = None
    pad = eos if eos is not None else 0
    base = dict(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop, pad_token_id=pad)
    if sampling is not None:
        base.update(do_sample=True, temperature=sampling["temperature"], top_k=sampling["top_k"],
                    top_p=sampling["top_p"])

    def runner(gen_config: Any):
        @torch.no_grad()
        def run(ids: torch.Tensor):
            if sampling is not None:
                torch.manual_seed(sampling["seed"])
            seq = hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen_config)
            return seq[0, ids.shape[1]:], None
        return run

    methods = [Method(names[0][0], names[0][1], runner(GenerationConfig(**base)))]
    if hasattr(GenerationConfig(), "assistant_early_exit"):
        methods.append(Method(names[1][0], names[1][1],
                              runner(GenerationConfig(assistant_early_exit=exit_layer, **base))))
    else:
        methods.append(Method(names[1][0], names[1][1], reason=f"unsupported: transformers "
                              f"{transformers.__version__} has no assistant_early_exit"))
    return methods


# ------------------------------------------------------------------------------------------- running

def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="spec_bench", unit="prompt", file=sys.stderr)


def first_mismatch(a: Sequence[int], b: Sequence[int]) -> Optional[int]:
    """Index of the first differing token (the shorter length when one is a prefix), None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def run_methods(prompts: Sequence[Prompt], methods: Sequence[Method], device: torch.device, progress: bool = True,
                on_failure: Optional[Callable[[Method, Exception], None]] = None,
                time_limit_s: Optional[float] = None, compare: bool = True) -> Tuple[Dict, List[Dict], int]:
    """Run every available method on every prompt, interleaved (the order rotates from prompt to prompt).

    Returns ({group: {method: Tally}} with groups = categories + 'overall', mismatches vs 'ar', prompts
    measured). A method that raises is reported through ``on_failure`` and dropped from the rest of the run.
    With ``time_limit_s``, no prompt is started once that many seconds have passed (every method still
    runs every prompt it starts, so the ratios stay over the same prompts). ``compare=False`` (sampling, where
    each method draws its own tokens) reports no mismatches.
    """
    live = [m for m in methods if m.available]
    if not prompts:
        raise ValueError("no prompts to run")
    warm = prompts[0].ids[:, -16:].to(device)
    for m in list(live):  # warm-up on a short prompt: caches, kernels, lazy imports
        try:
            m.run(warm)
        except Exception as e:
            _fail(m, e, live, on_failure)
    tallies: Dict[str, Dict[str, Tally]] = {}
    mismatches: List[Dict] = []
    bar = _progress(len(prompts), progress)
    start = time.perf_counter()
    measured = len(prompts)
    for i, p in enumerate(prompts):
        if time_limit_s is not None and time.perf_counter() - start > time_limit_s:
            measured = i
            break
        ids = p.ids.to(device)
        order = live[i % len(live):] + live[:i % len(live)] if live else []
        outputs: Dict[str, List[int]] = {}
        for m in order:
            try:
                _sync(device)
                t0 = time.perf_counter()
                new, stats = m.run(ids)
                _sync(device)
                dt = time.perf_counter() - t0
            except Exception as e:
                _fail(m, e, live, on_failure)
                continue
            outputs[m.name] = new.tolist()
            for group in (p.category, "overall"):
                tallies.setdefault(group, {}).setdefault(m.name, Tally()).add(len(outputs[m.name]), dt, stats)
        ref = outputs.get("ar") if compare else None
        for name, toks in outputs.items():
            if ref is not None and name != "ar":
                at = first_mismatch(ref, toks)
                if at is not None:
                    mismatches.append({"question_id": p.question_id, "category": p.category, "method": name,
                                       "reference": "ar", "first_index": at, "reference_tokens": len(ref),
                                       "method_tokens": len(toks)})
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return tallies, mismatches, measured


def _fail(m: Method, e: Exception, live: List[Method], on_failure) -> None:
    if m in live:
        live.remove(m)
    m.run, m.reason = None, f"failed: {type(e).__name__}: {e}"
    if on_failure is not None:
        on_failure(m, e)


def summarize(tallies: Dict[str, Dict[str, Tally]], methods: Sequence[Method]) -> Dict[str, Dict[str, Dict]]:
    """{group: {method: totals + speedup_vs {baseline: ratio of tokens/s}}}; 'overall' comes last."""
    kinds = {m.name: m.kangaroo for m in methods}
    groups = sorted(g for g in tallies if g != "overall") + (["overall"] if "overall" in tallies else [])
    out: Dict[str, Dict[str, Dict]] = {}
    for g in groups:
        rows = {name: t.as_dict(kinds.get(name, False)) for name, t in tallies[g].items()}
        for name, row in rows.items():
            row["speedup_vs"] = {b: row["tokens_per_s"] / rows[b]["tokens_per_s"]
                                 for b in BASELINES if b in rows and rows[b]["tokens_per_s"] and row["tokens_per_s"]}
            cost = round_cost(rows["ar"], row) if kinds.get(name) and "ar" in rows else None
            if cost is not None:
                row["round_cost_in_plain_steps"] = cost
        out[g] = rows
    return out


# ------------------------------------------------------------------------------------------- reporting

def _fmt(x: Optional[float], spec: str, suffix: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{suffix}"


def format_table(summary: Dict[str, Dict[str, Dict]], methods: Sequence[Method]) -> str:
    """Markdown tables: overall per method, then per category the speedups."""
    names = [m.name for m in methods if any(m.name in rows for rows in summary.values())]
    lines = ["| method | tokens/s | vs HF generate | vs kangaroo_rt AR | MAT | draft time |",
             "|---|---|---|---|---|---|"]
    overall = summary.get("overall", {})
    for name in names:
        r = overall.get(name)
        if r is None:
            continue
        sp = r["speedup_vs"]
        lines.append(f"| {name} | {_fmt(r['tokens_per_s'], '.1f')} | {_fmt(sp.get('hf_generate'), '.2f', 'x')} | "
                     f"{_fmt(sp.get('ar'), '.2f', 'x')} | {_fmt(r.get('mat'), '.2f')} | "
                     f"{_fmt(None if r.get('draft_time_fraction') is None else 100 * r['draft_time_fraction'], '.0f', '%')} |")
    costs = [(name, overall[name]["round_cost_in_plain_steps"]) for name in names
             if "round_cost_in_plain_steps" in overall.get(name, {})]
    if costs:
        lines += ["", "Kangaroo's round in plain steps after the prefill (a plain step: ar's time per token there): "
                  "decode speedup = tokens per round / round", "",
                  "| method | plain step ms | drafting | verify | other | round | tokens per round | decode speedup |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {name} | {c['plain_step_ms']:.2f} | {c['draft']:.2f} | {c['verify']:.2f} | {c['other']:.2f} | "
                  f"{c['round']:.2f} | {c['tokens_per_round']:.2f} | {c['decode_speedup']:.2f}x |" for name, c in costs]
        for name, c in costs:
            by = c.get("verify_by_tokens")
            if by:
                keys = sorted(by, key=int)
                lines += ["", f"{name}: a verify pass by the tokens it ran over (k drafts + 1): share of the passes, "
                          "and one pass in plain steps", "",
                          "| tokens | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|",
                          "| share | " + " | ".join(f"{100 * by[k]['share']:.0f}%" for k in keys) + " |",
                          "| plain steps | " + " | ".join(f"{by[k]['plain_steps']:.2f}" for k in keys) + " |"]
    base = "hf_generate" if "hf_generate" in overall else "ar"
    cats = [g for g in summary if g != "overall"]
    if len(cats) > 1 or (cats and cats[0] != "overall"):
        lines += ["", f"speedup vs {base} by category (MAT of kangaroo in brackets)", "",
                  "| category | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for g in cats + ["overall"]:
            cells = []
            for name in names:
                r = summary[g].get(name)
                cell = _fmt(None if r is None else r["speedup_vs"].get(base), ".2f", "x")
                if r is not None and r.get("mat") is not None and name == "kangaroo":
                    cell += f" ({r['mat']:.2f})"
                cells.append(cell)
            lines.append(f"| {g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: Dict[str, Dict[str, Dict]], path_stem: str, title: str) -> List[str]:
    """Two PNGs: speedup by category (vs HF generate, else vs AR) and acceptance by draft position."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install 'kangaroo_rt[bench]')", file=sys.stderr)
        return []
    groups = list(summary)
    base = "hf_generate" if "hf_generate" in summary.get("overall", {}) else "ar"
    names = [n for n in dict.fromkeys(n for g in groups for n in summary[g]) if n != base]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(groups) + 2), 4))
    width = 0.8 / max(1, len(names))
    for j, name in enumerate(names):
        vals = [summary[g].get(name, {}).get("speedup_vs", {}).get(base, 0.0) for g in groups]
        ax.bar([i + j * width for i in range(len(groups))], vals, width, label=name)
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(groups))])
    ax.set_xticklabels(groups, rotation=30, ha="right")
    ax.set_ylabel(f"speedup vs {base}")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths = [f"{path_stem}-speedup.png"]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for g in groups:
        acc = summary[g].get("kangaroo", {}).get("acceptance_by_position")
        if acc:
            xs = [i + 1 for i, a in enumerate(acc) if a is not None]
            ax.plot(xs, [a for a in acc if a is not None], marker="o", label=g,
                    linewidth=2.5 if g == "overall" else 1.0)
    ax.set_xlabel("draft position")
    ax.set_ylabel("P(accepted | proposed)")
    ax.set_ylim(0, 1.05)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(f"{path_stem}-acceptance.png")
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    fields: Dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if not sep:
                    break  # the first processor's block ends at its blank line
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    model = fields.get("model name", model)
    # A virtual machine's model name can be generic ("AMD EPYC"): the family and model numbers tell its
    # generations apart (AMD family 25 is Zen 3 / Zen 4, 26 is Zen 5), whose memory systems measure differently.
    if "cpu family" in fields and "model" in fields:
        model += f" (family {fields['cpu family']}, model {fields['model']})"
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


# ------------------------------------------------------------------------------------------- entry point

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="a model name (embedded, smollm2; see kangaroo_rt.models) or a target "
                        "checkpoint folder (HF layout); default: the embedded model")
    parser.add_argument("--adapter", help="adapter folder (official format); default: the named model's shipped "
                        "adapter, else MODEL/adapter")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the model folder)")
    parser.add_argument("--questions", help="Spec-Bench-format JSONL (question_id, category, turns); "
                        "default: the embedded model's held-out code prompts")
    parser.add_argument("--template", default="auto", choices=TEMPLATES,
                        help="prompt format of the first turn; auto: the tokenizer's chat template (chat) when it has one, "
                        "else vicuna, for --questions; none for code prompts")
    parser.add_argument("--prompts", type=int, help="use the first N prompts only")
    parser.add_argument("--per-category", type=int, help="use the first N prompts of each category only")
    parser.add_argument("--time-limit", type=float,
                        help="start no prompt after this many seconds of measuring (the JSON says how many ran)")
    parser.add_argument("--max-prompt-tokens", type=int, help="keep only the last N tokens of longer prompts")
    parser.add_argument("--max-new-tokens", type=int, help="default 128 (smoke: 24)")
    parser.add_argument("--exit-layer", type=int, help="default: adapter/kangaroo.json, else 2")
    parser.add_argument("--gamma", type=int, help="default: adapter/kangaroo.json, else 6")
    parser.add_argument("--eta", type=float, help="default: adapter/kangaroo.json, else 0.6")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                        help="default on CPU: the adapter's kangaroo.json cpu_dtype, else float32; float16 on CUDA")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    parser.add_argument("--temperature", type=float,
                        help="sample with this temperature instead of greedy decoding (0 or unset: greedy); every "
                             "method samples with the same settings and tokens are not compared")
    parser.add_argument("--top-k", type=int, help="with --temperature: keep the k most likely tokens")
    parser.add_argument("--top-p", type=float, help="with --temperature: keep the nucleus of this mass")
    parser.add_argument("--seed", type=int, default=0, help="with --temperature: the seed of every prompt (default 0)")
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers baselines")
    parser.add_argument("--draft-vocab", nargs="+", metavar="K", type=_vocab_size,
                        help="also run Kangaroo with the adapter's draft vocabulary resized to each K ('full': the "
                             "whole vocabulary), in the same run (kangaroo_vocab_K methods)")
    parser.add_argument("--llama-cpp", nargs="*", metavar="PRECISION",
                        help="also run llama.cpp (llama-cpp-python, an optional extra) on the named model's GGUF: "
                             "'shipped' (the file it comes in, e.g. Q4_1) and/or the same weights as F32, F16, BF16; "
                             "no value: all four (llama_cpp_<precision> methods)")
    parser.add_argument("--strict", action="store_true", help="exit 1 on any token mismatch, HF included")
    parser.add_argument("--smoke", action="store_true",
                        help="seconds-long run on a random tiny model (byte 'tokenizer'); numbers mean nothing")
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"),
                        help="folder for spec_bench-<device>.json and the PNG plots")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--no-progress", action="store_true")


def load_run(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, scratch: str):
    """-> (KangarooModel, HF folder, adapter folder (None for the smoke run's in-memory adapter), encode, eos id,
    questions, template, settings, description)."""
    from .generate import KangarooModel

    if args.smoke:
        from .loading import save_model
        from .testing import agreeing_pair, tiny_config

        cfg = tiny_config(vocab_size=256, hidden_size=64, num_layers=6, num_heads=4, num_kv_heads=2,
                          intermediate_size=128)
        exit_layer = args.exit_layer or 2
        target, adapter = agreeing_pair(cfg, exit_layer=exit_layer, seed=0, deep_scale=0.1, head_scale=4.0)
        save_model(target, scratch)
        model = KangarooModel.from_pretrained(scratch, adapter.to(dtype=dtype, device=device), exit_layer=exit_layer,
                                              dtype=dtype, device=device)
        questions = read_questions(args.questions) if args.questions else SMOKE_QUESTIONS
        template = "none" if args.template == "auto" else args.template
        return model, scratch, None, byte_ids, None, questions, template, {}, "random tiny agreeing pair (smoke)"
    from .embedded import ASSETS
    from .models import REGISTRY, resolve

    named = args.model is None or args.model in REGISTRY
    resolved = resolve(args.model, args.adapter)
    folder = resolved.folder
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"no config.json in {folder}: pass --model/--adapter/--tokenizer, or --smoke")
    adapter_dir = resolved.adapter or os.path.join(folder, "adapter")
    if not os.path.isdir(adapter_dir):
        raise FileNotFoundError(f"adapter folder {adapter_dir} does not exist (pass --adapter)")
    settings = resolved.settings
    exit_layer = args.exit_layer or settings.get("exit_layer", 2)
    model = KangarooModel.from_pretrained(folder, adapter_dir, exit_layer=exit_layer, dtype=dtype, device=device)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.tokenizer or folder)
    if args.questions:
        questions, template = read_questions(args.questions), ("chat" if tok.chat_template else "vicuna")
    else:
        questions, template = heldout_questions(os.path.join(ASSETS, "heldout_prompts.jsonl")), "none"
    if args.template != "auto":
        template = args.template
    eos = tok.eos_token_id
    if eos is None and model.config.eos_token_ids:
        eos = model.config.eos_token_ids[0]

    def encode(text: str) -> List[int]:
        if template == "chat":
            return list(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                tokenize=True, return_dict=True)["input_ids"])
        return tok(text).input_ids

    # a name, not a machine-specific absolute path, for the JSON and the plot titles
    what = f"{resolved.name} model" if named else os.path.basename(os.path.normpath(folder))
    return model, folder, adapter_dir, encode, eos, questions, template, settings, what


def _registry_names() -> Sequence[str]:
    from .models import REGISTRY

    return tuple(REGISTRY)


def _vocab_size(text: str) -> str:
    if text != "full" and not (text.isdigit() and int(text) > 0):
        raise argparse.ArgumentTypeError(f"a draft vocabulary size is a positive integer or 'full', not {text!r}")
    return text


def default_dtype(args: argparse.Namespace, device: torch.device) -> torch.dtype:
    """fp16 on CUDA; on CPU the dtype the adapter's kangaroo.json recommends (``cpu_dtype``), else fp32."""
    if device.type == "cuda":
        return torch.float16
    if args.smoke:
        return torch.float32
    from .models import preferred_dtype, resolve

    return preferred_dtype(resolve(args.model, args.adapter).settings, device) or torch.float32


def run(args: argparse.Namespace) -> int:
    """The benchmark for parsed arguments; returns the exit status (1 on a lossless violation)."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is available")
    dtype = getattr(torch, args.dtype) if args.dtype else default_dtype(args, device)
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in ("prompts", "per_category", "max_prompt_tokens", "max_new_tokens", "threads", "time_limit"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
    with tempfile.TemporaryDirectory(prefix="kangaroo_bench_") as scratch:
        model, folder, adapter_dir, encode, eos, questions, template, settings, what = load_run(args, device, dtype,
                                                                                                scratch)
        if args.per_category:
            questions = per_category(questions, args.per_category)
        limit = args.prompts or (4 if args.smoke else None)
        max_prompt = args.max_prompt_tokens or (48 if args.smoke else None)
        max_new = args.max_new_tokens or (24 if args.smoke else 128)
        sampling = sampling_settings(args.temperature, args.top_k, args.top_p, args.seed)
        kcfg = KangarooConfig(gamma=args.gamma if args.gamma is not None else settings.get("gamma", 6),
                              eta=args.eta if args.eta is not None else settings.get("eta", 0.6))
        prompts = build_prompts(questions, encode, template, limit, max_prompt)
        # One cache size for the whole run: no reallocation (or graph re-capture) inside a timed call.
        model.max_len = max(p.ids.shape[1] for p in prompts) + max_new + kcfg.gamma + 1
        methods = our_methods(model, kcfg, max_new, eos, args.ignore_eos, sampling)
        if args.draft_vocab:
            methods += draft_vocab_methods(model, adapter_dir, args.draft_vocab, kcfg, max_new, eos, args.ignore_eos,
                                           sampling)
        if args.no_hf:
            methods += [Method(n, n, reason="skipped (--no-hf)") for n in ("hf_generate", "hf_assisted_early_exit")]
        else:
            methods += hf_methods(folder, dtype, device, model.exit_layer, max_new, eos, args.ignore_eos, sampling)
        if args.llama_cpp is not None and sampling is not None:
            from . import llama_cpp

            methods += [Method(llama_cpp.method_name(p), f"llama.cpp, {p} GGUF",
                               reason="greedy only here (llama.cpp's samplers are not this project's)")
                        for p in (args.llama_cpp or llama_cpp.PRECISIONS)]
        elif args.llama_cpp is not None:
            from . import llama_cpp

            name = args.model if not args.smoke and args.model in _registry_names() else None
            methods += llama_cpp.methods(name, args.llama_cpp or llama_cpp.PRECISIONS,
                                         args.threads or torch.get_num_threads(), model.max_len, max_new, eos,
                                         args.ignore_eos, Method)
        print(f"spec_bench: {what}; {len(prompts)} prompts, {max_new} new tokens max, {describe_decoding(sampling)}, "
              f"batch 1, "
              f"{str(dtype).replace('torch.', '')} on {device_name(device)}")
        print(f"Kangaroo exit layer {model.exit_layer}, gamma {kcfg.gamma}, eta {kcfg.eta}; template {template}")
        for m in methods:
            if not m.available:
                print(f"  {m.name}: {m.reason}")

        def failed(m: Method, e: Exception) -> None:
            print(f"ERROR: method {m.name} failed and is dropped: {type(e).__name__}: {e}", file=sys.stderr)

        tallies, mismatches, measured = run_methods(prompts, methods, device, progress=not args.no_progress,
                                                    on_failure=failed, time_limit_s=args.time_limit,
                                                    compare=sampling is None)
    if measured < len(prompts):
        print(f"spec_bench: --time-limit {args.time_limit:g} s reached: {measured} of {len(prompts)} prompts measured")
    summary = summarize(tallies, methods)
    print(format_table(summary, methods))
    result = {
        "benchmark": "spec_bench", "smoke_run": bool(args.smoke), "device": device_name(device),
        "device_type": device.type, "dtype": str(dtype).replace("torch.", ""),
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
        "transformers": _version("transformers"), "model": what, "embedded_model": not args.smoke and args.model in (None, "embedded"), "prompts_source": args.questions or ("built-in smoke prompts" if args.smoke else "embedded held-out code prompts"),
        "template": template, "prompts": measured, "prompts_selected": len(prompts), "per_category": args.per_category,
        "max_new_tokens": max_new,
        "ignore_eos": bool(args.ignore_eos),
        "exit_layer": model.exit_layer, "gamma": kcfg.gamma, "eta": kcfg.eta,
        "config": {k: getattr(model.config, k) for k in ("num_hidden_layers", "hidden_size", "vocab_size")},
        "methods": {m.name: {"label": m.label, "available": m.available, "reason": m.reason} for m in methods},
        "results": summary, "greedy_mismatches": mismatches, "sampling": sampling,
    }
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"spec_bench-{'smoke' if args.smoke else device.type}")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=2)
    plots = [] if args.no_plots else plot(summary, stem, f"{what}, {result['device']}")
    print("wrote " + ", ".join([stem + ".json"] + plots))
    return _verdict(mismatches, methods, args.strict, exact=dtype == torch.float32, sampled=sampling is not None)


def _verdict(mismatches: List[Dict], methods: Sequence[Method], strict: bool, exact: bool = True,
             sampled: bool = False) -> int:
    """Exit status: 1 when one of our methods did not run, or differs from plain decoding in fp32 (a
    lossless violation), or on any mismatch with ``strict``. In half precision a verify pass over k
    tokens and k single-token steps round differently, so a near-tie may flip: reported, not fatal.
    Sampled runs compare no tokens (``sampled``)."""
    status = 0
    for name in ("ar", "kangaroo"):
        m = next((m for m in methods if m.name == name), None)
        if m is not None and not m.available:
            print(f"ERROR: {name} did not run: {m.reason}", file=sys.stderr)
            status = 1
    if sampled:
        print("sampling: tokens are not compared (each method draws its own; tests/test_speculative.py checks "
              "Kangaroo's sampled distribution)")
        return status
    if not mismatches:
        print("greedy tokens: all methods identical to kangaroo_rt plain decoding")
        return status
    ours = [x for x in mismatches if not x["method"].startswith(EXTERNAL_PREFIXES)]
    bar = "!" * 72
    print(f"{bar}\nGREEDY TOKEN MISMATCH vs kangaroo_rt plain decoding ({len(mismatches)} prompt/method pairs):",
          file=sys.stderr)
    for x in mismatches:
        print(f"  {x['method']:<24} question {x['question_id']} ({x['category']}): first differing token "
              f"{x['first_index']} (lengths {x['reference_tokens']} vs {x['method_tokens']})", file=sys.stderr)
    if not ours:
        print("only other runtimes differ (transformers, llama.cpp): fp round-off between implementations can flip a "
              "near-tie, and a GGUF of another precision is another model; --strict makes this an error",
              file=sys.stderr)
    elif not exact:
        print("kangaroo_rt methods differ in half precision, where a near-tie may flip between a k-token verify "
              "and single-token steps; fp32 must match exactly; --strict makes this an error", file=sys.stderr)
    print(bar, file=sys.stderr)
    return 1 if (ours and exact) or strict else status


def _version(package: str) -> Optional[str]:
    try:
        return __import__(package).__version__
    except ImportError:
        return None


def main(argv: Optional[List[str]] = None, prog: Optional[str] = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"spec_bench: error: {e}", file=sys.stderr)
        return 2
