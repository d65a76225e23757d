"""Bad inputs to generate / KangarooModel / configs / caches fail early with a clear error."""
import time

import pytest
import torch

import kangaroo_rt
from kangaroo_rt import (Adapter, KangarooConfig, KangarooModel, ModelConfig, SamplingConfig, StaticKVCache,
                         Transformer)

VOCAB = 97


def _cfg(**overrides):
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2)
    kw.update(overrides)
    return ModelConfig(**kw)


@pytest.fixture(scope="module")
def target():
    return Transformer.random(_cfg())


@pytest.fixture(scope="module")
def model(target):
    return KangarooModel(target, Adapter.random(target.config), exit_layer=2)


@pytest.fixture(scope="module")
def plain_model(target):
    return KangarooModel(target, None, exit_layer=2)


def _ids(b=1, t=5):
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(0))


def test_valid_call_works(model):
    """The baseline the cases below break one thing of: it must succeed."""
    ids = _ids(2, 5)
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=3, ignore_eos=True)
    assert out.shape == (2, 8)


# -- input_ids ---------------------------------------------------------------------------------------

def test_input_ids_float(model):
    with pytest.raises(ValueError, match=r"integer token ids, got dtype torch\.float32"):
        model.generate(_ids().float(), max_new_tokens=2)


def test_input_ids_bool(model):
    with pytest.raises(ValueError, match=r"integer token ids, got dtype torch\.bool"):
        model.generate(_ids() > 50, max_new_tokens=2)


def test_input_ids_3d(model):
    with pytest.raises(ValueError, match=r"shape \(batch, seq_len\), got \(1, 2, 5\)"):
        model.generate(_ids(2, 5)[None], max_new_tokens=2)


def test_input_ids_empty(model):
    with pytest.raises(ValueError, match=r"empty \(shape \(1, 0\)\)"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=2)


def test_input_ids_not_a_tensor(model):
    with pytest.raises(ValueError, match="input_ids must be a torch.Tensor.*got list"):
        model.generate([[1, 2, 3]], max_new_tokens=2)


def test_token_id_beyond_vocab(model):
    ids = _ids()
    ids[0, 2] = VOCAB
    with pytest.raises(ValueError, match=rf"outside the vocabulary \[0, {VOCAB}\): \[{VOCAB}\]"):
        model.generate(ids, max_new_tokens=2)


def test_negative_token_id(model):
    ids = _ids()
    ids[0, 0] = -3
    with pytest.raises(ValueError, match=r"outside the vocabulary .*\[-3\]"):
        model.generate(ids, max_new_tokens=2)


def test_out_of_vocab_id_under_padding_is_fine(model):
    """Ids under attention_mask == 0 are padding and never embedded, so they are not checked."""
    ids = _ids(1, 4)
    ids[0, 0] = -1
    out = model.generate(ids, attention_mask=torch.tensor([[0, 1, 1, 1]]), max_new_tokens=2, ignore_eos=True)
    assert out.shape == (1, 6)


# -- attention_mask ----------------------------------------------------------------------------------

def test_attention_mask_row_all_zeros(model):
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    with pytest.raises(ValueError, match=r"row\(s\) \[1\] are empty"):
        model.generate(_ids(2, 5), attention_mask=mask, max_new_tokens=2)


def test_attention_mask_not_contiguous(model):
    with pytest.raises(ValueError, match="one contiguous run of tokens per row"):
        model.generate(_ids(1, 3), attention_mask=torch.tensor([[1, 0, 1]]), max_new_tokens=2)


def test_attention_mask_wrong_shape(model):
    with pytest.raises(ValueError, match=r"attention_mask shape \(1, 4\) != input_ids shape \(1, 5\)"):
        model.generate(_ids(1, 5), attention_mask=torch.ones(1, 4, dtype=torch.long), max_new_tokens=2)


def test_attention_mask_not_binary(model):
    with pytest.raises(ValueError, match="only 0 and 1"):
        model.generate(_ids(1, 3), attention_mask=torch.tensor([[1, 2, 1]]), max_new_tokens=2)


# -- lengths and memory ------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_max_new_tokens(model, bad):
    with pytest.raises(ValueError, match=rf"max_new_tokens must be a positive int, got {bad!r}"):
        model.generate(_ids(), max_new_tokens=bad)


def test_fixed_max_len_too_small(target):
    small = KangarooModel(target, Adapter.random(target.config), exit_layer=2, max_len=16)
    with pytest.raises(ValueError, match=r"needs 37 cache positions .*max_len=16"):  # 10 + 20 + gamma 6 + 1
        small.generate(_ids(1, 10), max_new_tokens=20)
    with pytest.raises(ValueError, match=r"needs 31 cache positions .*max_len=16"):  # plain: 10 + 20 + 1
        small.generate(_ids(1, 10), max_new_tokens=20, kangaroo=None)
    assert small.generate(_ids(1, 4), max_new_tokens=4, ignore_eos=True).shape == (1, 8)  # 4 + 4 + 7 fits


def test_max_new_tokens_beyond_memory(target):
    """Without a fixed max_len the cache grows to the request, but never past the free memory."""
    fresh = KangarooModel(target, Adapter.random(target.config), exit_layer=2)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"MiB are free .*lower max_batch or max_len"):
        fresh.generate(_ids(), max_new_tokens=10**12)
    assert time.perf_counter() - start < 1.0
    assert fresh.generate(_ids(), max_new_tokens=2, ignore_eos=True).shape == (1, 7)  # still usable


def test_mistral_beyond_sliding_window():
    mistral = Transformer.random(_cfg(model_type="mistral", sliding_window=12))
    with pytest.raises(ValueError, match="sliding_window is 12"):
        KangarooModel(mistral, None).generate(_ids(1, 5), max_new_tokens=10, kangaroo=None)


@pytest.mark.parametrize("bad", [0, -5, 2.0, True])
def test_kangaroo_model_max_len(target, bad):
    with pytest.raises(ValueError, match="max_len must be a positive int"):
        KangarooModel(target, None, max_len=bad)
    model = KangarooModel(target, None)
    with pytest.raises(ValueError, match="max_len must be a positive int"):
        model.max_len = bad
    model.max_len = 12  # the decoder holds the capacity it enforces
    assert model.decoder.max_len == 12
    with pytest.raises(ValueError, match="needs 14 cache positions but the model's cache holds max_len=12"):
        model.generate(_ids(1, 5), max_new_tokens=8, kangaroo=None)


def test_cache_rows_are_views_of_the_cache():
    cache = StaticKVCache(2, 4, 1, 8, 2)
    rows = cache.rows(1, 3)
    assert (rows.max_batch, rows.max_len, rows.num_layers) == (2, 8, 2)
    rows.layer(1)[0][1].fill_(7.0)  # row 1 of the view is row 2 of the cache
    assert cache.k[1, 2].eq(7.0).all() and cache.k[1, [0, 1, 3]].eq(0.0).all()
    for start, stop in ((3, 5), (2, 2), (-1, 1)):
        with pytest.raises(ValueError, match="outside the cache's 4 rows"):
            cache.rows(start, stop)


def test_cache_larger_than_memory_fails_before_allocating():
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"KV cache of shape \(4, 1000000, 32, 1000000, 128\).*MiB are free"):
        StaticKVCache(4, 10**6, 32, 10**6, 128)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("field", ["num_layers", "max_batch", "kv_heads", "max_len", "head_dim"])
def test_cache_non_positive_sizes(field):
    sizes = dict(num_layers=1, max_batch=1, kv_heads=1, max_len=4, head_dim=8)
    sizes[field] = 0
    with pytest.raises(ValueError, match=rf"StaticKVCache: {field} must be a positive int"):
        StaticKVCache(**sizes)


# -- Kangaroo knobs ----------------------------------------------------------------------------------

@pytest.mark.parametrize("eta", [-0.1, 1.5, float("nan"), "0.5"])
def test_eta(eta):
    with pytest.raises(ValueError, match="eta must be"):
        KangarooConfig(eta=eta)


@pytest.mark.parametrize("gamma", [-1, 1000])
def test_gamma_out_of_range(gamma):
    with pytest.raises(ValueError, match=rf"gamma must be in \[0, 64\], got {gamma}"):
        KangarooConfig(gamma=gamma)


@pytest.mark.parametrize("gamma", [2.0, True])
def test_gamma_not_int(gamma):
    with pytest.raises(ValueError, match="gamma must be an int"):
        KangarooConfig(gamma=gamma)


@pytest.mark.parametrize("exit_layer", [0, 4, 7])
def test_exit_layer_outside_target(target, exit_layer):
    with pytest.raises(ValueError, match=r"exit_layer must be in \[1, 3\] for a 4-layer target"):
        KangarooModel(target, Adapter.random(target.config), exit_layer=exit_layer)


def test_exit_layer_in_kangaroo_config(model):
    with pytest.raises(ValueError, match="exit_layer must be a positive int"):
        KangarooConfig(exit_layer=0)
    with pytest.raises(ValueError, match=r"exit_layer must be in \[1, 3\]"):
        model.generate(_ids(), max_new_tokens=2, kangaroo=KangarooConfig(exit_layer=4))


def test_kangaroo_config_without_adapter(plain_model):
    with pytest.raises(ValueError, match="needs an adapter"):
        plain_model.generate(_ids(), max_new_tokens=2, kangaroo=KangarooConfig(gamma=4))
    # The model's default config falls back to plain decoding, and kangaroo=None is always fine.
    assert plain_model.generate(_ids(), max_new_tokens=2, ignore_eos=True).shape == (1, 7)
    assert plain_model.generate(_ids(), max_new_tokens=2, kangaroo=None, ignore_eos=True).shape == (1, 7)


def test_kangaroo_not_a_config(model):
    with pytest.raises(ValueError, match="kangaroo must be a KangarooConfig or None, got dict"):
        model.generate(_ids(), max_new_tokens=2, kangaroo={"gamma": 4})


# -- sampling ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [-1, float("nan")])
def test_temperature(model, temperature):
    with pytest.raises(ValueError, match="temperature must be a number >= 0"):
        model.generate(_ids(), max_new_tokens=2, do_sample=True, temperature=temperature)


@pytest.mark.parametrize("top_p", [0, 1.5, -0.2])
def test_top_p(model, top_p):
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        model.generate(_ids(), max_new_tokens=2, do_sample=True, top_p=top_p)


@pytest.mark.parametrize("top_k", [0, -3, 2.5])
def test_top_k(model, top_k):
    with pytest.raises(ValueError, match="top_k must be a positive int or None"):
        model.generate(_ids(), max_new_tokens=2, do_sample=True, top_k=top_k)


def test_sampling_config_checks_even_when_greedy():
    """A bad knob is an error even with do_sample=False (transformers only warns; we refuse)."""
    with pytest.raises(ValueError, match="top_k"):
        SamplingConfig(do_sample=False, top_k=0)


# -- streamer, eos, model ----------------------------------------------------------------------------

class _Recorder:
    def __init__(self):
        self.chunks = []

    def put(self, value):
        self.chunks.append(value)

    def end(self):
        pass


def test_streamer_with_batch_2(model):
    streamer = _Recorder()
    with pytest.raises(ValueError, match="batch size 1 only"):
        model.generate(_ids(2, 5), max_new_tokens=2, streamer=streamer)
    assert streamer.chunks == []  # refused before anything was streamed


@pytest.mark.parametrize("eos", [VOCAB, -1, [3, VOCAB + 5]])
def test_eos_outside_vocab(model, eos):
    bad = eos[-1] if isinstance(eos, list) else eos
    with pytest.raises(ValueError, match=rf"eos_token_id {bad} is not a token id in \[0, {VOCAB}\)"):
        model.generate(_ids(), max_new_tokens=2, eos_token_id=eos)


def test_generate_needs_kangaroo_model(target):
    with pytest.raises(ValueError, match="model must be a KangarooModel, got Transformer"):
        kangaroo_rt.generate(target, _ids(), max_new_tokens=2)


def test_kangaroo_model_needs_our_transformer():
    with pytest.raises(ValueError, match="target must be a kangaroo_rt Transformer, got Linear"):
        KangarooModel(torch.nn.Linear(2, 2))


# -- model config ------------------------------------------------------------------------------------

def test_model_config_heads_do_not_divide_hidden():
    with pytest.raises(ValueError, match="hidden_size 65 is not divisible by num_attention_heads 4"):
        _cfg(hidden_size=65)


def test_model_config_kv_heads_do_not_divide_heads():
    with pytest.raises(ValueError, match="must be a multiple of num_key_value_heads 3"):
        _cfg(num_key_value_heads=3)


@pytest.mark.parametrize("field,value", [("vocab_size", 0), ("num_hidden_layers", -1), ("intermediate_size", 1.5)])
def test_model_config_non_positive(field, value):
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field} must be a positive int"):
        _cfg(**{field: value})


def test_model_config_odd_head_dim():
    with pytest.raises(ValueError, match="head_dim must be even"):
        _cfg(head_dim=15)


def test_model_config_unknown_architecture():
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
        _cfg(model_type="gpt2")


def test_model_config_rope_scaling_without_factor():
    with pytest.raises(ValueError, match="needs a 'factor'"):
        _cfg(rope_scaling={"rope_type": "linear"})



def test_free_memory_counts_the_caching_allocators_unused_blocks(monkeypatch):
    """mem_get_info counts blocks torch's allocator reserved but no tensor uses as taken; torch can reuse them."""
    from kangaroo_rt import cache

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (100 * 2**20, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 900 * 2**20)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 300 * 2**20)
    assert cache._free_device_bytes(torch.device("cuda", 0)) == 700 * 2**20
