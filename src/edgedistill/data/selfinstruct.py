"""Self-Instruct bootstrap: ask the teacher for new tasks, parse its list, keep the novel ones.

Self-Instruct (Wang et al. 2023, arXiv:2212.10560) and Alpaca grow a task pool from seeds:
show the teacher a few pool tasks, ask for more, drop the ones that are too short, too long,
need a modality a text model lacks, or overlap an existing task (ROUGE-L >= 0.7). Upstream
drops every instruction whose first character is not ASCII and tokenises ROUGE by whitespace,
so no Japanese task ever survives. Here lengths use `similarity.text_units` (one unit per CJK
character, scaled to English words for the cap), ROUGE-L uses `similarity.dedup_units` (CJK
character bigrams), and the prompt and parser speak English and Japanese. Each filter was
checked on human-written text in both languages (bench/filters_on_real_text.py).

Pure Python: no model calls. The caller samples examples, sends `bootstrap_prompt` to the
teacher, feeds the answer to `parse_tasks` and each task to `TaskFilter.add`.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field

from edgedistill.data.similarity import (
    CJK_CHAR,
    dedup_units,
    detect_lang,
    lcs_length,
    text_units,
)


@dataclass(frozen=True)
class Task:
    instruction: str
    input: str = ""
    lang: str = "en"  # similarity.detect_lang(instruction)


# --- the prompt ------------------------------------------------------------------------------
# The examples are written in exactly the layout parse_tasks reads, and they come last, so the
# teacher's natural continuation is the next numbered item.

_LABELS = {
    "en": {"instruction": "Instruction", "input": "Input", "noinput": "<noinput>", "colon": ": "},
    "ja": {"instruction": "指示", "input": "入力", "noinput": "なし", "colon": "："},
}

_REQUEST_EN = """\
Come up with {n_new} new, diverse tasks for a text-only AI assistant. The numbered tasks below \
are examples; continue the list with tasks {first} to {last}.

Requirements:
- Do not repeat the examples, and try not to repeat the same verb twice.
- Mix kinds of task: open questions, explanation, summarising, rewriting, classification, \
extraction, reasoning, planning, writing, coding.
- Each instruction is one or two sentences and can be done by a model that only reads and \
writes text: nothing that needs images, audio, files, maps or the internet.
- Give an input (a concrete text, list or data the instruction works on) only when the task \
needs one; otherwise write "{noinput}".
{language}
- Use exactly the format of the examples: "N. Instruction: ..." then "Input: ..." on the next \
line. Write only the list, nothing before or after it.

{examples}
"""

_REQUEST_JA = """\
テキストだけを扱うAIアシスタント向けに、新しく多様なタスクを{n_new}個作ってください。\
下の番号付きのタスクは例です。続けて{first}番から{last}番までを書いてください。

条件：
- 例と同じタスクを繰り返さず、同じ動詞もなるべく繰り返さないこと。
- 質問、説明、要約、書き換え、分類、抽出、推論、計画、作文、プログラミングなど、種類を混ぜること。
- 指示は1〜2文で、文章を読み書きするだけのモデルが実行できるものにすること。画像・音声・ファイル・地図・インターネットが必要なタスクは不可。
- 入力（指示の対象となる具体的な文章・リスト・データ）はタスクに必要な場合だけ書き、不要なら「{noinput}」と書くこと。
- すべて日本語で書くこと。
- 例と同じ形式（「N. 指示：…」、次の行に「入力：…」）で、リストだけを出力すること。前置きや補足は不要です。

{examples}
"""


def _format_task(number: int, task: Task, labels: dict[str, str]) -> str:
    instruction = " ".join(task.instruction.split())
    head = f"{number}. {labels['instruction']}{labels['colon']}{instruction}"
    text = task.input.strip()
    if not text:
        return f"{head}\n{labels['input']}{labels['colon']}{labels['noinput']}"
    if "\n" in text:  # multi-line input goes below its label, as parse_tasks reads it
        return f"{head}\n{labels['input']}{labels['colon'].rstrip()}\n{text}"
    return f"{head}\n{labels['input']}{labels['colon']}{text}"


def bootstrap_prompt(examples: list[Task], n_new: int, lang: str) -> list[dict[str, str]]:
    """Chat messages asking the teacher for n_new new, diverse tasks, numbered after the examples.

    English wording for lang 'en' (and any other tag), Japanese wording for 'ja'. The examples
    are numbered 1..k in the layout `parse_tasks` reads; the teacher is asked for k+1..k+n_new.
    One user message, no system turn: some chat templates (Gemma) have none.
    """
    if n_new < 1:
        raise ValueError(f"n_new must be >= 1, got {n_new}")
    labels = _LABELS["ja" if lang == "ja" else "en"]
    block = "\n\n".join(_format_task(i, task, labels) for i, task in enumerate(examples, 1))
    first, last = len(examples) + 1, len(examples) + n_new
    if lang == "ja":
        content = _REQUEST_JA.format(n_new=n_new, first=first, last=last, noinput=labels["noinput"],
                                     examples=block)
    else:
        language = ("- Write every task in English." if lang == "en"
                    else "- Write every task in the language of the examples.")
        content = _REQUEST_EN.format(n_new=n_new, first=first, last=last, noinput=labels["noinput"],
                                     language=language, examples=block)
    return [{"role": "user", "content": content.rstrip() + "\n"}]


# --- the parser ------------------------------------------------------------------------------

_DIGITS = "0-9０-９"
# "3. ", "3) ", "３．", "３）", "(3)", "**3.**", "Task 3:", "タスク3：" — optionally bold/heading marks.
_ITEM = re.compile(
    rf"^\s*(?:[#*]+\s*)?(?:(?:task|タスク)\s*)?[(（]?([{_DIGITS}]+)\s*[.)．）:：、](?![{_DIGITS}])\s*(?:\*+\s*)?(.*)$",
    re.IGNORECASE)
_LABEL = r"\s*(?:\*+\s*)?{}\s*(?:\*+\s*)?[:：]\s*(?:\*+\s*)?(.*)$"
_INSTRUCTION = re.compile(_LABEL.format(r"(?:instruction|指示|タスク|task)"), re.IGNORECASE)
_INPUT = re.compile(_LABEL.format(r"(?:input|入力)"), re.IGNORECASE)
_OUTPUT = re.compile(_LABEL.format(r"(?:output|出力|answer|回答|答え)"), re.IGNORECASE)
_NO_INPUT = {"", "<noinput>", "<no input>", "noinput", "no input", "none", "n/a", "-", "なし", "(なし)",
             "<なし>", "「なし」", "入力なし", "無し", "特になし"}


def _no_input(text: str) -> bool:
    return _normalize(text).strip(" .。") in _NO_INPUT


def _join(lines: list[str]) -> str:
    """Wrapped instruction lines back into one: a space between words, none between CJK chars."""
    out = ""
    for line in (ln.strip() for ln in lines):
        if not line:
            continue
        if out and not (_is_cjk(out[-1]) and _is_cjk(line[0])):
            out += " "
        out += line
    return out


def _is_cjk(ch: str) -> bool:
    return unicodedata.east_asian_width(ch) in ("W", "F")


class _Item:
    def __init__(self, number: int, first_line: str):
        self.number = number
        self.instruction = [first_line]
        self.input: list[str] = []
        self.state = "instruction"  # -> "closed" (blank line), "input", "output"

    def task(self) -> Task | None:
        instruction = _join(self.instruction)
        if not instruction:  # cut off right after its number / label
            return None
        text = "\n".join(self.input).strip()
        return Task(instruction, "" if _no_input(text) else text, detect_lang(instruction))


def parse_tasks(text: str) -> list[Task]:
    """Parse the teacher's numbered list into tasks.

    Reads '1. Instruction: ...', '2) ...', '３．…', '(4) 指示：…', with an optional 'Input:' /
    '入力：' line (its text on the same line or the lines below); '<noinput>', 'なし' or an empty
    input means no input; 'Output:' / '出力：' sections are skipped. Text before the first item
    is ignored. Once items carry an 'Instruction:' label, a numbered line without one is a list
    inside an input (unless it is the next number right after an instruction); without labels,
    a new task needs a higher number. A last item cut off mid-way is kept if it has any
    instruction text (the filter judges it), dropped if it has none.
    """
    items: list[_Item] = []
    labelled = False
    for raw in text.splitlines():
        line = raw.rstrip()
        current = items[-1] if items else None
        marker = _ITEM.match(line)
        if marker:
            number = int(unicodedata.normalize("NFKC", marker.group(1)))
            rest = marker.group(2)
            label = _INSTRUCTION.match(rest)
            if current is None:
                labelled = bool(label)
                starts = True
            elif labelled:  # an unlabelled next number counts only where no input/output runs
                starts = bool(label) or (number == current.number + 1
                                         and current.state in ("instruction", "closed"))
            else:
                starts = number > current.number
            if starts:
                items.append(_Item(number, label.group(1) if label else rest))
                continue
        if current is None:
            continue  # preamble
        if current.state in ("instruction", "closed") and (m := _INPUT.match(line)):
            current.state = "input"
            current.input = [m.group(1)]
        elif _OUTPUT.match(line):
            current.state = "output"
        elif current.state == "instruction":
            if line.strip():
                current.instruction.append(line)
            else:
                current.state = "closed"
        elif current.state == "input":
            current.input.append(line)
        # "closed" / "output": chatter or an answer we do not need
    return [task for item in items if (task := item.task()) is not None]


# --- the filter ------------------------------------------------------------------------------

_BLACKLIST = (
    # Self-Instruct / Alpaca's list of things a text-only model cannot do ...
    "image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
    "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram",
    # ... and the same in Japanese, by substring. Bare 図 and 描 would also hit 合図, 意図,
    # 図書館 and 描写 (measured: 合図 dropped a JCommonsenseQA question), so only the forms
    # that ask for a picture are listed.
    "画像", "写真", "図示", "図解", "図を", "図表", "グラフ", "描いて", "描く", "描き", "絵を",
    "動画", "音声", "音楽", "ファイル", "地図", "フローチャート",
)
REASONS = ("too_short", "too_long", "broken_text", "bad_start", "blacklist", "exact_duplicate", "near_duplicate")


# Japanese characters per English word, measured (bench/filters_on_real_text.py) on the 71
# instructions of bench/data/business_instructions.jsonl, written in both languages: 2,902
# CJK characters for 1,328 English words less the 64 Latin words the Japanese keeps (Python,
# SQL, 2024) = 2.30; 2.32 on the 5 pairs over 40 words, where the cap bites. The bundled seeds
# are not translations of each other (en-office-01 summarises a memo, ja-office-01 a daily
# report), so they cannot calibrate it. Short texts are denser in Japanese (1.67 on the 26
# pairs of up to 10 words: 薬を買う場所は？ / Where do you buy medicine?), so min_units, there
# to catch fragments, stays one unit per character.
JA_CHARS_PER_WORD = 2.3


@dataclass
class FilterConfig:
    max_rouge_l: float = field(default=0.7, metadata={
        "help": "drop a task whose instruction has ROUGE-L F1 >= this with any pool instruction "
                "(Self-Instruct's 0.7), on words and on CJK character bigrams, in (0, 1]"})
    min_units: int = field(default=3, metadata={
        "help": "drop instructions shorter than this, in similarity.text_units (a CJK char is 1)"})
    max_units: int = field(default=150, metadata={
        "help": "drop instructions longer than this, in English words (Self-Instruct: 150); a "
                "Japanese instruction's CJK characters count 1/ja_chars_per_word word each"})
    ja_chars_per_word: float = field(default=JA_CHARS_PER_WORD, metadata={
        "help": "Japanese characters per English word for the length cap, > 0 (measured: 2.3)"})
    blacklist: tuple[str, ...] = field(default=_BLACKLIST, metadata={
        "help": "words for what a text model cannot do: ASCII ones match whole words, "
                "case-insensitive; others (Japanese) match as substrings"})

    def __post_init__(self):
        if not 0 < self.max_rouge_l <= 1:
            raise ValueError(f"max_rouge_l must be in (0, 1], got {self.max_rouge_l}")
        if not 0 <= self.min_units <= self.max_units:
            raise ValueError(f"need 0 <= min_units <= max_units, got {self.min_units}, {self.max_units}")
        if not self.ja_chars_per_word > 0:
            raise ValueError(f"ja_chars_per_word must be > 0, got {self.ja_chars_per_word}")
        self.blacklist = tuple(self.blacklist)


def _normalize(text: str) -> str:
    """The exact-duplicate key: NFKC, lower case, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def _blacklist_pattern(words: tuple[str, ...]) -> re.Pattern | None:
    parts = []
    for word in words:
        if word.isascii():  # whole word, and a Japanese char next to it still counts as a border
            body = r"\s+".join(re.escape(w) for w in word.split())
            parts.append(rf"(?<![a-z0-9_]){body}(?![a-z0-9_])")
        else:
            parts.append(re.escape(word))
    return re.compile("|".join(parts), re.IGNORECASE) if parts else None


# A leftover list marker ("3. ...", "３）…") is a parse slip, not an instruction; "3.5 kg" is fine.
_LIST_MARKER = re.compile(rf"^[{_DIGITS}]+\s*[.)．）、:：](?![{_DIGITS}])")
# Opening quotes/brackets start real instructions ("「こんにちは」を英訳して", '"Hi" in French?').
_OK_START_PUNCT = set("\"'`¿¡")


# A small teacher's degenerate output: a cut UTF-8 sequence (U+FFFD, measured on SmolLM2),
# control characters, or a loop of one short piece of letters ("ワーワーワーワーワー").
# Layout is not a loop: rules (-----, ━━━━, ーーーー), separators (******), indentation, table
# pipes, leaders (……), ASCII art and TSV gaps are punctuation, symbols, spaces or the
# prolonged-sound mark alone, and a person writes them on purpose. Nor is one ASCII letter
# drawn out: #ffffff, xxxx masks, "Hmmmmm", ｗｗｗ (laughter).
# Measured over the instructions, inputs, outputs, questions and choices of the Self-Instruct
# seeds, IFEval, JCommonsenseQA and GSM8K (76,360 texts): no other letter loop repeats more
# than 3 times (La La La, チャチャチャ), so an instruction needs 5 and an input, which is data, 10.
_LETTER_LOOP = re.compile(r"((?:[^\W\d_]| ){1,4}?)\1+")
LOOP_REPEATS = {"instruction": 5, "input": 10}
# C0 and C1 controls and DEL, less tab, newline, CR (Windows line ends), VT and FF (pasted text).
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x9f]")


def _is_loop(piece: str) -> bool:
    """Whether a repeated piece is a degenerate loop rather than layout or one letter drawn out."""
    letters = [ch for ch in piece if ch != " "]
    categories = {unicodedata.category(ch) for ch in letters}
    if not letters or not categories <= {"Lu", "Ll", "Lt", "Lo", "Lm"} or categories == {"Lm"}:
        return False  # 〇〇〇 (a number sign), ーーー (a rule)
    folded = {unicodedata.normalize("NFKC", ch).lower() for ch in letters}
    return not (len(folded) == 1 and next(iter(folded)).isascii())


def _broken(text: str, *, repeats: int = LOOP_REPEATS["instruction"]) -> bool:
    """U+FFFD, a control character other than layout whitespace, or a letter loop repeated
    `repeats` times or more."""
    if "\ufffd" in text or _CONTROL.search(text):
        return True
    return any(len(m.group()) >= repeats * len(m.group(1)) and _is_loop(m.group(1))
               for m in _LETTER_LOOP.finditer(text))


def _bad_start(text: str) -> bool:
    first = text[0]
    category = unicodedata.category(first)
    if category[0] in "PS" and category not in ("Ps", "Pi") and first not in _OK_START_PUNCT:
        return True
    return bool(_LIST_MARKER.match(text))


def length_in_words(task: Task, chars_per_word: float = JA_CHARS_PER_WORD) -> float:
    """The instruction's length in English words: text units, where a Japanese instruction's
    CJK characters count 1/chars_per_word each (one unit per character was 2.3× stricter)."""
    units = text_units(task.instruction)
    if task.lang != "ja":
        return float(len(units))
    cjk = sum(1 for unit in units if CJK_CHAR.fullmatch(unit))
    return len(units) - cjk + cjk / chars_per_word


class TaskFilter:
    """A pool (seeds + accepted tasks) and the Self-Instruct filters against it.

    `check` says why a task would be dropped (None: keep); `add` checks, appends a kept task
    to the pool and counts the outcome in `counts`: 'kept' and every reason, and the same per
    language as '<outcome>_<lang>' ('kept_ja', 'near_duplicate_en'), for the ledger and report.
    Only instructions are compared, as in Self-Instruct: the same instruction with another
    input is a duplicate. The input is data, not an instruction, so only a loop twice as long
    (`LOOP_REPEATS`) makes it broken text.

    Near duplicates: ROUGE-L F1 = 2·LCS / (m + n) on `similarity.dedup_units` (CJK character
    bigrams). With characters, the default 0.7 dropped 7 of 71 Japanese instructions written
    as translations of 71 English ones where words dropped 5 in English; with bigrams it drops
    the same 5 (bench/filters_on_real_text.py), so one threshold serves both languages. On the
    1,117 JCommonsenseQA validation questions it drops 20 instead of 49, mostly template
    variants (鉛筆を英語で言うと？ / 橋を英語で言うと？; in English "What is a pencil in
    English?" / "What is a bridge in English?" score 0.83 on words).
    Each pool item keeps its units and their bag; LCS <= the bag overlap, so a pair whose
    overlap bound is under the threshold is skipped without the O(m·n) LCS. Unrelated texts
    almost always stop there.
    """

    def __init__(self, pool: list[Task], config: FilterConfig | None = None):
        self.config = config or FilterConfig()
        self.counts: dict[str, int] = {"kept": 0, **{reason: 0 for reason in REASONS}}
        self._blacklist = _blacklist_pattern(self.config.blacklist)
        self.pool: list[Task] = []
        self._keys: set[str] = set()
        self._units: list[list[str]] = []
        self._bags: list[Counter] = []
        for task in pool:
            self._append(task, dedup_units(task.instruction))

    def _append(self, task: Task, units: list[str]) -> None:
        self.pool.append(task)
        self._keys.add(_normalize(task.instruction))
        self._units.append(units)
        self._bags.append(Counter(units))

    def check(self, task: Task) -> str | None:
        return self._check(task, dedup_units(task.instruction))

    def _check(self, task: Task, units: list[str]) -> str | None:
        cfg = self.config
        text = task.instruction.strip()
        if len(text_units(text)) < cfg.min_units or not text:
            return "too_short"
        if length_in_words(task, cfg.ja_chars_per_word) > cfg.max_units:
            return "too_long"
        if _broken(text) or _broken(task.input, repeats=LOOP_REPEATS["input"]):
            return "broken_text"
        if _bad_start(text):
            return "bad_start"
        if self._blacklist is not None and self._blacklist.search(text):
            return "blacklist"
        if _normalize(text) in self._keys:
            return "exact_duplicate"
        if self._near_duplicate(units):
            return "near_duplicate"
        return None

    def _near_duplicate(self, units: list[str]) -> bool:
        """Whether any pool instruction has ROUGE-L F1 >= the threshold (as similarity.rouge_l
        with units=dedup_units)."""
        threshold = self.config.max_rouge_l
        m, bag = len(units), Counter(units)
        for ref, ref_bag in zip(self._units, self._bags):
            n = len(ref)
            if not m or not n:
                if m == n:  # rouge_l scores two empty texts 1.0
                    return True
                continue
            # F1 = 2·LCS/(m+n) needs LCS >= need; LCS <= min(m, n) and <= the bag overlap.
            # The 1e-9 slack keeps float rounding from skipping a pair that sits on the threshold.
            need = threshold * (m + n) / 2 - 1e-9
            if min(m, n) < need or sum((bag & ref_bag).values()) < need:
                continue
            lcs = lcs_length(units, ref)  # >= 1: the bags share at least need > 0 units
            precision, recall = lcs / m, lcs / n  # the same float maths as similarity.rouge_l
            if 2 * precision * recall / (precision + recall) >= threshold:
                return True
        return False

    def add(self, task: Task) -> bool:
        units = dedup_units(task.instruction)
        outcome = self._check(task, units) or "kept"
        for key in (outcome, f"{outcome}_{task.lang}"):
            self.counts[key] = self.counts.get(key, 0) + 1
        if outcome != "kept":
            return False
        self._append(task, units)
        return True
