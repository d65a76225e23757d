"""Training data for the adapter: read records, apply a chat template, tokenise, mask, truncate, pack.

Accepted inputs (one file, or a folder whose files are all read in name order):

* ShareGPT-style records ``{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}``;
  roles ``user``/``assistant`` and the keys ``role``/``content`` are accepted too, as are OpenAI-style
  records ``{"messages": [{"role": ..., "content": ...}, ...]}``.
* Plain-text records ``{"text": ...}`` (or bare JSON strings).
* ``.json`` (a list of records, or one record), ``.jsonl`` (one record a line; a ``.json`` file that is
  not valid JSON as a whole is read as JSONL), and any other file as raw text, split at blank lines into
  paragraphs that are grouped into chunks of at most ``chunk_chars`` characters.

Each example carries ``loss_mask[t] = 1`` where token ``t`` is one the model should learn to predict:
assistant tokens (and the end-of-turn token that closes each assistant turn) for conversations, every
token but the tokenizer-added ones (the bos) for plain text. Malformed records are skipped and counted
by reason in a :class:`DataReport`; nothing is dropped without being counted.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

__all__ = ["DataReport", "Example", "VICUNA_SYSTEM", "load_examples", "normalize_conversation", "pack_examples",
           "read_records", "vicuna_prompt_segments"]

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
"""The Vicuna v1.1 system prompt (FastChat's ``vicuna_v1.1`` template)."""

TEMPLATES = ("auto", "vicuna", "chat_template", "none")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
ROLE_ALIASES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bard": "assistant",
    "bing": "assistant", "model": "assistant",
    "system": "system",
}
MAX_SAMPLES = 5  # skipped-record messages kept in the report

Record = Union[dict, str]
Message = Tuple[str, str]  # (role in {"system", "user", "assistant"}, text)
PathLike = Union[str, "os.PathLike[str]"]


@dataclass
class Example:
    """One training sequence.

    ``loss_mask[t]`` is 1 where token ``t`` is one the model should learn to predict (an assistant or
    output token), 0 for prompt, system and template tokens; same length as ``input_ids``.
    """

    input_ids: List[int]
    loss_mask: List[int]

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class DataReport:
    """What :func:`load_examples` read, produced and skipped."""

    records: int = 0                                      # records read (valid or not)
    examples: int = 0                                     # examples produced
    skipped: Dict[str, int] = field(default_factory=dict)  # reason -> count
    truncated: int = 0                                    # examples cut to max_length
    tokens: int = 0                                       # total tokens in the examples
    samples: List[str] = field(default_factory=list)      # the first few skips, with where they were

    def skip(self, reason: str, where: Optional[str] = None) -> None:
        """Count one skipped record (or packed chunk) under ``reason``."""
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if len(self.samples) < MAX_SAMPLES:
            self.samples.append(f"{where}: {reason}" if where else reason)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def __str__(self) -> str:
        line = (f"{self.records} records -> {self.examples} examples, {self.tokens} tokens, "
                f"{self.truncated} truncated, {self.num_skipped} skipped")
        if self.skipped:
            line += " (" + ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())) + ")"
        if self.samples:
            line += "; first skipped: " + "; ".join(self.samples)
        return line


# ----------------------------------------------------------------------------------------------- reading

def _decode(raw: bytes) -> Optional[str]:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _jsonl_records(lines: Sequence[bytes]) -> Iterator[Tuple[Optional[Record], Optional[str]]]:
    for raw in lines:
        text = _decode(raw)
        if text is None:
            yield None, "invalid utf-8"
            continue
        text = text.strip()
        if not text:
            continue  # blank lines are not records
        try:
            yield json.loads(text), None
        except json.JSONDecodeError:
            yield None, "invalid json"


def _text_chunks(text: str, chunk_chars: int) -> Iterator[str]:
    """Paragraphs (split at blank lines) grouped into chunks of at most ``chunk_chars`` characters;
    a longer paragraph is cut at line or word boundaries where it can be."""
    paragraphs: List[str] = []
    current: List[str] = []
    for line in text.splitlines():
        if line.strip():
            current.append(line)
        elif current:
            paragraphs.append("\n".join(current))
            current = []
    if current:
        paragraphs.append("\n".join(current))

    pieces: List[str] = []
    for p in paragraphs:
        while len(p) > chunk_chars:
            cut = max(p.rfind("\n", 0, chunk_chars), p.rfind(" ", 0, chunk_chars))
            cut = cut if cut > 0 else chunk_chars
            pieces.append(p[:cut])
            p = p[cut:].lstrip()
        if p:
            pieces.append(p)

    chunk = ""
    for p in pieces:
        if chunk and len(chunk) + 2 + len(p) > chunk_chars:
            yield chunk
            chunk = ""
        chunk = f"{chunk}\n\n{p}" if chunk else p
    if chunk:
        yield chunk


def _files(path: str) -> List[str]:
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if not n.startswith("."))
        return [os.path.join(path, n) for n in names if os.path.isfile(os.path.join(path, n))]
    return [path]


def read_records(path: PathLike, chunk_chars: int = 4000) -> Iterator[Tuple[Optional[Record], Optional[str]]]:
    """Yield ``(record, None)`` for each record of ``path`` or ``(None, reason)`` for an unreadable one.

    ``.json``: a list of records (or a single record); if the file is not valid JSON as a whole it is
    read as JSONL. ``.jsonl``/``.ndjson``: one record a line (blank lines ignored). Anything else: raw
    text, yielded as plain-text string records of at most ``chunk_chars`` characters (paragraphs kept
    together where they fit). A folder is read file by file in name order.

    Raises FileNotFoundError if ``path`` does not exist.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"training data not found: {path}")
    if chunk_chars < 1:
        raise ValueError(f"chunk_chars must be >= 1, got {chunk_chars}")
    for file in _files(path):
        suffix = os.path.splitext(file)[1].lower()
        with open(file, "rb") as f:
            data = f.read()
        if suffix in JSONL_SUFFIXES:
            yield from _jsonl_records(data.splitlines())
        elif suffix == ".json":
            text = _decode(data)
            if text is None:
                yield None, "invalid utf-8"
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError:
                yield from _jsonl_records(data.splitlines())  # JSONL saved as .json
                continue
            if isinstance(obj, list):
                for item in obj:
                    yield item, None
            else:
                yield obj, None
        else:
            text = data.decode("utf-8", errors="replace")
            for chunk in _text_chunks(text, chunk_chars):
                yield chunk, None


# ----------------------------------------------------------------------------------------- conversations

class _Skip(ValueError):
    """A record that cannot be used; the message is the reason counted in the report."""


def normalize_conversation(messages: Any) -> List[Message]:
    """Raw messages (dicts with ``from``/``value`` or ``role``/``content``, or ``(role, text)`` pairs)
    -> ``[(role, text)]`` with role in ``system``/``user``/``assistant``.

    A leading system message is kept; leading assistant messages (no prompt before them) and trailing
    user messages (no reply after them) are dropped, as FastChat's training code does.
    Raises ValueError (its message is the skip reason) for a malformed conversation.
    """
    if not isinstance(messages, list) or not messages:
        raise _Skip("no conversations")
    out: List[Message] = []
    for m in messages:
        if isinstance(m, dict):
            role = m.get("from", m.get("role"))
            text = m.get("value", m.get("content"))
        elif isinstance(m, (list, tuple)) and len(m) == 2:
            role, text = m
        else:
            raise _Skip("bad message")
        if not isinstance(role, str) or role.strip().lower() not in ROLE_ALIASES:
            raise _Skip("bad role")
        if not isinstance(text, str):
            raise _Skip("bad message")
        if not text.strip():
            raise _Skip("empty")
        out.append((ROLE_ALIASES[role.strip().lower()], text))
    system = out[:1] if out[0][0] == "system" else []
    body = out[len(system):]
    if any(r == "system" for r, _ in body):
        raise _Skip("misplaced system message")
    while body and body[0][0] == "assistant":
        body = body[1:]
    while body and body[-1][0] == "user":
        body = body[:-1]
    if not any(r == "assistant" for r, _ in body):
        raise _Skip("no assistant tokens")
    return system + body


def _as_messages(conversation: Any) -> List[Message]:
    if (isinstance(conversation, list) and conversation
            and all(isinstance(m, tuple) and len(m) == 2 and m[0] in ("system", "user", "assistant")
                    for m in conversation)):
        return list(conversation)
    return normalize_conversation(conversation)


def vicuna_prompt_segments(conversation: Any, system_prompt: Optional[str] = None,
                           eos: str = "</s>") -> List[Tuple[str, bool]]:
    """The Vicuna v1.1 prompt of ``conversation`` as ``[(text, is_assistant)]`` segments.

    Joined, the segments give ``"{system} USER: {human} ASSISTANT: {gpt}{eos}USER: ..."`` (FastChat's
    ``vicuna_v1.1``: separator ``" "`` after a user turn, the eos after an assistant turn). The system
    text is the conversation's own system message, else ``system_prompt``, else :data:`VICUNA_SYSTEM`.
    Assistant segments are the reply followed by ``eos``; the ``ASSISTANT: `` header is not one.
    ``conversation`` is raw messages or the ``[(role, text)]`` of :func:`normalize_conversation`.
    """
    messages = _as_messages(conversation)
    system = system_prompt if system_prompt is not None else VICUNA_SYSTEM
    if messages and messages[0][0] == "system":
        system, messages = messages[0][1], messages[1:]
    segments: List[Tuple[str, bool]] = [(system + " ", False)]
    for role, text in messages:
        if role == "user":
            segments.append((f"USER: {text} ", False))
        else:
            segments.append(("ASSISTANT: ", False))
            segments.append((text + eos, True))
    return segments


def _none_segments(messages: List[Message], system_prompt: Optional[str]) -> List[Tuple[str, bool]]:
    if system_prompt is not None and messages[0][0] != "system":
        messages = [("system", system_prompt)] + messages
    segments: List[Tuple[str, bool]] = []
    for i, (role, text) in enumerate(messages):
        if i:
            segments.append(("\n", False))
        segments.append((text, role == "assistant"))
    return segments


# ----------------------------------------------------------------------------------------- tokenisation

def _encode(tokenizer: Any, text: str, add_special_tokens: bool, offsets: bool = False) -> Any:
    return tokenizer(text, add_special_tokens=add_special_tokens, return_special_tokens_mask=True,
                     return_offsets_mapping=offsets, return_attention_mask=False)


def _encode_segments(tokenizer: Any, segments: List[Tuple[str, bool]]) -> Example:
    """Tokenise the joined text once (as the model sees it) and mark the tokens overlapping an
    assistant segment. Slow tokenizers (no offsets) tokenise segment by segment instead."""
    if getattr(tokenizer, "is_fast", False):
        text = "".join(s for s, _ in segments)
        spans: List[Tuple[int, int]] = []
        pos = 0
        for s, is_assistant in segments:
            if is_assistant and s:
                spans.append((pos, pos + len(s)))
            pos += len(s)
        enc = _encode(tokenizer, text, add_special_tokens=True, offsets=True)
        mask = []
        for (a, b), special in zip(enc["offset_mapping"], enc["special_tokens_mask"]):
            hit = b > a and any(a < e and b > s for s, e in spans)
            mask.append(int(hit and not special))
        return Example(list(enc["input_ids"]), mask)
    ids: List[int] = []
    mask: List[int] = []
    for i, (s, is_assistant) in enumerate(segments):
        enc = _encode(tokenizer, s, add_special_tokens=(i == 0))
        ids.extend(enc["input_ids"])
        mask.extend(int(is_assistant and not sp) for sp in enc["special_tokens_mask"])
    return Example(ids, mask)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _chat_template_example(tokenizer: Any, messages: List[Message]) -> Example:
    """Render with the tokenizer's ``chat_template``; mark assistant tokens by rendering growing prefixes.

    The tokens of message ``i`` are those between the longest common prefix of the full rendering's
    tokens with the rendering of ``messages[:i]`` and with that of ``messages[:i+1]`` (robust to templates
    whose prefix renderings do not tokenise as exact prefixes). For an assistant message, the assistant
    header (the template's generation prompt) is excluded when it can be located the same way.
    """
    chat = [{"role": r, "content": t} for r, t in messages]

    def ids(n: int, generation_prompt: bool = False) -> List[int]:
        if n == 0 and not generation_prompt:
            return []
        text = tokenizer.apply_chat_template(chat[:n], tokenize=False, add_generation_prompt=generation_prompt)
        return list(_encode(tokenizer, text, add_special_tokens=False)["input_ids"])

    try:
        full = ids(len(chat))
        mask = [0] * len(full)
        start = 0
        for i, (role, _) in enumerate(messages):
            end = _common_prefix(ids(i + 1), full) if i + 1 < len(chat) else len(full)
            end = max(end, start)
            if role == "assistant":
                begin = start
                header = _common_prefix(ids(i, generation_prompt=True), full)
                if start <= header < end:
                    begin = header
                for t in range(begin, end):
                    mask[t] = 1
            start = end
    except Exception as e:  # a template may reject a conversation (role order, missing fields)
        raise _Skip(f"chat template error ({type(e).__name__})") from e
    return Example(full, mask)


def _text_example(tokenizer: Any, text: str) -> Example:
    enc = _encode(tokenizer, text, add_special_tokens=True)
    return Example(list(enc["input_ids"]), [int(not s) for s in enc["special_tokens_mask"]])


def _resolve_template(tokenizer: Any, template: str) -> str:
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if template == "auto":
        return "chat_template" if has_template else "vicuna"
    if template == "chat_template" and not has_template:
        raise ValueError("template='chat_template' but the tokenizer has no chat_template "
                         "(use template='vicuna' or set tokenizer.chat_template)")
    return template


def _record_example(record: Any, tokenizer: Any, template: str,
                    system_prompt: Optional[str]) -> Tuple[Example, bool]:
    """-> (example, is_conversation); raises _Skip with the reason for an unusable record."""
    if isinstance(record, str):
        if not record.strip():
            raise _Skip("empty")
        return _text_example(tokenizer, record), False
    if not isinstance(record, dict):
        raise _Skip("not a dict")
    conv = record.get("conversations", record.get("messages"))
    if conv is None:
        if "text" in record:
            text = record["text"]
            if not isinstance(text, str):
                raise _Skip("bad text")
            if not text.strip():
                raise _Skip("empty")
            return _text_example(tokenizer, text), False
        raise _Skip("no conversations")
    messages = normalize_conversation(conv)
    if template == "chat_template":
        if system_prompt is not None and messages[0][0] != "system":
            messages = [("system", system_prompt)] + messages
        return _chat_template_example(tokenizer, messages), True
    if template == "vicuna":
        eos = getattr(tokenizer, "eos_token", None) or "</s>"
        return _encode_segments(tokenizer, vicuna_prompt_segments(messages, system_prompt, eos)), True
    return _encode_segments(tokenizer, _none_segments(messages, system_prompt)), True


# ------------------------------------------------------------------------------------------------ packing

def pack_examples(examples: Sequence[Example], max_length: int, eos_token_id: Optional[int],
                  report: Optional[DataReport] = None) -> List[Example]:
    """Concatenate ``examples`` (an eos between two, unless the first already ends with it) and cut the
    stream into chunks of exactly ``max_length`` tokens; the last partial chunk is kept if it has at least
    2 tokens. The separator and each example's first token get mask 0 (nothing is learned across an
    example boundary). Chunks with no trained position are dropped and counted in ``report``.
    """
    ids: List[int] = []
    mask: List[int] = []
    for ex in examples:
        if ids and eos_token_id is not None and ids[-1] != eos_token_id:
            ids.append(eos_token_id)
            mask.append(0)
        ids.extend(ex.input_ids)
        mask.extend([0] + list(ex.loss_mask[1:]))
    out: List[Example] = []
    for start in range(0, len(ids), max_length):
        chunk_ids, chunk_mask = ids[start:start + max_length], mask[start:start + max_length]
        if len(chunk_ids) < 2:
            continue
        if not any(chunk_mask[1:]):
            if report is not None:
                report.skip("packed chunk without loss tokens", f"chunk {start // max_length}")
            continue
        out.append(Example(chunk_ids, chunk_mask))
    return out


# ------------------------------------------------------------------------------------------------ loading

def load_examples(path: PathLike, tokenizer: Any, max_length: int = 2048, template: str = "auto",
                  packing: bool = False, system_prompt: Optional[str] = None,
                  chunk_chars: int = 4000) -> Tuple[List[Example], DataReport]:
    """Read ``path`` (see :func:`read_records`) into tokenised, masked examples.

    ``template``: ``"vicuna"`` (Vicuna v1.1, eos after each assistant turn), ``"chat_template"`` (the
    tokenizer's own), ``"auto"`` (the tokenizer's own if it has one, else Vicuna) or ``"none"`` (turns
    joined by newlines). ``system_prompt`` replaces the default system text where a conversation has no
    system message of its own. Plain-text records ignore the template.

    Without packing, examples longer than ``max_length`` are cut (counted in ``report.truncated``);
    examples left without any loss token are skipped. With ``packing`` the examples are concatenated and
    cut into ``max_length`` chunks (:func:`pack_examples`), nothing is truncated.

    Raises FileNotFoundError for a missing path, ValueError for bad arguments or when no example at all
    could be made (the message includes the :class:`DataReport`).
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    template = _resolve_template(tokenizer, template)
    report = DataReport()
    examples: List[Example] = []
    for index, (record, error) in enumerate(read_records(path, chunk_chars=chunk_chars)):
        report.records += 1
        where = f"record {index}"
        if error is not None:
            report.skip(error, where)
            continue
        try:
            ex, is_conversation = _record_example(record, tokenizer, template, system_prompt)
        except _Skip as e:
            report.skip(str(e), where)
            continue
        if not packing and len(ex.input_ids) > max_length:
            ex = Example(ex.input_ids[:max_length], ex.loss_mask[:max_length])
            report.truncated += 1
        if len(ex.input_ids) < 2 or not any(ex.loss_mask[1:]):
            report.skip("no assistant tokens" if is_conversation else "too short", where)
            continue
        examples.append(ex)
    if packing:
        examples = pack_examples(examples, max_length, getattr(tokenizer, "eos_token_id", None), report)
    report.examples = len(examples)
    report.tokens = sum(len(e.input_ids) for e in examples)
    if not examples:
        raise ValueError(f"no usable training examples in {os.fspath(path)}: {report}")
    return examples, report
