"""Step latency vs the memory floor, for 7B- and 13B-like Llama shapes with random fp16 weights on a GPU.

Steps (each timed eagerly and, on CUDA, replayed from a captured CUDA graph):
  plain       one decode step of the whole model (the AR baseline); the argmax of plain and verify steps is
              the decoder's own (greedy_tokens: 16-bit CPU logits widened to fp32 first, which torch's bf16
              argmax takes 3-6x as long as)
  plain_per_op  on the CPU with kangaroo_rt._cpu: the same step with the layers' ops called one by one from
              Python instead of the one-call layer stack (what that call saves)
  draft@l     one Kangaroo draft step: layers 0..l-1 on one token, the adapter, the LM head, argmax
  draftK@l    the same over a draft vocabulary of K tokens (kangaroo_rt.draft_vocab: a K-row head), for
              each K of --draft-vocab below the shape's vocabulary, at the shape's exit layer
  shallow@l   layers 0..l-1 only (the last step of a draft chain)
  chain@l/g   on the CPU with kangaroo_rt._cpu: what a Kangaroo round drafts with there, the decoder's one-call
              draft chain (csrc/cpu/draft.cpp) of g greedy drafts (eta 0: none stops early) and the shallow step
              after them, for each g = k - 1 of the verify steps; the draft@l row times one step driven from Python
              (2.3-3.3 ms in bf16 at SmolLM2's shape, ~1.1 ms a draft in the chain), which the CPU decoder does not
              run. Its floor counts every draft's bytes as read from DRAM; a chain's drafts re-read the same shallow
              layers, adapter and head back to back, part of which the L3 keeps, so it can pass 100%
  verify@l/k  layers l..N-1 on k = gamma+1 stacked exit states, final norm, LM head, argmax (l: the
              paper's exit layer, 2 for 7B and 3 for 13B)
  pass, vpass@l/k  on the CPU with kangaroo_rt._cpu: the steps the decode loop runs, the decoder's one-call target
              pass from the rows' tokens (a plain step) or over k exit states (a verification), with the screened
              head (its int8 copy: bytes counted as one a weight), the greedy choice and the commit. The plain and
              verify rows above are driven from Python with the whole head, 1.5x a loop's plain step at SmolLM2's
              shape, so their ratio understates a verification's cost; compare vpass with pass. (Random weights:
              the screen may compute more rows exactly than on a trained model's states.)
at batch 1, 4, 16 and context 512 / 2048. Each step's floor is the bytes it must read (weights of the
layers it runs + the KV cache it attends over + the KV it writes; activations and logits excluded)
divided by the device-to-device copy bandwidth measured in the same run. On the CPU it is divided by the DRAM
read bandwidth instead (a step reads its bytes; bench_linear's probe, torch.sum over 512 MB), timed in turns
with the steps of each (batch, context), one read per repeat, the median: the host's bandwidth swings by tens of
percent within seconds. Before 2026-12-06 the CPU floor used the best of 5 host copies at the start, which counts
the bytes read and written and could catch a fast spell the steps never saw (cpu-20261206-s20-steps-bfloat16 put
a bf16 plain step at 47-50% of that floor; against the read bandwidth of its own seconds, cpu-20261206-s21-steps-*,
a plain step reads at 71-91%). The probe runs right after the plain step in each repeat, so the plain step still
follows the last verify step. Each CPU row records its bandwidth as ``floor_bandwidth_gbs`` (None on CUDA); the
copy at the start stays ``copy_bandwidth_gbs``.

From these latencies, the end-to-end speedup of Kangaroo over plain decoding is modeled at fixed
gamma (no eta early stop): E[tokens/round] = 1 + sum_i prod_{j<=i} a_j for per-position acceptance
a_j, round time = gamma * draft + shallow + verify(gamma + 1) (on the CPU, chain(gamma) + verify(gamma + 1),
where the chain rows were measured: each model entry's ``drafts`` says which), speedup = E * plain / round, best
gamma reported, for constant acceptance profiles, for --acceptance, and for the embedded model's profile
measured by spec_bench / bench_embedded (newest non-smoke JSON under benchmarks/results/).

Without CUDA (or with --smoke) a tiny shape runs on the CPU and the script says so; its numbers
only prove the script works. ``--device cpu`` runs the named shapes on the CPU for real (e.g. the SmolLM2
shape: ``--device cpu --shapes smollm2 --batches 1 --contexts 512 --verify-tokens 4``).

    PYTHONPATH=. python benchmarks/bench_steps.py [--out DIR] [--shapes 7B,13B] [--acceptance 0.8,0.7,0.6]
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import kernel_bench_utils as kb  # noqa: E402
from kangaroo_rt import _cpu_ext, hugepages, ops  # noqa: E402
from kangaroo_rt.adapter import Adapter  # noqa: E402
from kangaroo_rt.config import ModelConfig  # noqa: E402
from kangaroo_rt.draft_vocab import DraftHead  # noqa: E402
from kangaroo_rt.model import Transformer, rope_inv_freq  # noqa: E402
from kangaroo_rt.speculative import greedy_tokens  # noqa: E402

NAME = "bench_steps"
# name -> (config, the paper's exit layer)
SHAPES: Dict[str, Tuple[ModelConfig, int]] = {
    "7B": (ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32), 2),
    "13B": (ModelConfig(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                        num_attention_heads=40, num_key_value_heads=40), 3),
    "llama3-8B": (ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                              num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0), 2),
    "smollm2": (ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                            num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0,
                            tie_word_embeddings=True), 2),  # the shipped adapter's exit layer
}
SMOKE_SHAPE = (ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                           num_attention_heads=4, num_key_value_heads=2), 2)
CONSTANT_PROFILES = (0.6, 0.7, 0.8, 0.9)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--smoke", action="store_true", help="tiny shape on the CPU (also the default without CUDA)")
    p.add_argument("--shapes", default="7B,13B", help=f"comma list of {sorted(SHAPES)}")
    p.add_argument("--batches", default="1,4,16")
    p.add_argument("--contexts", default="512,2048")
    p.add_argument("--exit-layers", default="1,2,3", help="draft steps measured at these exit layers")
    p.add_argument("--verify-tokens", default="2,3,4,5,6,7,8", help="k = gamma + 1 values for verify steps")
    p.add_argument("--acceptance", help="extra per-position acceptance profile for the model, e.g. 0.8,0.7,0.6")
    p.add_argument("--profile-from", help="results JSON with acceptance_by_position (default: newest non-smoke "
                   "spec_bench-*.json / bench_embedded.json under benchmarks/results)")
    p.add_argument("--no-graphs", action="store_true", help="eager timings only")
    p.add_argument("--cpu-repeats", type=int, default=5,
                   help="wall times per step on the CPU, median reported (default 5; more on a noisy host); the "
                   "steps of one batch and context take turns, so that the host's drift hits them alike")
    p.add_argument("--draft-vocab", default="32768,16384,8192,4096",
                   help="draft-vocabulary sizes K timed beside the full-head draft step (sizes >= vocab skipped)")
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda if available, else a --smoke run")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="default float16 on CUDA, float32 on the CPU")
    args = p.parse_args(argv)
    for name in ("batches", "contexts", "exit_layers", "verify_tokens", "draft_vocab"):
        try:
            values = [int(v) for v in getattr(args, name).split(",") if v.strip()]
        except ValueError:
            p.error(f"--{name.replace('_', '-')} must be a comma list of integers")
        if not values or min(values) <= 0:
            p.error(f"--{name.replace('_', '-')} needs positive integers")
        setattr(args, name, values)
    args.shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    bad = [s for s in args.shapes if s not in SHAPES]
    if bad:
        p.error(f"unknown shape(s) {bad}; known: {sorted(SHAPES)}")
    if args.acceptance:
        try:
            args.acceptance = [float(v) for v in args.acceptance.split(",")]
        except ValueError:
            p.error("--acceptance must be a comma list of probabilities")
        if not all(0.0 <= a <= 1.0 for a in args.acceptance):
            p.error("--acceptance values must lie in [0, 1]")
    if args.cpu_repeats < 1:
        p.error("--cpu-repeats must be positive")
    return args


# ------------------------------------------------------------------------------------------- models

def random_model(config: ModelConfig, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Tuple[Transformer, Adapter]:
    """Target + adapter with random weights made directly on ``device`` in ``dtype`` (no fp32 host copy)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            target, adapter = Transformer(config), Adapter(config)
    finally:
        torch.set_default_dtype(previous)
    gen = torch.Generator(device=device).manual_seed(seed)
    std = config.hidden_size ** -0.5
    for module in (target, adapter):
        module.to_empty(device=device)
        with torch.no_grad():
            for name, p in module.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, std, generator=gen)
    target.inv_freq = rope_inv_freq(config).to(device)
    target = target.eval().fuse_projections()  # fused q/k/v and gate/up, as loading does
    if device.type == "cpu":
        hugepages.place(target)  # and the weights in 2 MB pages, as loading does (kangaroo_rt/hugepages.py)
    # (the adapter's q/k/v fused too, as Adapter.load and Adapter.random do: until 2026-12-06 they were not, so the
    # draft rows ran the adapter op by op, where the decoder runs it as one call)
    return target, adapter.eval().fuse_projections()


def param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


# ------------------------------------------------------------------------------------------- timing

READ_PROBE_BYTES, READ_PROBE_BYTES_SMOKE = 512 * 2**20, 16 * 2**20  # the CPU floor's read probe (a step reads)


def cpu_copy_bandwidth_gbs() -> float:
    """Bytes read + written per second by a 64 MiB host copy (best of 5), in GB/s."""
    src = torch.empty(64 * 2**20, dtype=torch.uint8)
    dst = torch.empty_like(src)
    best = min(_wall(lambda: dst.copy_(src)) for _ in range(5))
    return 2 * src.numel() / best / 1e9


def _wall(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_ms(fn: Callable[[], object], device: torch.device, cpu_repeats: int = 5) -> float:
    """Median milliseconds per call (triton's do_bench on CUDA, median of ``cpu_repeats`` wall times on CPU)."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))
    for _ in range(3):  # one warm-up call left the first case (the plain step) cold at times: 7.5 ms against 4.2
        fn()
    return 1e3 * statistics.median(_wall(fn) for _ in range(cpu_repeats))


def interleaved_cpu_ms(fns: Sequence[Callable[[], object]], cpu_repeats: int) -> List[float]:
    """Median milliseconds per call of each of ``fns`` on the CPU, timed in turns: every repeat calls each function
    once, in order. This host's memory bandwidth drifts by tens of percent within a minute, so timing one step's
    repeats after another's put that drift between them (a 5-token verify measured anywhere from 0.98 to 1.44 plain
    steps in one run); in turns, the drift hits every step alike and their ratios hold. Each call also follows a
    different step, as in decoding, where a step's weights were not the last ones read."""
    for fn in fns:
        for _ in range(3):  # one warm-up call left the first case (the plain step) cold at times: 7.5 ms against 4.2
            fn()
    walls: List[List[float]] = [[] for _ in fns]
    for _ in range(cpu_repeats):
        for i, fn in enumerate(fns):
            walls[i].append(_wall(fn))
    return [1e3 * statistics.median(w) for w in walls]


def graph_ms(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """Median milliseconds of one replay of ``fn`` captured in a CUDA graph (None off CUDA)."""
    if device.type != "cuda":
        return None
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        fn()
        fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    try:
        return time_ms(graph.replay, device)
    finally:
        del graph


# ------------------------------------------------------------------------------------------- steps

class Steps:
    """The step functions of one shape over caches of ``max_batch`` rows and ``max_len`` positions."""

    def __init__(self, target: Transformer, adapter: Adapter, max_batch: int, max_len: int) -> None:
        self.target, self.adapter = target, adapter
        self.cache = target.new_cache(max_batch, max_len)
        self.adapter_cache = adapter.new_cache(max_batch, max_len)
        cfg = target.config
        self.elt = torch.empty((), dtype=target.dtype).element_size()
        self.kv_bytes_per_pos = 2 * cfg.num_key_value_heads * cfg.head_dim * self.elt  # one layer, one row
        self.layer_bytes = [param_bytes(layer) for layer in target.layers]
        self.head_bytes = param_bytes(target.lm_head) + param_bytes(target.norm)
        self.adapter_bytes = param_bytes(adapter)

    def _inputs(self, batch: int, context: int, q: int):
        dev = self.target.device
        pos = context + torch.arange(q, device=dev)[None, :].expand(batch, q).contiguous()  # (B, q)
        tokens = torch.randint(0, self.target.config.vocab_size, (batch, q), device=dev)  # (B, q)
        return tokens, pos

    def _kv(self, layers: int, batch: int, context: int, q: int) -> int:
        return layers * batch * (context + 2 * q) * self.kv_bytes_per_pos  # read context + q, write q

    def plain(self, batch: int, context: int) -> Tuple[Callable[[], object], int]:
        t = self.target
        tokens, pos = self._inputs(batch, context, 1)

        def step():
            return greedy_tokens(t(tokens, pos, self.cache, kv_len=context + 1)[:, -1])

        n = t.num_layers
        return step, sum(self.layer_bytes) + self.head_bytes + self._kv(n, batch, context, 1)

    def plain_per_op(self, batch: int, context: int) -> Tuple[Callable[[], object], int]:
        """The plain step with every layer's ops called one by one from Python (the CPU path before the one-call
        layer stack, ``_cpu.decoder_layers``): what that call saves."""
        step, nbytes = self.plain(batch, context)

        def per_op():
            self.target._cpu_stack = lambda *args: None  # an instance attribute shadows the method
            try:
                return step()
            finally:
                del self.target._cpu_stack

        return per_op, nbytes

    def draft(self, batch: int, context: int, exit_layer: int, with_adapter: bool = True,
              draft_vocab: Optional[int] = None):
        """A draft step; ``draft_vocab`` K: over the head's first K rows (a K-token draft vocabulary; which
        rows does not change the cost), mapped back to full ids as the decoder does."""
        t, a = self.target, self.adapter
        tokens, pos = self._inputs(batch, context, 1)
        rope = t.rope(pos)
        head = None if draft_vocab is None else DraftHead(t.lm_head.weight, torch.arange(draft_vocab))

        def step():
            e = t.forward_layers(t.embed(tokens), pos, 0, exit_layer, self.cache, kv_len=context + 1, rope=rope)
            if not with_adapter:
                return e
            y = a(e, pos, *rope, self.adapter_cache, kv_len=context + 1)[:, -1]
            if head is None:
                return ops.greedy_with_confidence(t.lm_head(y))
            token, conf = ops.greedy_with_confidence(head(y))
            return head.full_ids(token), conf

        return step, self.draft_bytes(batch, context, exit_layer, with_adapter, draft_vocab)

    def draft_bytes(self, batch: int, context: int, exit_layer: int, with_adapter: bool = True,
                    draft_vocab: Optional[int] = None) -> int:
        """The bytes a draft step (or, without the adapter, a shallow step) reads: the exit layers' weights and
        caches, then the adapter's, and the head's rows (K of them with a draft vocabulary)."""
        t = self.target
        bytes_ = sum(self.layer_bytes[:exit_layer]) + self._kv(exit_layer, batch, context, 1)
        if with_adapter:
            head = param_bytes(t.lm_head) if draft_vocab is None else draft_vocab * t.lm_head.weight.shape[1] * self.elt
            bytes_ += self.adapter_bytes + head + self._kv(1, batch, context, 1)
        return bytes_

    def _decoder_state(self, batch: int, context: int, exit_layer: int, gamma: int):
        """The CPU decoder of ``exit_layer`` (one per exit layer for every (batch, context, gamma): its caches grow to
        the largest, once each), a greedy state after a 4-token prefill with its rows moved to ``context`` (what the
        slots hold does not change the work), and a draft chain of ``gamma``. None without the CPU extension or on
        a CUDA device."""
        from kangaroo_rt.config import SamplingConfig
        from kangaroo_rt.speculative import BatchSampling, DecodeState, Decoder, DraftChain

        t = self.target
        if t.device.type != "cpu" or not _cpu_ext.is_available():
            return None
        decoders = self.__dict__.setdefault("_decoders", {})
        decoder = decoders.get(exit_layer)
        if decoder is None:
            decoder = decoders[exit_layer] = Decoder(t, self.adapter, exit_layer=exit_layer)
        decoder.ensure_caches(batch, context + gamma + 2)
        state = DecodeState.allocate(batch, gamma + 4, t.device, hidden=t.config.hidden_size, dtype=t.dtype)
        state.sampler = BatchSampling(SamplingConfig(), None)
        ids = torch.randint(0, t.config.vocab_size, (batch, 4), device=t.device)
        decoder.prefill(ids, torch.full((batch,), 4, device=t.device), state, gamma + 3)
        state.pos.fill_(context)
        return decoder, state, DraftChain.allocate(batch, gamma, t.config.hidden_size, t.dtype, t.device)

    def passes(self, batch: int, context: int, exit_layer: int, k: int):
        """The CPU decoder's one-call target pass (csrc/cpu/target_pass.cpp), as its decode loop runs it: over k = 1
        token from the rows' tokens (a plain step: embedding, every layer, final norm, the screened head, the greedy
        choice and commit) or over k stacked exit states at ``context`` cached tokens (a verification of k - 1
        drafts: layers exit_layer..N-1, the screened head, acceptance and commit). Each call first puts the rows
        back (position ``context``, nothing generated). None where the decoder would not take the one-call pass."""
        made = self._decoder_state(batch, context, exit_layer, max(k - 1, 1))
        if made is None:
            return None
        decoder, state, chain = made
        t = self.target
        chain.exits.copy_(torch.randn(chain.exits.shape, dtype=torch.float32).to(t.dtype))
        chain.drafts.copy_(torch.randint(0, t.config.vocab_size, chain.drafts.shape))
        chain.n_drafts.fill_(k - 1)
        rows = (state.pos, state.n_gen, state.finished)

        def reset():
            for x, v in zip(rows, (context, 0, False)):
                x.fill_(v)

        def step():
            reset()
            return decoder._cpu_pass(state, None if k == 1 else chain, k - 1, context + k)

        reset()
        if step() is None:
            print(f"{NAME}: the one-call target pass did not serve over {k} token(s); no pass rows")
            return None
        start = 0 if k == 1 else exit_layer
        n = t.num_layers - start
        head = param_bytes(t.norm) + t.lm_head.weight.numel()  # the screen reads the head's int8 copy
        return step, sum(self.layer_bytes[start:]) + head + self._kv(n, batch, context, k)

    def chain(self, batch: int, context: int, exit_layer: int, gamma: int):
        """The CPU decoder's one-call draft chain of ``gamma`` greedy drafts (eta 0) and the shallow step after them,
        at ``context`` cached tokens, over the decoder's own caches (see :meth:`_decoder_state`). None where the
        decoder would draft step by step instead (no CPU extension, a CUDA device)."""
        made = self._decoder_state(batch, context, exit_layer, gamma)
        if made is None:
            return None
        decoder, state, chain = made
        k = decoder._cpu_chain(state, chain, gamma, 0.0, context + 1)
        if k != gamma:
            print(f"{NAME}: the one-call draft chain did not serve (drafts: {k}, wanted {gamma}); the model falls back "
                  "to the draft and shallow rows, driven from Python")
            return None

        def step():
            return decoder._cpu_chain(state, chain, gamma, 0.0, context + 1)

        return step, (gamma * self.draft_bytes(batch, context, exit_layer)
                      + self.draft_bytes(batch, context, exit_layer, with_adapter=False))

    def verify(self, batch: int, context: int, exit_layer: int, k: int):
        t = self.target
        _, pos = self._inputs(batch, context, k)
        states = torch.randn(batch, k, t.config.hidden_size, device=t.device, dtype=t.dtype)  # (B, k, D)
        rope = t.rope(pos)

        def step():
            h = t.forward_layers(states, pos, exit_layer, t.num_layers, self.cache, kv_len=context + k, rope=rope)
            return greedy_tokens(t.head(h))

        n = t.num_layers - exit_layer
        return step, sum(self.layer_bytes[exit_layer:]) + self.head_bytes + self._kv(n, batch, context, k)


def measure_shape(name: str, config: ModelConfig, verify_exit: int, args: argparse.Namespace, device: torch.device,
                  dtype: torch.dtype, bandwidth_gbs: float, smoke: bool = False) -> List[Dict]:
    """Draft and shallow steps at every exit layer of ``args``; verify steps at ``verify_exit`` (the paper's)."""
    target, adapter = random_model(config, dtype, device)
    exits = sorted({l for l in args.exit_layers if l < config.num_hidden_layers} | {verify_exit})
    steps = Steps(target, adapter, max(args.batches), max(args.contexts) + max(args.verify_tokens) + 1)
    rows: List[Dict] = []
    use_graphs = device.type == "cuda" and not args.no_graphs
    read_probe = (kb.cpu_read_probe(READ_PROBE_BYTES_SMOKE if smoke else READ_PROBE_BYTES) if device.type == "cpu"
                  else None)
    print(f"\n{name}: {config.num_hidden_layers} layers, d {config.hidden_size}, vocab {config.vocab_size}, "
          f"{sum(steps.layer_bytes) / 1e9:.2f} GB of layer weights ({dtype})")
    print(f"{'step':<14} {'B':>3} {'ctx':>5} {'eager ms':>9} {'graph ms':>9} {'floor ms':>9} {'% of floor':>10}")
    with torch.no_grad():
        for batch in args.batches:
            for context in args.contexts:
                cases = [("plain", None, 1, steps.plain(batch, context))]
                if device.type == "cpu" and _cpu_ext.is_available():
                    cases.append(("plain_per_op", None, 1, steps.plain_per_op(batch, context)))
                cases += [(f"draft@{l}", l, 1, steps.draft(batch, context, l)) for l in exits]
                cases += [(f"draftK{k}@{verify_exit}", verify_exit, 1,
                           steps.draft(batch, context, verify_exit, draft_vocab=k))
                          for k in args.draft_vocab if k < config.vocab_size]
                cases += [(f"shallow@{l}", l, 1, steps.draft(batch, context, l, with_adapter=False)) for l in exits]
                cases += [(f"verify@{verify_exit}/{k}", verify_exit, k, steps.verify(batch, context, verify_exit, k))
                          for k in args.verify_tokens]
                for k in [1] + sorted(args.verify_tokens):  # the decode loop's one-call passes
                    made = steps.passes(batch, context, verify_exit, k)
                    if made is not None:
                        cases.append(("pass" if k == 1 else f"vpass@{verify_exit}/{k}", verify_exit, k, made))
                for g in sorted({k - 1 for k in args.verify_tokens if k >= 2}):
                    chain = steps.chain(batch, context, verify_exit, g)
                    if chain is not None:
                        cases.append((f"chain@{verify_exit}/{g}", verify_exit, g, chain))
                group_bandwidth = bandwidth_gbs
                if read_probe is not None:  # the read probe in turns with the steps: the floor of the same seconds
                    probe, probe_bytes = read_probe
                    fns = [fn for _, _, _, (fn, _) in cases]
                    # after the plain step, so that the plain step still follows the last verify step, as before
                    eagers = interleaved_cpu_ms(fns[:1] + [probe] + fns[1:], args.cpu_repeats)
                    probe_ms = eagers.pop(1)
                    group_bandwidth = probe_bytes / (probe_ms / 1e3) / 1e9
                    print(f"(DRAM read bandwidth timed in turns with these steps: {group_bandwidth:.1f} GB/s, "
                          "torch.sum, median)")
                else:
                    eagers = [None] * len(cases)
                for (label, exit_layer, q, (fn, nbytes)), eager in zip(cases, eagers):
                    if eager is None:
                        eager = time_ms(fn, device, args.cpu_repeats)
                    graph, graph_error = None, None
                    if use_graphs:
                        try:
                            graph = graph_ms(fn, device)
                        except Exception as e:  # a step that cannot be captured is reported, not fatal
                            graph_error = f"{type(e).__name__}: {e}"
                    best = min(t for t in (eager, graph) if t is not None)
                    floor = nbytes / (group_bandwidth * 1e9) * 1e3
                    kind = label.split("@")[0]
                    vocab = int(kind[len("draftK"):]) if kind.startswith("draftK") else None
                    rows.append({"shape": name, "step": "draft_vocab" if vocab else kind, "draft_vocab": vocab,
                                 "exit_layer": exit_layer, "tokens": q,
                                 "batch": batch, "context": context, "eager_ms": eager, "graph_ms": graph,
                                 "graph_error": graph_error, "bytes": nbytes, "floor_ms": floor,
                                 "floor_bandwidth_gbs": group_bandwidth if read_probe is not None else None,
                                 "fraction_of_floor": floor / best})
                    print(f"{label:<14} {batch:>3} {context:>5} {eager:>9.3f} "
                          f"{'-' if graph is None else f'{graph:.3f}':>9} {floor:>9.3f} {100 * floor / best:>9.1f}%")
    return rows


# ------------------------------------------------------------------------------------------- model of speedup

def expected_tokens(profile: Sequence[float], gamma: int) -> float:
    """1 + sum_{i<=gamma} prod_{j<=i} a_j; positions past the profile reuse its last value."""
    total, run = 1.0, 1.0
    for i in range(gamma):
        run *= profile[min(i, len(profile) - 1)]
        total += run
    return total


def modeled_speedups(rows: List[Dict], profiles: Dict[str, List[float]], exit_layers: Dict[str, int]) -> List[Dict]:
    """Best-gamma modeled speedup per (shape, batch, context, profile) from the measured step times."""
    def best_ms(r: Dict) -> float:
        return min(t for t in (r["eager_ms"], r["graph_ms"]) if t is not None)

    table = {(r["shape"], r["step"], r["exit_layer"], r["tokens"], r["batch"], r["context"]): best_ms(r) for r in rows
             if r["step"] != "draft_vocab"}
    out = []
    for (shape, step, _, _, batch, context), plain in sorted(table.items()):
        if step != "plain":
            continue
        l = exit_layers[shape]
        draft, shallow = table.get((shape, "draft", l, 1, batch, context)), table.get((shape, "shallow", l, 1, batch, context))
        for pname, profile in profiles.items():
            best = None
            for k in sorted({key[3] for key in table if key[0] == shape and key[1] == "verify"}):
                verify = table.get((shape, "verify", l, k, batch, context))
                gamma = k - 1
                chain = table.get((shape, "chain", l, gamma, batch, context))
                if verify is None or (chain is None and None in (draft, shallow)):
                    continue
                drafting = chain if chain is not None else gamma * draft + shallow
                tokens = expected_tokens(profile, gamma)
                speedup = tokens * plain / (drafting + verify)
                if best is None or speedup > best["speedup"]:
                    best = {"shape": shape, "batch": batch, "context": context, "exit_layer": l, "profile": pname,
                            "gamma": gamma, "expected_tokens_per_round": tokens, "speedup": speedup,
                            "drafts": "one-call chain" if chain is not None else "draft and shallow steps"}
            if best is not None:
                out.append(best)
    return out


def find_profile(path: Optional[str]) -> Tuple[Optional[List[float]], Optional[str]]:
    """The embedded model's measured acceptance by position from a results JSON (newest non-smoke)."""
    if path:
        candidates = [path]
    else:
        folder = os.path.join(ROOT, "benchmarks", "results")
        candidates = [p for p in glob.glob(os.path.join(folder, "**", "*.json"), recursive=True)
                      if os.path.basename(p).startswith(("spec_bench-", "bench_embedded"))]
    found = []
    for p in candidates:
        try:
            with open(p) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError):
            continue
        if data.get("smoke_run") or (data.get("benchmark") == "spec_bench" and not data.get("embedded_model")):
            continue
        acc = data.get("acceptance_by_position") or data.get("results", {}).get("overall", {}).get(
            "kangaroo", {}).get("acceptance_by_position")
        if acc and all(a is not None for a in acc):
            found.append((data.get("date", ""), p, acc))
    if not found:
        return None, None
    _, p, acc = max(found)
    return acc, p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"{NAME}: --device cuda but no CUDA device is available")
    smoke = args.smoke or (args.device is None and not torch.cuda.is_available())
    if smoke:
        print(f"{NAME}: {'--smoke' if args.smoke else 'no CUDA device'}: tiny shape on the CPU in fp32; "
              "the numbers only show that the script works (7B/13B shapes need a GPU)")
        device, dtype = torch.device("cpu"), torch.float32
        shapes = {"smoke": SMOKE_SHAPE}
        args.batches, args.contexts, args.exit_layers, args.verify_tokens = [1, 2], [32], [1, 2], [2, 3]
        args.draft_vocab = [64]
        bandwidth = cpu_copy_bandwidth_gbs()
        device_name = "cpu"
    elif args.device == "cpu":
        from kangaroo_rt.bench import device_name as describe

        device, dtype = torch.device("cpu"), getattr(torch, args.dtype or "float32")
        shapes = {s: SHAPES[s] for s in args.shapes}
        bandwidth = cpu_copy_bandwidth_gbs()
        device_name = describe(device)
    else:
        device, dtype = torch.device("cuda"), getattr(torch, args.dtype or "float16")
        shapes = {s: SHAPES[s] for s in args.shapes}
        bandwidth = kb.copy_bandwidth_gbs(device, smoke=False)
        device_name = torch.cuda.get_device_name(device)
    print(f"{NAME}: {device_name}, measured copy bandwidth {bandwidth:.1f} GB/s (read + write); "
          f"ops {sorted(set(ops.backend_table(device).values()))}")
    profiles = {f"constant {a}": [a] for a in CONSTANT_PROFILES}
    if args.acceptance:
        profiles["--acceptance"] = args.acceptance
    embedded, source = find_profile(args.profile_from)
    if embedded:
        profiles["embedded model (measured)"] = embedded
    else:
        print("no measured embedded-model acceptance profile found (run spec_bench on the embedded model first)")
    exit_layers = {n: e for n, (_, e) in shapes.items()}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{NAME}{'-smoke' if smoke else ''}.json")
    rows: List[Dict] = []

    def save(complete: bool) -> List[Dict]:
        """Write the JSON of the rows so far (after every shape: a run stopped at its time limit keeps them)."""
        model = modeled_speedups(rows, profiles, exit_layers)
        result = {"benchmark": NAME, "smoke_run": smoke, "device": device_name,
                  "dtype": str(dtype).replace("torch.", ""), "complete": complete,
                  "date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
                  "copy_bandwidth_gbs": bandwidth, "ops_backends": ops.backend_table(device), "rows": rows,
                  "profiles": profiles, "embedded_profile_source": source, "modeled_speedup": model}
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
        return model

    for name, (config, exit_layer) in shapes.items():
        rows += measure_shape(name, config, exit_layer, args, device, dtype, bandwidth, smoke)
        if device.type == "cuda":  # the shape's weights and caches are gone with measure_shape's frame
            torch.cuda.empty_cache()
        save(complete=False)
    model = save(complete=True)
    print("\nmodeled Kangaroo speedup over plain decoding (best gamma, fixed-length drafts):")
    print(f"{'shape':<6} {'B':>3} {'ctx':>5} {'profile':<28} {'gamma':>5} {'tok/round':>9} {'speedup':>8}  drafts")
    for m in model:
        print(f"{m['shape']:<6} {m['batch']:>3} {m['context']:>5} {m['profile']:<28} {m['gamma']:>5} "
              f"{m['expected_tokens_per_round']:>9.2f} {m['speedup']:>7.2f}x  {m['drafts']}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
