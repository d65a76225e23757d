"""kangaroo_rt.llama_cpp, the llama.cpp baseline of `kangaroo-rt bench`: GGUFs of the same weights in other
precisions (checked on a tiny GGUF written here), and the bench's methods when llama-cpp-python is missing."""
import numpy as np
import pytest

from kangaroo_rt import bench, llama_cpp

gguf = pytest.importorskip("gguf")


def _tiny_gguf(path):
    """A GGUF with metadata, an array field, a Q8_0 matrix and an F32 norm."""
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_context_length(64)
    writer.add_token_list(["<a>", "<b>", "c"])
    matrix = rng.standard_normal((4, 64)).astype(np.float32)
    writer.add_tensor("blk.0.ffn_down.weight", gguf.quants.quantize(matrix, gguf.GGMLQuantizationType.Q8_0),
                      raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.attn_norm.weight", rng.standard_normal(64).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()


@pytest.mark.parametrize("precision,np_dtype", [("F32", np.float32), ("F16", np.float16), ("BF16", None)])
def test_convert_precision_keeps_the_weights_and_metadata(tmp_path, precision, np_dtype):
    src, out = tmp_path / "tiny.Q8_0.gguf", tmp_path / f"tiny.{precision}.gguf"
    _tiny_gguf(src)
    llama_cpp.convert_precision(str(src), precision, str(out))
    a, b = gguf.GGUFReader(str(src)), gguf.GGUFReader(str(out))
    assert llama_cpp.gguf_quantization(str(src)) == "Q8_0"
    assert llama_cpp.gguf_quantization(str(out)) == precision
    assert b.fields["general.name"].contents() == "tiny"
    assert b.fields["tokenizer.ggml.tokens"].contents() == ["<a>", "<b>", "c"]
    assert b.fields["general.file_type"].contents() == int(getattr(gguf.LlamaFileType,
                                                                   "ALL_F32" if precision == "F32" else
                                                                   f"MOSTLY_{precision}"))
    ta = {t.name: t for t in a.tensors}
    assert {t.name: list(t.shape) for t in b.tensors} == {t.name: list(t.shape) for t in a.tensors}
    for t in b.tensors:
        exact = gguf.quants.dequantize(ta[t.name].data, ta[t.name].tensor_type)
        got = gguf.quants.dequantize(t.data, t.tensor_type)
        if t.name.endswith("norm.weight"):  # 1-d tensors stay F32
            assert t.tensor_type == gguf.GGMLQuantizationType.F32 and np.array_equal(got, exact)
        elif precision == "F32":
            assert np.array_equal(got, exact)
        else:
            rounded = exact.astype(np_dtype).astype(np.float32) if np_dtype is not None else gguf.quants.dequantize(
                gguf.quants.quantize(exact, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16)
            assert np.array_equal(got, rounded)


def test_convert_precision_refuses_unknown_precisions(tmp_path):
    src = tmp_path / "tiny.gguf"
    _tiny_gguf(src)
    with pytest.raises(ValueError, match="precision must be one of"):
        llama_cpp.convert_precision(str(src), "Q4_0", str(tmp_path / "x.gguf"))


def test_bench_methods_say_why_they_cannot_run(monkeypatch):
    monkeypatch.setattr(llama_cpp, "available", lambda: (False, "llama-cpp-python is not installed"))
    methods = llama_cpp.methods("smollm2", ["shipped", "F32"], 2, 256, 8, None, False, bench.Method)
    assert [m.name for m in methods] == ["llama_cpp_shipped", "llama_cpp_f32"]
    assert all(not m.available and "not installed" in m.reason for m in methods)
    with pytest.raises(ValueError, match="precisions are"):
        llama_cpp.methods("smollm2", ["Q4_0"], 2, 256, 8, None, False, bench.Method)


def test_a_llama_cpp_mismatch_is_reported_not_fatal():
    mismatch = [{"question_id": 1, "category": "x", "method": "llama_cpp_q4_1", "first_index": 3,
                 "reference_tokens": 8, "method_tokens": 8}]
    assert bench._verdict(mismatch, [], strict=False) == 0
    assert bench._verdict(mismatch, [], strict=True) == 1
