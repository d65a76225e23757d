"""Concurrent load on the OpenAI-compatible server (kangaroo-rt serve) through the official openai client.

Starts ``kangaroo-rt serve`` as a subprocess on a free 127.0.0.1 port (or targets ``--url``), warms it
up, then runs ``--rounds`` rounds of ``--clients`` concurrent clients sending ``--requests`` requests
each (alternating streamed and plain completions and, when the tokenizer has a chat template, chat
completions). Prints throughput, latency and time-to-first-token percentiles, errors, the server's
resident memory (RSS) after warm-up and after each round, and the server's own metrics (MAT, slots
freed); writes JSON to benchmarks/results/ or --out. Requests are greedy, or sampled with ``--temperature`` (and
``--top-p``), each with its index as its seed.
Exit status 1 when any request failed or a slot stayed occupied.

    PYTHONPATH=. python benchmarks/bench_server.py                       # the embedded model
    PYTHONPATH=. python benchmarks/bench_server.py --tiny                # a random tiny model (smoke)
    PYTHONPATH=. python benchmarks/bench_server.py --model M --adapter A --clients 32 --requests 5
    PYTHONPATH=. python benchmarks/bench_server.py --device cuda --dtype float16   # the server on a GPU
    PYTHONPATH=. python benchmarks/bench_server.py --model smollm2 --temperature 0.7 --top-p 0.9    # sampled
"""
# gpu_suite: needs fastapi uvicorn openai
# gpu_suite: gpu-args --device cuda
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PROMPTS = [
    "def read_lines(path):\n",
    "import os\n\n\ndef walk(top):\n    \"\"\"Yield every file under *top*.\"\"\"\n",
    "class Stack:\n    def __init__(self):\n",
    "# Sort a list of numbers\nnumbers = [3, 1, 2]\n",
    "def fibonacci(n):\n    if n < 2:\n",
    "for i in range(10):\n",
    "try:\n    import json\nexcept ImportError:\n",
    "def parse_args(argv=None):\n    parser = argparse.ArgumentParser()\n",
]

TINY_CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "import os\nimport sys\n\nprint(os.getcwd())\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n",
    "for i in range(10):\n    print(i * i)\n",
    "the quick brown fox jumps over the lazy dog",
    "hello world, how are you today? fine, thanks.",
]
TINY_CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                      "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def write_tiny_checkpoint(folder: str, seed: int = 0) -> Dict[str, str]:
    """A random-weight tiny Llama (target folder with tokenizer + adapter folder) for smoke runs and tests.

    The tokenizer is a byte-level BPE trained on a few lines, with a chat template; the target and adapter
    agree often (kangaroo_rt.testing.agreeing_pair) and the target never picks EOS greedily, so that
    greedy completions run to max_tokens. Returns {"model", "adapter", "tokenizer"} paths.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from kangaroo_rt.loading import save_model
    from kangaroo_rt.testing import agreeing_pair, tiny_config

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(TINY_CORPUS, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>")
    tok.chat_template = TINY_CHAT_TEMPLATE
    cfg = tiny_config(vocab_size=len(tok), hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
                      intermediate_size=128, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                      max_position_embeddings=4096)
    target, adapter = agreeing_pair(cfg, exit_layer=2, seed=seed, head_scale=2.0)
    with torch.no_grad():
        target.lm_head.weight[tok.eos_token_id].zero_()
    model_dir, adapter_dir = os.path.join(folder, "target"), os.path.join(folder, "adapter")
    save_model(target, model_dir)
    tok.save_pretrained(model_dir)
    adapter.save_pretrained(adapter_dir)
    return {"model": model_dir, "adapter": adapter_dir, "tokenizer": model_dir}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: Optional[int]) -> Optional[float]:
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def http_get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def wait_healthy(url: str, proc: Optional[subprocess.Popen], timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode} before becoming healthy")
        try:
            if json.loads(http_get(f"{url}/health"))["status"] == "ok":
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"the server at {url} was not healthy within {timeout:.0f} s")


def parse_metrics(text: str) -> Dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def percentiles(values: List[float]) -> Dict[str, Optional[float]]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    v = sorted(values)

    def pick(q: float) -> float:
        return v[min(len(v) - 1, max(0, int(round(q * (len(v) - 1)))))]

    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "mean": statistics.fmean(v)}


async def chat_supported(url: str, model: str, timeout: float) -> bool:
    """Whether the server answers /v1/chat/completions (a tokenizer without a chat template gets a 400)."""
    from openai import AsyncOpenAI, BadRequestError

    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=timeout)
    try:
        await client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=1)
        return True
    except BadRequestError as exc:
        if "chat template" in str(exc):
            return False
        raise
    finally:
        await client.close()


def sampling_kwargs(temperature: float, top_p: Optional[float], i: int) -> Dict[str, Any]:
    """Request i's sampling fields: greedy (temperature 0), or sampled with the seed i (reproducible runs)."""
    if temperature == 0:
        return {"temperature": 0}
    return {"temperature": temperature, "seed": i, **({} if top_p is None else {"top_p": top_p})}


async def one_request(client: Any, model: str, i: int, max_tokens: int, chat_ok: bool = True,
                      sampling: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Request i of a client: alternates completions / chat (when ``chat_ok``) and plain / streamed; ``sampling``:
    the request's temperature (and seed, top_p) fields (None: greedy)."""
    prompt = PROMPTS[i % len(PROMPTS)]
    chat, stream = chat_ok and (i // 2) % 2 == 1, i % 2 == 1
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    fields = sampling or {"temperature": 0}
    if chat:
        kw = dict(model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, **fields)
        if stream:
            async for ch in await client.chat.completions.create(stream=True, stream_options={"include_usage": True},
                                                                 **kw):
                if ch.choices and ch.choices[0].delta.content and ttft is None:
                    ttft = time.perf_counter() - t0
                if ch.usage is not None:
                    tokens = ch.usage.completion_tokens
        else:
            tokens = (await client.chat.completions.create(**kw)).usage.completion_tokens
    else:
        kw = dict(model=model, prompt=prompt, max_tokens=max_tokens, **fields)
        if stream:
            async for ch in await client.completions.create(stream=True, stream_options={"include_usage": True},
                                                            **kw):
                if ch.choices and ch.choices[0].text and ttft is None:
                    ttft = time.perf_counter() - t0
                if ch.usage is not None:
                    tokens = ch.usage.completion_tokens
        else:
            tokens = (await client.completions.create(**kw)).usage.completion_tokens
    return {"latency_s": time.perf_counter() - t0, "ttft_s": ttft, "tokens": tokens, "stream": stream, "chat": chat}


async def run_round(url: str, model: str, clients: int, requests: int, max_tokens: int,
                    timeout: float, chat_ok: bool = True, temperature: float = 0.0,
                    top_p: Optional[float] = None) -> Dict[str, Any]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=timeout)
    results: List[Dict[str, Any]] = []
    errors: List[str] = []

    async def worker(c: int) -> None:
        for r in range(requests):
            try:
                i = c * requests + r
                results.append(await one_request(client, model, i, max_tokens, chat_ok,
                                                 sampling_kwargs(temperature, top_p, i)))
            except Exception as exc:  # noqa: BLE001 - every failure is counted and reported
                errors.append(f"{type(exc).__name__}: {exc}"[:300])

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in range(clients)))
    wall = time.perf_counter() - t0
    await client.close()
    tokens = sum(r["tokens"] for r in results)
    return {
        "requests": len(results) + len(errors), "ok": len(results), "errors": len(errors),
        "error_samples": errors[:5], "wall_s": wall, "requests_per_s": len(results) / wall,
        "tokens": tokens, "tokens_per_s": tokens / wall,
        "latency_s": percentiles([r["latency_s"] for r in results]),
        "ttft_s": percentiles([r["ttft_s"] for r in results if r["ttft_s"] is not None]),
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="an already running server (no subprocess; RSS not measured)")
    p.add_argument("--tiny", action="store_true", help="serve a random-weight tiny model written to a temp folder")
    p.add_argument("--model")
    p.add_argument("--adapter")
    p.add_argument("--tokenizer")
    p.add_argument("--no-kangaroo", action="store_true")
    p.add_argument("--served-model-name", default="kangaroo-rt")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--max-verify-tokens", type=int, help="the server's --max-verify-tokens (default: none)")
    p.add_argument("--threads", type=int, help="server torch threads")
    p.add_argument("--device", default="cpu", help="the server's device (kangaroo-rt serve --device)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="the server's weight dtype")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=5, help="requests per client per round")
    p.add_argument("--rounds", type=int, default=2, help="rounds (RSS is read after each)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0,
                   help="every request's temperature (default 0: greedy); sampled requests carry seed = their index")
    p.add_argument("--top-p", type=float, help="every sampled request's top_p")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request client timeout (s)")
    p.add_argument("--startup-timeout", type=float, default=180.0)
    p.add_argument("--out", help="JSON path, or a folder for bench_server.json "
                   "(default benchmarks/results/bench_server_<time>.json)")
    return p


def _print(result: Dict[str, Any]) -> None:
    print(f"host: {result['host']['cpu']}, {result['host']['cpus']} CPUs, server threads "
          f"{result['host']['server_threads'] or 'default'}")
    print(f"server: {result['server']}   load: {result['clients']} clients x {result['requests_per_client']} "
          f"requests x {len(result['rounds'])} rounds, max_tokens {result['max_tokens']}, "
          + ("greedy" if not result.get("temperature") else
             f"temperature {result['temperature']:g}" + ("" if result.get("top_p") is None
                                                          else f", top-p {result['top_p']:g}")))
    print(f"{'round':>5} {'ok':>5} {'err':>4} {'wall s':>7} {'req/s':>6} {'tok/s':>7} "
          f"{'lat p50':>8} {'p90':>7} {'p99':>7} {'ttft p50':>9} {'p90':>7} {'p99':>7} {'RSS MiB':>8}")
    for i, r in enumerate(result["rounds"]):
        lat, ttft = r["latency_s"], r["ttft_s"]

        def f(x: Optional[float]) -> str:
            return "-" if x is None else f"{x:.3f}"

        rss = result["rss_mib"]["after_rounds"][i]
        print(f"{i + 1:>5} {r['ok']:>5} {r['errors']:>4} {r['wall_s']:>7.2f} {r['requests_per_s']:>6.2f} "
              f"{r['tokens_per_s']:>7.1f} {f(lat['p50']):>8} {f(lat['p90']):>7} {f(lat['p99']):>7} "
              f"{f(ttft['p50']):>9} {f(ttft['p90']):>7} {f(ttft['p99']):>7} "
              f"{'-' if rss is None else f'{rss:.1f}':>8}")
    rss = result["rss_mib"]
    if rss["after_warmup"] is not None:
        print(f"server RSS: {rss['after_warmup']:.1f} MiB after warm-up, "
              f"{' -> '.join(f'{x:.1f}' for x in rss['after_rounds'])} MiB after each round")
    m = result["server_metrics"]
    print(f"server metrics: MAT {m.get('kangaroo_rt_mean_accepted_tokens', 0):.2f}, running "
          f"{m.get('kangaroo_rt_requests_running'):.0f}, waiting {m.get('kangaroo_rt_requests_waiting'):.0f}, "
          f"finished {m.get('kangaroo_rt_requests_finished_total'):.0f}, aborted "
          f"{m.get('kangaroo_rt_requests_aborted_total'):.0f}")
    for r in result["rounds"]:
        for e in r["error_samples"]:
            print(f"error: {e}")


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = build_parser().parse_args(argv)
    proc, tmp, log = None, None, None
    url = args.url
    try:
        if url is None:
            cmd = [sys.executable, "-m", "kangaroo_rt.cli", "serve", "--host", "127.0.0.1", "--log-level", "warning",
                   "--max-batch", str(args.max_batch), "--max-len", str(args.max_len),
                   "--served-model-name", args.served_model_name]
            paths = {"model": args.model, "adapter": args.adapter, "tokenizer": args.tokenizer}
            if args.tiny:
                tmp = tempfile.TemporaryDirectory(prefix="bench_server_")
                paths = write_tiny_checkpoint(tmp.name)
            for key, value in paths.items():
                if value is not None and not (key == "adapter" and args.no_kangaroo):
                    cmd += [f"--{key}", value]
            if args.no_kangaroo:
                cmd.append("--no-kangaroo")
            if args.max_verify_tokens is not None:
                cmd += ["--max-verify-tokens", str(args.max_verify_tokens)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            cmd += ["--device", args.device] + (["--dtype", args.dtype] if args.dtype else [])
            port = free_port()
            cmd += ["--port", str(port)]
            url = f"http://127.0.0.1:{port}"
            log = tempfile.TemporaryFile()
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            wait_healthy(url, proc, args.startup_timeout)
        except RuntimeError:
            if log is not None:
                log.seek(0)
                sys.stderr.write(log.read().decode(errors="replace")[-4000:])
            raise
        pid = proc.pid if proc is not None else None
        chat_ok = asyncio.run(chat_supported(url, args.served_model_name, args.timeout))
        if not chat_ok:
            print("the served tokenizer has no chat template: the load uses /v1/completions only", file=sys.stderr)
        asyncio.run(run_round(url, args.served_model_name, 2, 1, args.max_tokens, args.timeout, chat_ok,
                              args.temperature, args.top_p))  # warm-up
        rss_warm = rss_mib(pid)
        rounds, rss_after = [], []
        for _ in range(args.rounds):
            rounds.append(asyncio.run(run_round(url, args.served_model_name, args.clients, args.requests,
                                                args.max_tokens, args.timeout, chat_ok, args.temperature, args.top_p)))
            rss_after.append(rss_mib(pid))
        metrics = parse_metrics(http_get(f"{url}/metrics"))
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        if tmp is not None:
            tmp.cleanup()
    result = {
        "benchmark": "bench_server",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "host": {"machine": platform.machine(), "cpu": cpu_model(), "cpus": os.cpu_count(),
                 "server_threads": args.threads, "python": platform.python_version()},
        "server_device": None if args.url else args.device, "server_dtype": None if args.url else args.dtype,
        "endpoints": "completions and chat" if chat_ok else "completions (no chat template)",
        "server": url if args.url else ("tiny random model" if args.tiny else (args.model or "embedded model")),
        "mode": "plain" if args.no_kangaroo else "kangaroo",
        "clients": args.clients, "requests_per_client": args.requests, "max_tokens": args.max_tokens,
        "temperature": args.temperature, "top_p": args.top_p,
        "max_batch": args.max_batch, "max_len": args.max_len, "max_verify_tokens": args.max_verify_tokens,
        "rounds": rounds,
        "rss_mib": {"after_warmup": rss_warm, "after_rounds": rss_after},
        "server_metrics": metrics,
    }
    _print(result)
    out = args.out or os.path.join(ROOT, "benchmarks", "results",
                                   f"bench_server_{datetime.datetime.now():%Y%m%d_%H%M%S}.json")
    if os.path.isdir(out):
        out = os.path.join(out, "bench_server.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    res = main()
    failed = sum(r["errors"] for r in res["rounds"]) or res["server_metrics"].get("kangaroo_rt_requests_running", 0)
    sys.exit(1 if failed else 0)
