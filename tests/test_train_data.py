"""kangaroo_rt.train.data: formats, templates and loss masks, malformed records, truncation, packing."""
import json
from typing import List

import pytest

from kangaroo_rt.train.data import (VICUNA_SYSTEM, DataReport, Example, load_examples, pack_examples, read_records,
                                    vicuna_prompt_segments)

from tiny_tokenizer import CORPUS, CHAT_TEMPLATE, make_tokenizer  # noqa: F401


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def chat_tok():
    return make_tokenizer(CHAT_TEMPLATE)


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def conv(*turns):
    """conv(("human", "hi"), ("gpt", "hello")) -> a ShareGPT record."""
    return {"conversations": [{"from": f, "value": v} for f, v in turns]}


def masked_runs(tokenizer, ex: Example) -> List[str]:
    """Decoded text of each maximal run of loss_mask == 1."""
    runs, cur = [], []
    for i, m in zip(ex.input_ids, ex.loss_mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tokenizer.decode(r) for r in runs]


def unmasked_text(tokenizer, ex: Example) -> str:
    return tokenizer.decode([i for i, m in zip(ex.input_ids, ex.loss_mask) if not m])


TWO_TURNS = conv(("human", "what is the capital of France?"), ("gpt", "Paris is the capital of France."),
                 ("human", "tell me a joke"), ("gpt", "the lazy dog jumps over the fox."))


# ------------------------------------------------------------------------------------------------- vicuna

def test_vicuna_prompt_text_follows_fastchat_v1_1():
    segs = vicuna_prompt_segments(TWO_TURNS["conversations"])
    assert "".join(s for s, _ in segs) == (
        VICUNA_SYSTEM + " USER: what is the capital of France? ASSISTANT: Paris is the capital of France.</s>"
        "USER: tell me a joke ASSISTANT: the lazy dog jumps over the fox.</s>")
    assert [s for s, a in segs if a] == ["Paris is the capital of France.</s>", "the lazy dog jumps over the fox.</s>"]
    own = vicuna_prompt_segments([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                                  {"role": "assistant", "content": "hello"}], system_prompt="ignored", eos="<e>")
    assert "".join(s for s, _ in own) == "Be brief. USER: hi ASSISTANT: hello<e>"
    assert vicuna_prompt_segments([("user", "a"), ("assistant", "b")], system_prompt="S")[0] == ("S ", False)


def test_vicuna_masks_are_exactly_the_replies_plus_eos(tmp_path, tok):
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps([TWO_TURNS]))
    examples, report = load_examples(path, tok, template="vicuna")
    assert (report.records, report.examples, report.skipped, report.truncated) == (1, 1, {}, 0)
    ex = examples[0]
    assert len(ex.input_ids) == len(ex.loss_mask) == report.tokens
    assert ex.input_ids[0] == tok.bos_token_id and ex.loss_mask[0] == 0
    assert [r.strip() for r in masked_runs(tok, ex)] == ["Paris is the capital of France.</s>",
                                                       "the lazy dog jumps over the fox.</s>"]
    assert sum(1 for i, m in zip(ex.input_ids, ex.loss_mask) if m and i == tok.eos_token_id) == 2
    prompt = unmasked_text(tok, ex)
    assert VICUNA_SYSTEM in prompt and "USER: tell me a joke" in prompt and prompt.count("ASSISTANT:") == 2
    # the example is the tokenisation of the whole prompt, as the model sees it at inference
    full = "".join(s for s, _ in vicuna_prompt_segments(TWO_TURNS["conversations"]))
    assert ex.input_ids == tok(full)["input_ids"]


def test_openai_messages_jsonl_and_system_prompt(tmp_path, tok):
    rows = [{"messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hello"},
                          {"role": "assistant", "content": "hi there"}]},
            conv(("user", "tell me a joke"), ("assistant", "no"))]
    examples, report = load_examples(write_jsonl(tmp_path / "d.jsonl", rows), tok, template="vicuna",
                                     system_prompt="Custom system.")
    assert report.examples == 2
    assert unmasked_text(tok, examples[0]).startswith("<s>You are terse. USER: hello")
    assert unmasked_text(tok, examples[1]).startswith("<s>Custom system. USER: tell me a joke")
    assert [r.strip() for r in masked_runs(tok, examples[0])] == ["hi there</s>"]
    assert [r.strip() for r in masked_runs(tok, examples[1])] == ["no</s>"]


def test_leading_assistant_and_trailing_user_turns_are_dropped(tmp_path, tok):
    row = conv(("gpt", "stray greeting"), ("human", "hello"), ("gpt", "hi"), ("human", "unanswered"))
    (ex,), _ = load_examples(write_jsonl(tmp_path / "d.jsonl", [row]), tok, template="vicuna")
    text = tok.decode(ex.input_ids)
    assert "stray" not in text and "unanswered" not in text
    assert [r.strip() for r in masked_runs(tok, ex)] == ["hi</s>"]


def test_template_none_joins_turns_with_newlines(tmp_path, tok):
    (ex,), _ = load_examples(write_jsonl(tmp_path / "d.jsonl", [TWO_TURNS]), tok, template="none")
    assert tok.decode(ex.input_ids) == ("<s>what is the capital of France?\nParis is the capital of France.\n"
                                        "tell me a joke\nthe lazy dog jumps over the fox.")
    assert [r.strip() for r in masked_runs(tok, ex)] == ["Paris is the capital of France.",
                                                       "the lazy dog jumps over the fox."]


# ------------------------------------------------------------------------------------------ chat template

def test_chat_template_masks_assistant_content_and_end_of_turn(tmp_path, chat_tok):
    path = write_jsonl(tmp_path / "d.jsonl", [TWO_TURNS])
    (ex,), report = load_examples(path, chat_tok)  # auto -> the tokenizer's chat_template
    rendered = chat_tok.apply_chat_template(
        [{"role": "user" if m["from"] == "human" else "assistant", "content": m["value"]}
         for m in TWO_TURNS["conversations"]], tokenize=False)
    assert ex.input_ids == chat_tok(rendered, add_special_tokens=False)["input_ids"]
    assert ex.input_ids[0] == chat_tok.bos_token_id and ex.input_ids[1] != chat_tok.bos_token_id  # no double bos
    assert [r.strip() for r in masked_runs(chat_tok, ex)] == ["Paris is the capital of France.</s>",
                                                            "the lazy dog jumps over the fox.</s>"]
    prompt = unmasked_text(chat_tok, ex)
    assert prompt.count("<|assistant|>") == 2 and "<|user|>\ntell me a joke</s>" in prompt
    # system_prompt is passed to the template as a system message
    (ex2,), _ = load_examples(path, chat_tok, template="chat_template", system_prompt="Be nice.")
    assert chat_tok.decode(ex2.input_ids).startswith("<s><|system|>\nBe nice.</s>")
    assert masked_runs(chat_tok, ex2) == masked_runs(chat_tok, ex)


def test_auto_template_choice_and_bad_template_arguments(tmp_path, tok, chat_tok):
    path = write_jsonl(tmp_path / "d.jsonl", [TWO_TURNS])
    (ex,), _ = load_examples(path, tok, template="auto")  # no chat_template -> vicuna
    assert VICUNA_SYSTEM in tok.decode(ex.input_ids)
    (ex,), _ = load_examples(path, chat_tok, template="vicuna")  # explicit vicuna wins over the tokenizer's
    assert VICUNA_SYSTEM in chat_tok.decode(ex.input_ids)
    with pytest.raises(ValueError, match="no chat_template"):
        load_examples(path, tok, template="chat_template")
    with pytest.raises(ValueError, match="template must be one of"):
        load_examples(path, tok, template="llama")
    with pytest.raises(ValueError, match="max_length"):
        load_examples(path, tok, max_length=1)


def test_chat_template_that_rejects_a_conversation_is_counted(tmp_path):
    strict = make_tokenizer("{% for m in messages %}{% if m['role'] == 'system' %}"
                            "{{ raise_exception('no system role') }}{% endif %}{{ m['content'] }}</s>{% endfor %}")
    rows = [TWO_TURNS, {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
                                     {"role": "assistant", "content": "b"}]}]
    examples, report = load_examples(write_jsonl(tmp_path / "d.jsonl", rows), strict)
    assert report.examples == 1 and report.skipped == {"chat template error (TemplateError)": 1}


# ------------------------------------------------------------------------------------------ plain text

def test_plain_text_jsonl_all_tokens_but_bos_are_trained(tmp_path, tok):
    rows = [{"text": "the quick brown fox jumps over the lazy dog."}, json.dumps("a bare json string record")]
    examples, report = load_examples(write_jsonl(tmp_path / "t.jsonl", rows), tok)
    assert report.examples == 2 and report.skipped == {}
    for ex, text in zip(examples, ["the quick brown fox jumps over the lazy dog.", "a bare json string record"]):
        assert ex.input_ids[0] == tok.bos_token_id
        assert ex.loss_mask == [0] + [1] * (len(ex.input_ids) - 1)
        assert tok.decode(ex.input_ids[1:]) == text


def test_raw_text_file_split_into_paragraph_chunks(tmp_path, tok):
    paragraphs = ["the quick brown fox.\njumps over the lazy dog.", "tell me a joke about cats.",
                  "what is the capital of France?"]
    path = tmp_path / "book.txt"
    path.write_text("\n\n\n".join(paragraphs) + "\n")
    records = list(read_records(path, chunk_chars=50))  # each paragraph fits, no two together do
    assert records == [(p, None) for p in paragraphs]
    assert list(read_records(path)) == [("\n\n".join(paragraphs), None)]
    long_para = tmp_path / "long.md"
    long_para.write_text("word " * 50)
    chunks = [r for r, _ in read_records(long_para, chunk_chars=40)]
    assert len(chunks) > 1 and all(len(c) <= 40 for c in chunks) and " ".join(chunks).split() == ["word"] * 50
    examples, report = load_examples(path, tok, chunk_chars=50)
    assert report.records == report.examples == 3
    assert [tok.decode(e.input_ids[1:]) for e in examples] == paragraphs
    assert all(e.loss_mask == [0] + [1] * (len(e) - 1) for e in examples)


def test_json_file_holding_jsonl_and_folders(tmp_path, tok):
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "a.json", [TWO_TURNS, "{broken"])  # JSONL content under a .json name
    (folder / "b.json").write_text(json.dumps({"text": "one record as a dict"}))
    examples, report = load_examples(folder, tok)
    assert (report.records, report.examples, report.skipped) == (3, 2, {"invalid json": 1})
    assert tok.decode(examples[1].input_ids[1:]) == "one record as a dict"


# --------------------------------------------------------------------------------------------- malformed

def test_malformed_records_counted_by_reason(tmp_path, tok):
    rows = [
        TWO_TURNS,
        '{"conversations": [{"from": "human", "value": "hi"}',            # invalid JSON line
        {"id": 3, "foo": "bar"},                                           # no conversations
        {"conversations": []},                                             # no conversations
        conv(("human", "hi"), ("robot", "beep")),                          # unknown role
        conv(("human", "hi"), ("gpt", "   ")),                             # empty assistant turn
        conv(("human", ""), ("gpt", "hello")),                             # empty human turn
        {"conversations": [{"from": "human", "value": 7}, {"from": "gpt", "value": "x"}]},  # non-string value
        42,                                                                # not a dict
        conv(("human", "hi"), ("human", "anyone?")),                       # nothing to learn
        {"text": ""},                                                      # empty text
        "",                                                                # blank line: not a record
    ]
    examples, report = load_examples(write_jsonl(tmp_path / "bad.jsonl", rows), tok, template="vicuna")
    assert report.records == 11 and report.examples == len(examples) == 1
    assert report.skipped == {"invalid json": 1, "no conversations": 2, "bad role": 1, "empty": 3,
                              "bad message": 1, "not a dict": 1, "no assistant tokens": 1}
    assert report.records == report.examples + sum(report.skipped.values())  # nothing vanishes silently
    line = str(report)
    assert "\n" not in line and "11 records -> 1 examples" in line and "invalid json: 1" in line
    assert "record 1: invalid json" in line


def test_missing_file_raises_file_not_found(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_examples(tmp_path / "nope.jsonl", tok)
    with pytest.raises(FileNotFoundError):
        list(read_records(str(tmp_path / "nope.txt")))


def test_file_with_nothing_usable_raises_value_error_with_report(tmp_path, tok):
    path = write_jsonl(tmp_path / "bad.jsonl", ["{oops", {"conversations": [{"from": "alien", "value": "x"}]}])
    with pytest.raises(ValueError) as err:
        load_examples(path, tok)
    msg = str(err.value)
    assert "no usable training examples" in msg and "2 records -> 0 examples" in msg
    assert "invalid json: 1" in msg and "bad role: 1" in msg
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    with pytest.raises(ValueError, match="0 records"):
        load_examples(empty, tok)


# ------------------------------------------------------------------------------------- truncation, packing

def test_truncation_is_counted_and_keeps_masks_aligned(tmp_path, tok):
    text = "the quick brown fox jumps over the lazy dog. " * 4
    rows = [{"text": text}, {"text": "hi"}, conv(("human", "hi"), ("gpt", text))]
    examples, report = load_examples(write_jsonl(tmp_path / "d.jsonl", rows), tok, max_length=8, template="none")
    assert report.truncated == 2  # the long text and the conversation; "hi" fits
    assert [len(e) for e in examples] == [8, len(tok("hi")["input_ids"]), 8]
    assert all(len(e.input_ids) == len(e.loss_mask) for e in examples)
    assert examples[0].input_ids == tok(text)["input_ids"][:8]
    assert examples[2].input_ids == tok("hi\n" + text)["input_ids"][:8] and examples[2].loss_mask[:3] == [0, 0, 0]
    # a conversation whose reply lies past max_length has nothing left to learn: skipped, not kept
    examples, report = load_examples(write_jsonl(tmp_path / "v.jsonl", [TWO_TURNS, {"text": text}]), tok,
                                     max_length=8, template="vicuna")
    assert report.skipped == {"no assistant tokens": 1} and report.truncated == 2 and report.examples == 1


def test_packing_makes_full_chunks_with_eos_separators(tmp_path, tok):
    rows = [{"text": "the quick brown fox"}, {"text": "jumps over the lazy dog."},
            conv(("human", "hi"), ("gpt", "Paris is the capital of France.")),
            {"text": "tell me a joke about cats."}, {"text": "what is the capital of France?"}, {"text": "Paris"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    singles, _ = load_examples(path, tok, template="vicuna", system_prompt="S")
    assert singles[2].input_ids[-1] == tok.eos_token_id
    packed, report = load_examples(path, tok, max_length=16, template="vicuna", system_prompt="S", packing=True)
    # the expected stream: an eos between examples, except after one already ending with eos
    ids, mask = [], []
    for k, e in enumerate(singles):
        if k and ids[-1] != tok.eos_token_id:
            ids, mask = ids + [tok.eos_token_id], mask + [0]
        ids, mask = ids + e.input_ids, mask + [0] + e.loss_mask[1:]
    n = len(ids) - (len(ids) % 16 if len(ids) % 16 < 2 else 0)
    assert len(ids) % 16 >= 2 and len(ids) > 32  # a real partial last chunk and several full ones
    assert all(len(e) == 16 for e in packed[:-1]) and len(packed[-1]) == len(ids) % 16
    assert [i for e in packed for i in e.input_ids] == ids[:n]
    assert [m for e in packed for m in e.loss_mask] == mask[:n]
    assert all(len(e.input_ids) == len(e.loss_mask) for e in packed)
    assert (report.examples, report.tokens, report.truncated, report.skipped) == (len(packed), n, 0, {})
    joined = Example([i for e in packed for i in e.input_ids], [m for e in packed for m in e.loss_mask])
    assert "Paris is the capital of France.</s>" in [r.strip() for r in masked_runs(tok, joined)]


def test_pack_examples_edge_cases():
    exs = [Example([1, 5, 6, 7], [0, 1, 1, 1]), Example([1, 8, 9], [0, 1, 1])]
    packed = pack_examples(exs, 4, eos_token_id=2)
    assert [e.input_ids for e in packed] == [[1, 5, 6, 7], [2, 1, 8, 9]]
    assert [e.loss_mask for e in packed] == [[0, 1, 1, 1], [0, 0, 1, 1]]
    # the first token of each example is never trained (its context is another example)
    assert pack_examples([Example([5, 6], [1, 1]), Example([7, 8], [1, 1])], 8, 2)[0].loss_mask == [0, 1, 0, 0, 1]
    # a trailing single token is dropped silently (not an example); a chunk with nothing to learn is counted
    report = DataReport()
    packed = pack_examples([Example([1, 5, 6], [0, 1, 1]), Example([1, 7, 8], [0, 1, 1])], 3, 2, report)
    assert [e.input_ids for e in packed] == [[1, 5, 6], [2, 1, 7]] and report.skipped == {}
    packed = pack_examples([Example([1, 5, 6], [0, 1, 1]), Example([1, 3], [0, 0])], 3, 2, report)
    assert [e.input_ids for e in packed] == [[1, 5, 6]] and report.skipped == {"packed chunk without loss tokens": 1}
    # an example already ending with eos gets no second separator
    assert pack_examples([Example([1, 5, 2], [0, 1, 1]), Example([1, 6], [0, 1])], 8, 2)[0].input_ids == [1, 5, 2, 1, 6]


def test_tokenizer_without_offsets_is_tokenised_segment_by_segment(tmp_path, tok):
    class NoOffsets:  # a "slow" tokenizer: no offset mapping, segments encoded one by one
        is_fast = False
        eos_token, eos_token_id, chat_template = tok.eos_token, tok.eos_token_id, None

        def __call__(self, text, **kw):
            kw.pop("return_offsets_mapping", None)
            return tok(text, **kw)

    (ex,), report = load_examples(write_jsonl(tmp_path / "d.jsonl", [TWO_TURNS]), NoOffsets())
    assert ex.input_ids[0] == tok.bos_token_id and ex.input_ids.count(tok.bos_token_id) == 1
    assert [r.strip() for r in masked_runs(tok, ex)] == ["Paris is the capital of France.</s>",
                                                       "the lazy dog jumps over the fox.</s>"]
