"""The Kangaroo adapter's official checkpoint format: strict loading, saving, and use with a target."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import kangaroo_rt
from checks import edit_config
from kangaroo_rt import Adapter, KangarooConfig, KangarooModel, ModelConfig, load_model
from kangaroo_rt.adapter import ADAPTER_KEYS

OFFICIAL_KEYS = {
    "norm.weight",
    "layers.0.input_layernorm.weight",
    "layers.0.self_attn.q_proj.weight",
    "layers.0.self_attn.k_proj.weight",
    "layers.0.self_attn.v_proj.weight",
    "layers.0.self_attn.o_proj.weight",
}


def _cfg(**overrides):
    kw = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2)
    kw.update(overrides)
    return ModelConfig(**kw)


def _official_dict(cfg, seed=3):
    """Tensors shaped like the official adapter for a target with config ``cfg``."""
    g = torch.Generator().manual_seed(seed)
    d, hd = cfg.hidden_size, cfg.head_dim
    return {
        "norm.weight": 1 + 0.1 * torch.randn(d, generator=g),
        "layers.0.input_layernorm.weight": 1 + 0.1 * torch.randn(d, generator=g),
        "layers.0.self_attn.q_proj.weight": 0.05 * torch.randn(cfg.num_attention_heads * hd, d, generator=g),
        "layers.0.self_attn.k_proj.weight": 0.05 * torch.randn(cfg.num_key_value_heads * hd, d, generator=g),
        "layers.0.self_attn.v_proj.weight": 0.05 * torch.randn(cfg.num_key_value_heads * hd, d, generator=g),
        "layers.0.self_attn.o_proj.weight": 0.05 * torch.randn(d, cfg.num_attention_heads * hd, generator=g),
    }


def _write_official(folder, cfg, tensors=None, **config_changes):
    """Write a folder like the official repo: LlamaConfig config.json + torch.save'd plain dict."""
    os.makedirs(folder, exist_ok=True)
    LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                num_hidden_layers=1, num_attention_heads=cfg.num_attention_heads,
                num_key_value_heads=cfg.num_key_value_heads).save_pretrained(folder)
    if config_changes:
        edit_config(folder, **config_changes)
    tensors = _official_dict(cfg) if tensors is None else tensors
    torch.save(tensors, os.path.join(folder, "pytorch_model.bin"))
    return tensors




def test_adapter_keys_are_the_official_ones():
    assert set(ADAPTER_KEYS) == OFFICIAL_KEYS and len(ADAPTER_KEYS) == 6
    assert set(Adapter.random(_cfg()).state_dict()) == OFFICIAL_KEYS


@pytest.mark.parametrize("use_safetensors", [False, True])
def test_save_and_load_round_trip(tmp_path, use_safetensors):
    cfg = _cfg()
    adapter = Adapter.random(cfg, seed=7)
    adapter.save_pretrained(tmp_path, safetensors=use_safetensors)
    weight_file = "model.safetensors" if use_safetensors else "pytorch_model.bin"
    assert sorted(os.listdir(tmp_path)) == sorted(["config.json", weight_file])
    if use_safetensors:
        stored = load_file(tmp_path / weight_file)
    else:
        stored = torch.load(tmp_path / weight_file, weights_only=True)
        assert type(stored) is dict
    assert set(stored) == OFFICIAL_KEYS
    with open(tmp_path / "config.json") as f:
        config = json.load(f)
    assert config["num_hidden_layers"] == 1 and config["model_type"] == "llama"
    assert (config["hidden_size"], config["vocab_size"], config["num_key_value_heads"]) == (64, 97, 2)

    loaded = Adapter.from_pretrained(tmp_path, cfg)
    assert set(loaded.state_dict()) == set(ADAPTER_KEYS)
    for key, value in adapter.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert loaded.dtype == torch.float32
    # A different seed gives different tensors, so the equality above is not vacuous.
    other = Adapter.random(cfg, seed=8)
    assert not torch.equal(other.layers[0].self_attn.q_proj.weight, loaded.layers[0].self_attn.q_proj.weight)


def test_saved_config_is_a_llama_config(tmp_path):
    Adapter.random(_cfg()).save_pretrained(tmp_path)
    hf_cfg = LlamaConfig.from_pretrained(tmp_path)
    assert hf_cfg.num_hidden_layers == 1 and hf_cfg.hidden_size == 64 and hf_cfg.vocab_size == 97


def test_official_format_checkpoint_loads(tmp_path):
    cfg = _cfg()
    tensors = _write_official(tmp_path, cfg)
    adapter = Adapter.from_pretrained(tmp_path, cfg)
    assert set(adapter.state_dict()) == OFFICIAL_KEYS
    for key, value in tensors.items():
        assert torch.equal(adapter.state_dict()[key], value), key


def test_official_format_without_kv_heads_field(tmp_path):
    """Older LlamaConfigs (Vicuna) have no num_key_value_heads: it defaults to num_attention_heads."""
    cfg = _cfg(num_key_value_heads=4)
    tensors = _official_dict(cfg)
    os.makedirs(tmp_path, exist_ok=True)
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
                   "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 1,
                   "vocab_size": 97, "rms_norm_eps": 1e-6, "hidden_act": "silu"}, f)
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    adapter = Adapter.from_pretrained(tmp_path, cfg)
    assert torch.equal(adapter.layers[0].self_attn.k_proj.weight, tensors["layers.0.self_attn.k_proj.weight"])
    # The same folder does not fit a GQA target (kv heads 2 vs 4).
    with pytest.raises(ValueError, match="num_key_value_heads"):
        Adapter.from_pretrained(tmp_path, _cfg(num_key_value_heads=2))


def test_load_converts_dtype(tmp_path):
    cfg = _cfg()
    Adapter.random(cfg).save_pretrained(tmp_path)
    adapter = Adapter.from_pretrained(tmp_path, cfg, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in adapter.parameters())


# -- errors ------------------------------------------------------------------------------------------

def test_renamed_key_names_missing_and_unexpected(tmp_path):
    cfg = _cfg()
    tensors = _official_dict(cfg)
    tensors["layers.0.self_attn.qproj.weight"] = tensors.pop("layers.0.self_attn.q_proj.weight")
    _write_official(tmp_path, cfg, tensors)
    with pytest.raises(ValueError) as err:
        Adapter.from_pretrained(tmp_path, cfg)
    msg = str(err.value)
    assert "missing tensors: layers.0.self_attn.q_proj.weight" in msg
    assert "unexpected tensors: layers.0.self_attn.qproj.weight" in msg


def test_prefixed_keys_are_refused(tmp_path):
    """A 'model.'-prefixed dict (a whole LlamaForCausalLM state_dict) is not silently accepted."""
    cfg = _cfg()
    tensors = {f"model.{k}": v for k, v in _official_dict(cfg).items()}
    _write_official(tmp_path, cfg, tensors)
    with pytest.raises(ValueError, match=r"unexpected tensors: model\.layers\.0"):
        Adapter.from_pretrained(tmp_path, cfg)


def test_wrong_shape_is_named(tmp_path):
    cfg = _cfg()
    tensors = _official_dict(cfg)
    tensors["layers.0.self_attn.v_proj.weight"] = torch.zeros(64, 64)
    _write_official(tmp_path, cfg, tensors)
    with pytest.raises(ValueError, match=r"mis-shaped tensors: layers\.0\.self_attn\.v_proj\.weight"):
        Adapter.from_pretrained(tmp_path, cfg)


@pytest.mark.parametrize("field,value", [("hidden_size", 128), ("vocab_size", 100), ("num_attention_heads", 8)])
def test_config_for_another_model(tmp_path, field, value):
    cfg = _cfg()
    _write_official(tmp_path, cfg, **{field: value})
    with pytest.raises(ValueError, match=rf"another model: .*{field}: adapter {value}"):
        Adapter.from_pretrained(tmp_path, cfg)


def test_two_layer_config_refused(tmp_path):
    cfg = _cfg()
    _write_official(tmp_path, cfg, num_hidden_layers=2)
    with pytest.raises(ValueError, match="num_hidden_layers=2"):
        Adapter.from_pretrained(tmp_path, cfg)


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Adapter.from_pretrained(tmp_path / "nope", _cfg())


def test_missing_config(tmp_path):
    torch.save(_official_dict(_cfg()), tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Adapter.from_pretrained(tmp_path, _cfg())


def test_missing_weight_file(tmp_path):
    cfg = _cfg()
    _write_official(tmp_path, cfg)
    os.remove(tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match=r"no pytorch_model\.bin or model\.safetensors"):
        Adapter.from_pretrained(tmp_path, cfg)


def test_corrupt_weight_file(tmp_path):
    cfg = _cfg()
    _write_official(tmp_path, cfg)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="weights_only=True"):
        Adapter.from_pretrained(tmp_path, cfg)


# -- with a target -----------------------------------------------------------------------------------

def _peaked_hf_model():
    """A random HF Llama whose logits have clear margins (so greedy comparisons do not hinge on
    fp32 round-off between a 1-token step and a (gamma+1)-token verify)."""
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=97,
                                      eos_token_id=None, bos_token_id=None, pad_token_id=None)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("embed_tokens.weight"):
                p.normal_(0.0, 1.0)
            elif not name.endswith("norm.weight"):
                p.normal_(0.0, 64 ** -0.5)
    return hf


def test_kangaroo_model_from_transformers_and_adapter_folder(tmp_path):
    hf = _peaked_hf_model()
    target_cfg = load_model(hf).config
    Adapter.random(target_cfg, seed=1).save_pretrained(tmp_path)
    model = KangarooModel.from_pretrained(hf, tmp_path, exit_layer=2,
                                          kangaroo=KangarooConfig(gamma=3, eta=0.0))
    assert model.adapter is not None and model.exit_layer == 2
    # Shares the transformers model's weights (same dtype and device).
    assert model.target.embed_tokens.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(2))
    out = model.generate(ids, max_new_tokens=16, return_dict_in_generate=True)
    plain = model.generate(ids, max_new_tokens=16, kangaroo=None)
    assert out.sequences.shape == (1, 22)
    assert torch.equal(out.sequences, plain)
    assert out.rounds[0] > 0 and out.draft_steps[0] >= out.rounds[0]  # Kangaroo really ran (eta=0: always drafts)
    with torch.no_grad():
        hf_out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    assert torch.equal(out.sequences, hf_out)


def test_kangaroo_model_rejects_adapter_for_other_target():
    target = kangaroo_rt.Transformer.random(_cfg())
    other = Adapter.random(_cfg(hidden_size=32, intermediate_size=64))
    with pytest.raises(ValueError, match=r"another model: hidden_size: adapter 32 vs target 64"):
        KangarooModel(target, other, exit_layer=2)
    other_vocab = Adapter.random(_cfg(vocab_size=50))
    with pytest.raises(ValueError, match="vocab_size: adapter 50 vs target 97"):
        KangarooModel(target, other_vocab, exit_layer=2)


def test_kangaroo_model_rejects_adapter_of_another_dtype():
    """A bf16 target with the trainer's fp32 adapter: a clear error naming both and the conversion, not a
    dtype mismatch deep in the first draft step."""
    target = kangaroo_rt.Transformer.random(_cfg()).to(torch.bfloat16)
    adapter = Adapter.random(_cfg())
    with pytest.raises(ValueError, match=r"adapter is torch.float32 on cpu but the target is torch.bfloat16.*adapter.to"):
        KangarooModel(target, adapter, exit_layer=2)
    model = KangarooModel(target, adapter.to(torch.bfloat16), exit_layer=2)
    assert model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4).shape == (1, 7)


def test_from_pretrained_rejects_adapter_folder_for_other_target(tmp_path):
    hf = _peaked_hf_model()
    Adapter.random(_cfg(hidden_size=32, intermediate_size=64)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="hidden_size"):
        KangarooModel.from_pretrained(hf, tmp_path, exit_layer=2)


def test_from_pretrained_rejects_non_adapter():
    with pytest.raises(ValueError, match="adapter must be a folder path or an Adapter"):
        KangarooModel.from_pretrained(_peaked_hf_model(), adapter=123, exit_layer=2)
