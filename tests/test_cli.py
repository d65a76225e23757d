"""kangaroo-rt CLI: train-adapter end to end (data report, export that loads strictly), generate, demo."""
import json

import pytest
import torch

import kangaroo_rt as K
from kangaroo_rt.cli import main
from tiny_tokenizer import make_tokenizer

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = make_tokenizer()
    folder = tmp_path_factory.mktemp("target")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, eos_token_id=tok.eos_token_id)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def _conv(human, gpt):
    return {"conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]}


def test_train_adapter_end_to_end(tmp_path, model_dir, capsys):
    data = tmp_path / "data.jsonl"
    rows = [json.dumps(_conv(f"tell me a joke number {i}", "the quick brown fox jumps over the lazy dog")) for i in range(8)]
    rows.insert(3, "{not json")
    rows.insert(5, json.dumps(_conv("hello", "")))
    data.write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    rc = main(["train-adapter", "--model", model_dir, "--data", str(data), "--out", str(out), "--exit-layer", "1",
               "--steps", "6", "--micro-batch", "2", "--lr", "1e-3", "--eval-prompts", "2", "--eval-every", "3",
               "--log-every", "2", "--no-progress", "--template", "vicuna", "--max-length", "512"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "invalid json: 1" in err and "empty: 1" in err
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [m["step"] for m in metrics if "loss" in m] == [2, 4, 6]
    assert [m["step"] for m in metrics if "eval_mat" in m] == [3, 6]
    model = K.KangarooModel.from_pretrained(model_dir, str(out / "adapter"), exit_layer=1)
    ids = torch.tensor([[1, 5, 9, 13]])
    assert torch.equal(model.generate(ids, max_new_tokens=6), model.generate(ids, max_new_tokens=6, kangaroo=None))
    # Re-running resumes from the finished checkpoint: no further steps are logged.
    assert main(["train-adapter", "--model", model_dir, "--data", str(data), "--out", str(out), "--exit-layer", "1",
                 "--steps", "6", "--micro-batch", "2", "--no-progress", "--template", "vicuna"]) == 0
    assert len([json.loads(line) for line in open(out / "metrics.jsonl")]) == len(metrics)


def test_train_adapter_with_offline_dump(tmp_path, model_dir):
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"the lazy dog {i} jumps over the quick fox"}) for i in range(6)))
    out = tmp_path / "run"
    rc = main(["train-adapter", "--model", model_dir, "--data", str(data), "--out", str(out), "--exit-layer", "2",
               "--steps", "3", "--micro-batch", "2", "--dump", str(tmp_path / "dump"), "--no-progress",
               "--eval-prompts", "1"])
    assert rc == 0 and (tmp_path / "dump" / "index.json").is_file()
    K.Adapter.from_pretrained(str(out / "adapter"), K.load_model(model_dir).config)


def test_train_adapter_nothing_usable(tmp_path, model_dir, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text("{broken\n" + json.dumps({"conversations": []}) + "\n")
    rc = main(["train-adapter", "--model", model_dir, "--data", str(data), "--out", str(tmp_path / "r"),
               "--steps", "2", "--no-progress"])
    assert rc == 2
    assert "error" in capsys.readouterr().err


def test_generate_json(tmp_path, model_dir, capsys):
    adapter_dir = tmp_path / "ad"
    K.Adapter.random(K.load_model(model_dir).config).save_pretrained(adapter_dir)
    rc = main(["generate", "--model", model_dir, "--adapter", str(adapter_dir), "--exit-layer", "1",
               "--prompt", "the quick brown", "--max-new-tokens", "5", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["token_ids"]) <= 5 and "mat" in out["stats"]
    plain = main(["generate", "--model", model_dir, "--no-kangaroo", "--prompt", "the quick brown",
                  "--max-new-tokens", "5", "--json"])
    assert plain == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == out["token_ids"]


def test_generate_requires_adapter_or_no_kangaroo(model_dir):
    with pytest.raises(SystemExit, match="--adapter is required"):
        main(["generate", "--model", model_dir, "--prompt", "x"])


def test_demo_runs_and_checks_losslessness(capsys):
    assert main(["demo", "--max-new-tokens", "24"]) == 0
    out = capsys.readouterr().out
    assert "speedup" in out and "identical tokens" in out
