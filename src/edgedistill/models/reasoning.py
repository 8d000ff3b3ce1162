"""Reasoning traces: where a model's thinking ends and its answer starts, for the two forms
reasoning models write.

- `<think>` tags (Qwen3, DeepSeek-R1 distills, QwQ): `<think>\\n…\\n</think>\\n\\nanswer`. R1-style
  templates (R1 distills, QwQ, Qwen3-*-Thinking-2507, Qwen3.5) end the generation prompt with
  `<think>\\n`, so the output starts inside the trace and carries only `</think>` ("opened").
- gpt-oss harmony channels: `<|channel|>analysis<|message|>…<|end|><|start|>assistant
  <|channel|>final<|message|>…<|return|>`, parsed from the markers. openai-harmony would need
  its `o200k_base.tiktoken` vocabulary, which it downloads at run time (offline it raises), so
  it is not used: the markers are the same text llama.cpp's own harmony parser reads (PR
  ggml-org/llama.cpp#15181).

The rules follow what the servers do (measured on llama.cpp, read in vLLM's
`BaseThinkingReasoningParser`): the FIRST end tag ends the trace, later `<think>` blocks stay in
the answer; no end tag means everything is trace (cut by the length limit, `closed=False`); a
model that re-emits the opening tag inside an opened trace has it dropped. Splitting works on
text (`split_text`) and on a list of token pieces (`split_pieces`), the latter for KD targets:
trace tokens and answer tokens each keep their own rows, the delimiter tokens belong to neither.

Why here, under the stages: teachers split what they generate, the student's training text is
rendered in this form, the evaluator turns thinking off, and the server streams the split.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

THINK_TAGS = ("<think>", "</think>")
CHANNEL, MESSAGE, END, START = "<|channel|>", "<|message|>", "<|end|>", "<|start|>"
HARMONY_STOPS = (END, "<|return|>", "<|call|>", START)


@dataclass(frozen=True)
class ReasoningStyle:
    """How one model writes its trace. `opened`: its generation prompt already opens the trace."""

    kind: Literal["think", "harmony"] = "think"
    open: str = THINK_TAGS[0]
    close: str = THINK_TAGS[1]
    opened: bool = False

    @property
    def markers(self) -> tuple[str, ...]:
        """Every delimiter text; a stream holds back a tail that may be the start of one."""
        return (self.open, self.close) if self.kind == "think" else (CHANNEL, MESSAGE, *HARMONY_STOPS)


HARMONY = ReasoningStyle("harmony", CHANNEL, END)


@dataclass(frozen=True)
class Spans:
    """Character spans of a raw completion: trace [trace_start, trace_end), answer from
    answer_start to answer_end. `has_trace` False: a plain answer."""

    has_trace: bool
    trace_start: int
    trace_end: int
    answer_start: int
    answer_end: int
    closed: bool


@dataclass(frozen=True)
class Split:
    trace: str | None  # None: the model did not think (or thinking was off)
    answer: str
    closed: bool  # False: the trace was cut (length limit) before its end tag


def _think_spans(text: str, style: ReasoningStyle) -> Spans:
    lead = len(text) - len(text.lstrip())
    if text.startswith(style.open, lead):
        start = lead + len(style.open)
    elif style.opened or style.close in text:  # a stray end tag: the prompt opened the trace
        start = 0
    else:
        return Spans(False, 0, 0, 0, len(text), True)
    end = text.find(style.close, start)
    if end < 0:
        return Spans(True, start, len(text), len(text), len(text), False)
    return Spans(True, start, end, end + len(style.close), len(text), True)


def _harmony_messages(text: str) -> list[tuple[str, int, int, bool]]:
    """(channel, body start, body end, terminated) of each `<|channel|>NAME<|message|>body`."""
    found, at = [], text.find(CHANNEL)
    while at >= 0:
        head_end = text.find(MESSAGE, at)
        if head_end < 0:
            break
        body = head_end + len(MESSAGE)
        stops = [i for i in (text.find(s, body) for s in HARMONY_STOPS) if i >= 0]
        end = min(stops, default=len(text))
        name = text[at + len(CHANNEL):head_end].split()  # "commentary to=functions.f json" -> commentary
        found.append((name[0] if name else "", body, end, bool(stops)))
        at = text.find(CHANNEL, end)
    return found


def _harmony_spans(text: str) -> Spans:
    messages = _harmony_messages(text)
    analysis = next((m for m in messages if m[0] == "analysis"), None)
    final = next((m for m in messages if m[0] == "final"), None)
    if CHANNEL not in text:
        return Spans(False, 0, 0, 0, len(text), True)
    answer = (final[1], final[2]) if final else (len(text), len(text))
    if analysis is None:
        return Spans(False, 0, 0, *answer, True)
    return Spans(True, analysis[1], analysis[2], *answer, analysis[3])


def text_spans(text: str, style: ReasoningStyle) -> Spans:
    """Where the trace and the answer lie in a raw completion (special tokens kept)."""
    return _harmony_spans(text) if style.kind == "harmony" else _think_spans(text, style)


def split_text(text: str, style: ReasoningStyle | None) -> Split:
    """A raw completion as (trace, answer); without a style the whole text is the answer."""
    if style is None:
        return Split(None, text.strip(), True)
    spans = text_spans(text, style)
    trace = text[spans.trace_start:spans.trace_end].strip() if spans.has_trace else ""
    return Split(trace or None, text[spans.answer_start:spans.answer_end].strip(), spans.closed)


@dataclass(frozen=True)
class TokenSplit:
    """Token index ranges of the trace and the answer; delimiters and whitespace-only tokens at
    either edge belong to neither."""

    trace: range
    answer: range
    closed: bool
    has_trace: bool


def _inside(bounds: list[int], start: int, end: int) -> range:
    """Tokens whose characters all lie in [start, end); bounds[i]..bounds[i+1] is token i."""
    first = next((i for i in range(len(bounds) - 1) if bounds[i] >= start), len(bounds) - 1)
    last = first
    while last < len(bounds) - 1 and bounds[last + 1] <= end:
        last += 1
    return range(first, last)


def _trim(tokens: range, pieces: list[str]) -> range:
    start, stop = tokens.start, tokens.stop
    while start < stop and not pieces[start].strip():
        start += 1
    while stop > start and not pieces[stop - 1].strip():
        stop -= 1
    return range(start, stop)


def split_pieces(pieces: list[str], style: ReasoningStyle | None) -> TokenSplit:
    """The split of a completion given as the text of each of its tokens (special tokens as
    their own text): which tokens are trace, which are answer. A token straddling a delimiter
    (e.g. one token spelling `.</think>`) belongs to neither."""
    everything = range(len(pieces))
    if style is None:
        return TokenSplit(range(0), everything, True, False)
    bounds = [0]
    for piece in pieces:
        bounds.append(bounds[-1] + len(piece))
    spans = text_spans("".join(pieces), style)
    answer = _trim(_inside(bounds, spans.answer_start, spans.answer_end), pieces)
    if not spans.has_trace:
        return TokenSplit(range(0), answer, spans.closed, False)
    trace = _trim(_inside(bounds, spans.trace_start, spans.trace_end), pieces)
    return TokenSplit(trace, answer, spans.closed, True)


# ---- styles and prompts ---------------------------------------------------------------------
PROBE = [{"role": "user", "content": "1+1?"}]


def _render(tokenizer, messages: list[dict], **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)


def template_style(tokenizer, tags: tuple[str, str] | None = None) -> ReasoningStyle | None:
    """The reasoning form of a tokenizer's chat template: harmony markers, `<think>` tags
    (opened when the generation prompt ends inside the trace, as llama.cpp's
    `compare_thinking_enabled` also checks), else `tags` when given (a student taught a pair of
    tags its template does not have), else None."""
    template = getattr(tokenizer, "chat_template", None)
    template = template if isinstance(template, str) else ""
    if CHANNEL in template:
        return HARMONY
    if THINK_TAGS[0] in template:
        try:
            opened = _render(tokenizer, PROBE).rstrip().endswith(THINK_TAGS[0])
        except Exception:  # noqa: BLE001 — a template that needs other inputs: assume not opened
            opened = False
        return ReasoningStyle("think", *THINK_TAGS, opened=opened)
    return ReasoningStyle("think", *tags) if tags else None


def empty_trace(style: ReasoningStyle) -> str:
    """What follows the generation prompt to skip thinking: an empty think block (Qwen3's own
    `enable_thinking=False` form), or for harmony an empty analysis message and the final header."""
    if style.kind == "harmony":
        return f"{CHANNEL}analysis{MESSAGE}{END}{START}assistant{CHANNEL}final{MESSAGE}"
    return ("" if style.opened else style.open) + "\n\n" + style.close + "\n\n"


def render_prompt(tokenizer, messages: list[dict], *, thinking: bool = True, style: ReasoningStyle | None = None,
                  template_kwargs: dict | None = None) -> str:
    """The generation prompt in the model's own chat template; `thinking=False` turns the trace
    off with the template's own switch (`enable_thinking=False`) when it has one, else by
    prefilling an empty trace."""
    kwargs = dict(template_kwargs or {})
    text = _render(tokenizer, messages, **kwargs)
    if thinking or style is None:
        return text
    off = _render(tokenizer, messages, **(kwargs | {"enable_thinking": False}))
    if off != text:
        return off
    return text + empty_trace(style)


def target_segments(style: ReasoningStyle, trace: str | None, answer: str) -> list[tuple[str, str]]:
    """The assistant turn after the generation prompt, as (kind, text) segments with kind
    'tag', 'trace' or 'answer': the form a student learns. `trace=None`: answer only (for an
    opened template the trace is closed at once, as `enable_thinking=False` would)."""
    if style.kind == "harmony":
        if trace is None:
            return [("tag", f"{CHANNEL}final{MESSAGE}"), ("answer", answer)]
        return [("tag", f"{CHANNEL}analysis{MESSAGE}"), ("trace", trace),
                ("tag", f"{END}{START}assistant{CHANNEL}final{MESSAGE}"), ("answer", answer)]
    if trace is None:
        return ([("tag", f"\n{style.close}\n\n")] if style.opened else []) + [("answer", answer)]
    opening = [] if style.opened else [("tag", f"{style.open}\n")]
    return opening + [("trace", trace), ("tag", f"\n{style.close}\n\n"), ("answer", answer)]


class StreamSplitter:
    """Splits a growing completion into trace and answer deltas for streaming. `feed` takes the
    whole text so far; a tail that could still become a delimiter, and trailing whitespace, are
    held back until more text (or the end) shows what they are."""

    def __init__(self, style: ReasoningStyle):
        self.style = style
        self.sent = [0, 0]  # characters of the (stripped) trace and answer already sent
        self.hold = max(len(m) for m in style.markers)

    def _delta(self, which: int, text: str, final: bool) -> str:
        visible = text.strip() if final else text.lstrip().rstrip()
        delta = visible[self.sent[which]:]
        self.sent[which] = max(self.sent[which], len(visible))
        return delta

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        safe = len(text) if final else max(0, len(text) - self.hold)
        spans = text_spans(text, self.style)
        trace = ""
        if spans.has_trace:
            trace_done = final or (spans.closed and spans.trace_end <= safe)
            trace = self._delta(0, text[spans.trace_start:min(spans.trace_end, safe)], trace_done)
        answer = self._delta(1, text[spans.answer_start:min(spans.answer_end, safe)], final)
        return trace, answer


# ---- what a trained student learnt ------------------------------------------------------------
STYLE_FILE = "edgedistill.json"  # written by models/hf.py save_model, next to the weights


def save_style(folder: Path, style: ReasoningStyle, mode: str) -> None:
    """Record in a saved model's edgedistill.json the trace form it was trained on, so serving
    and evaluation split its output the same way (its template may not have the tags)."""
    path = folder / STYLE_FILE
    extra = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    extra["reasoning"] = {"mode": mode, "kind": style.kind, "open": style.open, "close": style.close,
                          "opened": style.opened}
    path.write_text(json.dumps(extra, indent=2), encoding="utf-8")


def model_style(folder: Path | None, tokenizer) -> ReasoningStyle | None:
    """A model's trace form: its chat template's, else the one its training recorded, else None."""
    style = template_style(tokenizer)
    path = folder / STYLE_FILE if folder is not None else None
    if style is not None or path is None or not path.is_file():
        return style
    saved = json.loads(path.read_text(encoding="utf-8")).get("reasoning")
    if not saved or saved.get("mode") == "none":
        return None
    return ReasoningStyle(saved["kind"], saved["open"], saved["close"], bool(saved.get("opened")))
