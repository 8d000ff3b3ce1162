import json
import random
from pathlib import Path

import pytest

from edgedistill.data.selfinstruct import (
    REASONS,
    FilterConfig,
    Task,
    TaskFilter,
    bootstrap_prompt,
    length_in_words,
    parse_tasks,
)
from edgedistill.data.similarity import dedup_units, detect_lang, rouge_l, text_units

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

TEACHER_EN = """\
Sure! Here are five new tasks:

4. Instruction: Summarise the customer complaint below in one sentence.
Input: The parcel arrived two weeks late and the box was crushed. Nobody answered my emails.

5. Instruction: Suggest three names for a bakery that
sells only gluten-free bread.
Input: <noinput>


6) Instruction: Sort these numbers in ascending order.
Input:
1. 42
2. 7
3. 19

7. **Instruction:** Explain the difference between weather and climate to a ten-year-old.
Input:
8. Instruction: Rewrite the sentence in the passive voice.
Input: The committee approved the budget.
Output: The budget was approved by the committee.
9. Instruction: Write a limerick about a cat who"""

TEACHER_JA = """\
４．指示：次の文章を敬語に書き換えてください。
入力：明日の会議には行けないです。

５．指示：日本の四季について、それぞれの特徴を一文ずつ説明してください。
入力：なし


６）指示：以下の商品レビューが肯定的か否定的かを分類してください。
入力：
値段の割に品質が良く、
また買いたいと思いました。

７．指示：新入社員向けに、報告・連絡・相談の大切さを
説明する短いメールを書いてください。
入力：（なし）
８．指示：
"""


def test_parse_english_teacher_output():
    tasks = parse_tasks(TEACHER_EN)
    assert [t.instruction for t in tasks] == [
        "Summarise the customer complaint below in one sentence.",
        "Suggest three names for a bakery that sells only gluten-free bread.",
        "Sort these numbers in ascending order.",
        "Explain the difference between weather and climate to a ten-year-old.",
        "Rewrite the sentence in the passive voice.",
        "Write a limerick about a cat who",  # cut mid-way but has text: kept, the filter decides
    ]
    assert tasks[0].input.startswith("The parcel arrived")
    assert tasks[1].input == "" and tasks[3].input == ""
    assert tasks[2].input == "1. 42\n2. 7\n3. 19"  # a list inside an input is not new tasks
    assert tasks[4].input == "The committee approved the budget."  # Output: is not input
    assert {t.lang for t in tasks} == {"en"}


def test_parse_japanese_full_width_numbering():
    tasks = parse_tasks(TEACHER_JA)
    assert [t.instruction for t in tasks] == [
        "次の文章を敬語に書き換えてください。",
        "日本の四季について、それぞれの特徴を一文ずつ説明してください。",
        "以下の商品レビューが肯定的か否定的かを分類してください。",
        "新入社員向けに、報告・連絡・相談の大切さを説明する短いメールを書いてください。",
    ]  # "８．指示：" was cut off with no text: dropped
    assert [t.input for t in tasks] == ["明日の会議には行けないです。", "", "値段の割に品質が良く、\nまた買いたいと思いました。", ""]
    assert {t.lang for t in tasks} == {"ja"}


def test_parse_unlabelled_list_and_noise():
    text = "以下です。\n\n1) 次の文を英語に翻訳してください：「おはよう」\n2) Name three primary colours.\n\n3）俳句を一つ作ってください。\n4)"
    tasks = parse_tasks(text)
    assert [t.instruction for t in tasks] == ["次の文を英語に翻訳してください：「おはよう」",
                                              "Name three primary colours.", "俳句を一つ作ってください。"]
    assert [t.lang for t in tasks] == ["ja", "en", "ja"]
    assert parse_tasks("") == [] and parse_tasks("I cannot help with that.") == []


def test_bootstrap_prompt_round_trips_through_parser():
    examples = [Task("Summarise this memo in one line."), Task("Translate to French.", "Good morning.\nSee you.")]
    messages = bootstrap_prompt(examples, 5, "en")
    assert [m["role"] for m in messages] == ["user"]
    content = messages[-1]["content"]
    assert "1. Instruction: Summarise this memo in one line.\nInput: <noinput>" in content
    assert "tasks 3 to 7" in content
    assert parse_tasks(content) == examples  # the format asked for is the one parse_tasks reads


def test_bootstrap_prompt_japanese_wording():
    examples = [Task("次の文を要約してください。", "", "ja"), Task("敬語に直してください。", "行けないです。", "ja")]
    content = bootstrap_prompt(examples, 3, "ja")[-1]["content"]
    assert "3番から5番" in content and "日本語" in content
    assert "1. 指示：次の文を要約してください。\n入力：なし" in content
    assert "Instruction" not in content
    assert parse_tasks(content) == examples
    assert "language of the examples" in bootstrap_prompt(examples, 3, "zh")[-1]["content"]


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        pytest.skip(f"{path} not present")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _near_copy(text: str) -> str:
    """Change two characters in the middle (ASCII letters stay letters so words stay words)."""
    chars = list(text)
    for i in (len(chars) // 2, len(chars) // 2 + 2):
        chars[i] = "ぬ" if not chars[i].isascii() else ("q" if chars[i] != "q" else "z")
    return "".join(chars)


def _survival(texts: list[tuple[str, str]]) -> TaskFilter:
    pool = [Task("Summarise this memo in one line."), Task("次の文を要約してください。", lang="ja")]
    flt = TaskFilter(pool, FilterConfig())
    for instruction, extra in texts:
        flt.add(Task(instruction, extra, detect_lang(instruction)))
    return flt


def test_filter_keeps_distinct_japanese_questions():
    rows = _read_jsonl(SHARED / "jcommonsenseqa" / "valid-v1.3.jsonl")[:200]
    questions = list(dict.fromkeys(r["question"] for r in rows))
    flt = _survival([(q, "") for q in questions])
    assert flt.counts["kept"] >= 0.9 * len(questions), flt.counts  # upstream keeps 0 of them
    assert sum(flt.counts[k] for k in ("kept", *REASONS)) == len(questions)
    assert sum(n for k, n in flt.counts.items() if k.endswith("_ja")) == len(questions)  # each counted once more, as ja

    question = max(questions[:20], key=len)
    assert flt.check(Task(question, lang="ja")) == "exact_duplicate"
    assert flt.check(Task(" " + question.replace("？", "?") + " ", lang="ja")) == "exact_duplicate"  # NFKC
    copy = _near_copy(question)
    assert copy != question and rouge_l(copy, question, units=dedup_units) >= 0.7
    assert flt.check(Task(copy, lang="ja")) == "near_duplicate"


def test_filter_keeps_distinct_english_seeds():
    rows = _read_jsonl(SHARED / "self-instruct" / "seed_tasks.jsonl")[:200]
    tasks = [(r["instruction"], r["instances"][0]["input"]) for r in rows]
    flt = _survival(tasks)
    assert flt.counts["kept"] >= 0.9 * len(tasks), flt.counts

    instruction = max((t for t, _ in tasks[:20]), key=len)
    assert flt.check(Task(instruction.upper())) == "exact_duplicate"
    assert flt.check(Task(_near_copy(instruction))) == "near_duplicate"


def test_near_duplicate_matches_rouge_l_reference():
    # The pruned search must give the same verdict as similarity.rouge_l (on its bigram units) on every pair.
    rng = random.Random(0)
    words = "write a short story poem about the cat dog sea list three ways to explain why how".split()
    kana = list("あいうえおかきくけこさしすせそたちつてとなにぬねの")
    texts = [" ".join(rng.choices(words, k=rng.randint(3, 12))) for _ in range(60)]
    texts += ["".join(rng.choices(kana, k=rng.randint(3, 20))) for _ in range(60)]
    for threshold in (0.5, 0.7):
        for _ in range(400):
            cand, ref = rng.sample(texts, 2)
            flt = TaskFilter([Task(ref)], FilterConfig(max_rouge_l=threshold, min_units=1))
            expected = rouge_l(cand, ref, units=dedup_units) >= threshold
            assert (flt.check(Task(cand)) == "near_duplicate") == expected, (cand, ref)


def test_blacklist_english_whole_words_japanese_substrings():
    flt = TaskFilter([], FilterConfig())
    for text in ["Draw a picture of a sunset over the sea.", "Describe the IMAGE below in detail.",
                 "Open the file and count its lines.", "Go to the website and list its products.",
                 "この画像に写っている物を説明してください。", "売上の推移をグラフにしてください。",
                 "猫の絵を描いてください。", "東京駅までの地図を作ってください。"]:
        assert flt.check(Task(text, lang=detect_lang(text))) == "blacklist", text
    assert flt.check(Task("Explain what a hash map is used for.")) == "blacklist"  # as upstream: a word is a word
    for text in ["Explain the profile of a typical customer.", "Summarise the drawbacks of remote work.",
                 "Describe imagery used in this poem.", "Write a story about a mapmaker.",
                 "好きな季節とその理由を書いてください。"]:
        assert flt.check(Task(text, lang=detect_lang(text))) is None, text


def test_lengths_in_cjk_units_and_bad_starts():
    flt = TaskFilter([], FilterConfig(min_units=3, max_units=20))
    assert len(text_units("要約")) == 2
    assert flt.check(Task("要約", lang="ja")) == "too_short"
    assert flt.check(Task("要約せよ", lang="ja")) is None  # 4 characters = 4 units
    assert flt.check(Task("Summarise it", lang="en")) == "too_short"  # 2 words
    kana = "あいうえお" * 9  # 45 characters, no piece of 1-4 repeated
    assert flt.check(Task(kana + "かき", lang="ja")) == "too_long"  # 47 / 2.3 = 20.4 English words
    assert flt.check(Task(kana, lang="ja")) is None  # 45 / 2.3 = 19.6
    assert length_in_words(Task("次のPython関数を直して", lang="ja")) == pytest.approx(1 + 8 / 2.3)  # Python stays 1 word
    assert flt.check(Task("word " * 21)) == "too_long" and flt.check(Task("word " * 20)) is None
    assert flt.check(Task("", lang="en")) == "too_short"
    assert flt.check(Task("- List three fruits.")) == "bad_start"
    assert flt.check(Task("3. List three fruits.")) == "bad_start"  # a leftover list marker
    assert flt.check(Task("３．果物を三つ挙げてください。", lang="ja")) == "bad_start"
    assert flt.check(Task("「こんにちは」を英語に訳してください。", lang="ja")) is None  # non-ASCII start is fine
    assert flt.check(Task('"Hello" means what in French?')) is None
    assert flt.check(Task("2023年に起きた出来事を三つ挙げてください。", lang="ja")) is None


def test_add_grows_pool_and_counts_every_reason():
    flt = TaskFilter([Task("Summarise this memo in one line.")], FilterConfig())
    outcomes = [flt.add(Task(t, lang=detect_lang(t))) for t in [
        "次の文章を敬語に書き換えてください。",
        "次の文章を敬語に書き換えてください。",   # now in the pool
        "次の文章を丁寧語に書き換えてください。",  # a near copy of the one just kept
        "summarise  this MEMO in one line.",
        "Plot the data.", "Hi", "* Name a colour, please.", "word " * 200,
        "Describe the colour \ufffd of the sea.",
        "List three ways to save energy at home.",
    ]]
    assert outcomes == [True, False, False, False, False, False, False, False, False, True]
    assert flt.counts == {"kept": 2, "too_short": 1, "too_long": 1, "broken_text": 1, "bad_start": 1,
                          "blacklist": 1, "exact_duplicate": 2, "near_duplicate": 1,
                          "kept_ja": 1, "exact_duplicate_ja": 1, "near_duplicate_ja": 1, "exact_duplicate_en": 1,
                          "blacklist_en": 1, "too_short_en": 1, "bad_start_en": 1, "too_long_en": 1,
                          "broken_text_en": 1, "kept_en": 1}
    assert len(flt.pool) == 3


def test_config_is_validated():
    with pytest.raises(ValueError):
        FilterConfig(max_rouge_l=0)
    with pytest.raises(ValueError):
        FilterConfig(min_units=10, max_units=5)


def test_check_against_500_item_pool():
    # No timing assert; the pruning (length and bag-of-units bounds on LCS) keeps this ~1 ms.
    rng = random.Random(1)
    verbs = ["Write", "Explain", "List", "Summarise", "Classify", "Translate", "Describe", "Compare"]
    nouns = "cats dogs rivers taxes bread trains clouds laws songs tea rice code bugs".split()
    pool = [Task(f"{rng.choice(verbs)} {' '.join(rng.choices(nouns, k=rng.randint(3, 25)))} {i}")
            for i in range(250)]
    pool += [Task("".join(rng.choices("あいうえおかきくけこ東京大阪名古屋要約説明", k=rng.randint(5, 60))) + str(i), lang="ja")
             for i in range(250)]
    flt = TaskFilter(pool, FilterConfig())
    assert flt.check(Task("Explain why the sky is blue to a child.")) is None
    assert flt.check(pool[-1]) == "exact_duplicate"
    assert flt.check(Task(pool[7].instruction + " please")) == "near_duplicate"


def test_broken_text_from_a_small_teacher_is_dropped():
    flt = TaskFilter([], FilterConfig())
    for broken in ("Translate this sentence into Fren\ufffd", "次のワーワーワーワーワーを説明してください。",
                   "Summarize\x07 the text", "Explain the the the the the the sky", "説明ののののののしてください。",
                   "Summarise \x85the text"):
        assert flt.check(Task(broken)) == "broken_text", broken
    assert flt.check(Task("Describe the photo.", input="caf\ufffd")) == "broken_text"
    assert flt.check(Task("Summarise the chat.", input="A: ok\x00\x00")) == "broken_text"
    for fine in ("Convert 10000000 yen to dollars at 150 yen per dollar.", "「ありがとう」を英語に訳してください。",
                 "Write a haiku about autumn... then explain it.", "Explain why!!!!!! the sky is blue"):
        assert flt.check(Task(fine)) is None, fine


# The examples: each was broken_text before (a piece of 1-4 characters repeated 5 times).
LAYOUT_INSTRUCTIONS = [
    "回答を2つ書き、アスタリスク6個（******）で区切ってください。",
    "Separate the two answers with a line of six asterisks (******).",
    "Put each title between lines of equals signs (=====) and use a rule like |---|---|---|.",
]
LAYOUT_INPUTS = [
    "def f(x):\n        return x",
    "5 3 . | . 7 . | . . .\n6 . . | 1 9 5 | . . .\n----------------------\n8 . . | . 6 . | . . 3",
    "| 地域 | 売上 |\n|------|-----:|\n| 北部 | 12,400 |",
    "よろしくお願いいたします。\n━━━━━━━━━━━━━━━━\n株式会社ミナト物流\nーーーーーーーーーーーーーーーー",
    "氏名\t月\t火\t水\t木\t金\n田中\t9:00\t\t\t\t\r\n",  # empty TSV cells, a Windows line end
    "   +-----------+\n   |    CEO    |\n   +-----+-----+",
    "第1章　はじめに……………………1\n第2章　市場………………………4",
    "body {\n        background: #ffffff;\n}",  # one ASCII letter drawn out is not a loop
    "Sooooo good!!! Hmmmmm, the case scratches ｗｗｗｗｗｗ",
    "来訪者：〇〇〇〇様　＿＿＿＿＿＿＿＿　★★★★☆",
    "ははははは、それは面白いですね。",  # laughter in a chat log: 5 times is data, not a loop
]


def test_layout_in_instructions_and_inputs_is_not_broken_text():
    flt = TaskFilter([], FilterConfig())
    wrong = [text for text in LAYOUT_INSTRUCTIONS if flt.check(Task(text, lang=detect_lang(text))) is not None]
    wrong += [text for text in LAYOUT_INPUTS if flt.check(Task("Summarise the text below.", input=text)) is not None]
    assert wrong == []


def test_an_input_is_broken_only_by_a_loop_twice_as_long():
    flt = TaskFilter([], FilterConfig())
    assert flt.check(Task("ははははは、面白いですね。", lang="ja")) == "broken_text"  # 5 in an instruction
    assert flt.check(Task("Summarise the text below.", input="ははははは" * 2)) == "broken_text"  # 10 in an input
    assert flt.check(Task("Summarise the text below.", input="ワー" * 9)) is None
    assert flt.check(Task("Summarise the text below.", input="ワー" * 10)) == "broken_text"


# One instruction written in both languages (bench/data/business_instructions.jsonl, long-policy):
# 90 English words, 175 Japanese characters + 9 Latin words and numbers.
POLICY_EN = ("Draft a one-page remote work policy for a company of about 120 people. It should cover who is eligible "
             "(everyone after a three-month probation period), the core hours when people must be reachable (10:00 to "
             "15:00 Japan time), how equipment is provided and returned, what happens with confidential documents at "
             "home, how to report a security incident within 24 hours, and how managers review the arrangement every "
             "six months. Use numbered sections and plain language, and add a short FAQ with three questions at the end.")
POLICY_JA = ("従業員約120名の会社向けに、1ページのリモートワーク規程の草案を作成してください。対象者（3か月の試用期間を終えた全員）、"
             "連絡が取れなければならないコアタイム（日本時間10時〜15時）、機器の貸与と返却の方法、自宅での機密文書の扱い、"
             "セキュリティ事故を24時間以内に報告する手順、上司が6か月ごとに運用を見直す方法を含めてください。"
             "番号付きの章立てと平易な言葉を使い、最後に3問の簡単なFAQを付けてください。")


def test_the_length_cap_is_the_same_for_one_instruction_in_both_languages():
    assert (len(text_units(POLICY_EN)), len(text_units(POLICY_JA))) == (90, 184)  # 184 > 150: Japanese was too_long
    flt = TaskFilter([], FilterConfig())
    assert flt.check(Task(POLICY_EN)) is None
    assert flt.check(Task(POLICY_JA, lang="ja")) is None
    assert length_in_words(Task(POLICY_JA, lang="ja")) == pytest.approx(9 + 175 / 2.3)  # 85.1 words against 90
    short = FilterConfig(max_units=80)  # a cap between the two measures drops both
    assert TaskFilter([], short).check(Task(POLICY_EN)) == "too_long"
    assert TaskFilter([], short).check(Task(POLICY_JA, lang="ja")) == "too_long"


def test_a_shared_japanese_clause_does_not_make_different_requests_duplicates():
    # The same clause in English (7 of ~16 words) and Japanese (19 of ~35 characters): character
    # ROUGE-L 0.72 / 0.74 dropped the second and third Japanese request; English words score 0.47 / 0.44.
    clause_en, clause_ja = "Output only the answer, with no explanation: ", "回答のみを出力してください。説明は不要です："
    asks = [("how many minutes are 3 hours and 20 minutes?", "3時間20分は何分ですか。"),
            ("which city is the capital of Australia?", "オーストラリアの首都はどこですか。"),
            ("what day of the week was 1 January 2024?", "2024年1月1日は何曜日でしたか。")]
    flt = TaskFilter([], FilterConfig())
    kept = [flt.add(Task(clause_en + en)) for en, _ in asks] + [flt.add(Task(clause_ja + ja, lang="ja")) for _, ja in asks]
    assert kept == [True] * 6
    assert rouge_l(clause_ja + asks[1][1], clause_ja + asks[0][1]) >= 0.7  # what characters said
    # A real near copy is still one: one word changed.
    assert flt.check(Task(clause_ja + "3時間20分は何秒ですか。", lang="ja")) == "near_duplicate"
    assert flt.check(Task(clause_en + "how many seconds are 3 hours and 20 minutes?")) == "near_duplicate"
    assert (flt.counts["kept_en"], flt.counts["kept_ja"]) == (3, 3)


def test_parser_rules_for_blank_lines_next_numbers_and_lists_inside_inputs():
    text = ("1. Instruction: Translate the greeting into French.\n"
            "\n"
            "Input: Good morning.\n"           # an input after a blank line still belongs to item 1
            "\n"
            "2. Instruction: Name three colours.\n"
            "3. Write a haiku about rain.\n"    # unlabelled, but the next number right after an instruction
            "4) Instruction: Sort the list.\n"
            "Input:\n"
            "3. pears\n"                        # inside an input: list lines, even the next number (5)
            "5. apples\n"
            "5. Instruction: Count the words.\n"
            "Output:\n"
            "6. one\n"                          # inside an output: skipped, even as the next number
            "7. Instruction: Explain tides.\n"
            "\n"
            "This is chatter after a blank line.\n"
            "9. Summarise the paragraph.\n"    # unlabelled and not the next number: not a task
            "10. Instruction: Fix the code.\n"
            "Input:\n"
            "def f(x):\n"
            "    return x  \n"                 # indentation kept, trailing spaces not
            "11. Instruction: Define erosion.\n"
            "\n"
            "12. Name two rivers.\n")          # the next number after a blank line: a task
    assert parse_tasks(text) == [Task("Translate the greeting into French.", "Good morning."),
                                 Task("Name three colours."), Task("Write a haiku about rain."),
                                 Task("Sort the list.", "3. pears\n5. apples"), Task("Count the words."),
                                 Task("Explain tides."), Task("Fix the code.", "def f(x):\n    return x"),
                                 Task("Define erosion."), Task("Name two rivers.")]
    # Without labels a new task needs a higher number; a lower or the same one continues the instruction.
    assert parse_tasks("1) Name a fruit.\n3) Name a tree.\n2) Name a bird.\n3) Name a fish.\n") == [
        Task("Name a fruit."), Task("Name a tree. 2) Name a bird. 3) Name a fish.")]


def test_near_duplicate_threshold_is_inclusive_at_exactly_0_7():
    # 10 words each, 7 in common in order (Write a … about the … for … children): ROUGE-L F1 =
    # 2·(7/10)·(7/10) / (7/10 + 7/10) = 0.7 exactly, which Self-Instruct drops (>= 0.7).
    pool = [Task("Write a short poem about the sea for young children")]
    at_threshold = Task("Write a long story about the sea for sleepy children")
    assert rouge_l(at_threshold.instruction, pool[0].instruction, units=dedup_units) == 0.7
    assert TaskFilter(pool, FilterConfig()).check(at_threshold) == "near_duplicate"
    assert TaskFilter(pool, FilterConfig(max_rouge_l=0.71)).check(at_threshold) is None
    # one more word changed: 6 in common, F1 0.6, kept
    assert TaskFilter(pool, FilterConfig()).check(Task("Write a long story about the lake for sleepy children")) is None


def test_near_duplicate_needs_the_words_in_order_and_looks_past_pruned_pool_entries():
    ref = "Write a short poem about the sea for young children"
    # the same ten words, the last five reversed: all of them shared, but only 6 in order
    shuffled = Task("Write a short poem about children young for sea the")
    assert rouge_l(shuffled.instruction, ref, units=dedup_units) == pytest.approx(0.6)
    assert TaskFilter([Task(ref)], FilterConfig()).check(shuffled) is None
    # the pool entry that matches comes after ones that share nothing (skipped without an LCS)
    pool = [Task("Name three rivers in Africa"), Task("Translate this sentence into French"), Task(ref)]
    assert TaskFilter(pool, FilterConfig()).check(Task("Write a long story about the sea for sleepy children")) \
        == "near_duplicate"


def test_a_loop_of_every_kind_of_letter_is_a_loop():
    from edgedistill.data.selfinstruct import _is_loop

    # upper, title (ǅ), lower case, kana (Lo) and the long-vowel mark (Lm): letters only, a loop
    assert _is_loop("Aǅaあー") and not _is_loop("ーー") and not _is_loop("a1")


def test_bad_settings_are_named_with_their_value():
    for kwargs, message in [({"max_rouge_l": 0}, r"^max_rouge_l must be in \(0, 1\], got 0$"),
                            ({"max_rouge_l": 1.5}, r"^max_rouge_l must be in \(0, 1\], got 1.5$"),
                            ({"min_units": 10, "max_units": 5}, r"^need 0 <= min_units <= max_units, got 10, 5$"),
                            ({"min_units": -1}, r"^need 0 <= min_units <= max_units, got -1, 150$"),
                            ({"ja_chars_per_word": 0}, r"^ja_chars_per_word must be > 0, got 0$")]:
        with pytest.raises(ValueError, match=message):
            FilterConfig(**kwargs)
    FilterConfig(max_rouge_l=1.0, min_units=0, max_units=0)  # the bounds themselves are allowed
    with pytest.raises(ValueError, match=r"^n_new must be >= 1, got 0$"):
        bootstrap_prompt([Task("Summarise this memo.")], 0, "en")


def test_bootstrap_prompt_golden_text():
    examples = [Task("Summarise this memo."), Task("Translate to French.", "Good morning.\nSee you."),
                Task("Fix the typo.", "Teh cat.")]
    assert bootstrap_prompt(examples, 1, "en") == [{"role": "user", "content": (
        "Come up with 1 new, diverse tasks for a text-only AI assistant. The numbered tasks below are examples; "
        "continue the list with tasks 4 to 4.\n\nRequirements:\n"
        "- Do not repeat the examples, and try not to repeat the same verb twice.\n"
        "- Mix kinds of task: open questions, explanation, summarising, rewriting, classification, extraction, "
        "reasoning, planning, writing, coding.\n"
        "- Each instruction is one or two sentences and can be done by a model that only reads and writes text: "
        "nothing that needs images, audio, files, maps or the internet.\n"
        "- Give an input (a concrete text, list or data the instruction works on) only when the task needs one; "
        'otherwise write "<noinput>".\n'
        "- Write every task in English.\n"
        '- Use exactly the format of the examples: "N. Instruction: ..." then "Input: ..." on the next line. '
        "Write only the list, nothing before or after it.\n\n"
        "1. Instruction: Summarise this memo.\nInput: <noinput>\n\n"
        "2. Instruction: Translate to French.\nInput:\nGood morning.\nSee you.\n\n"  # multi-line: below its label
        "3. Instruction: Fix the typo.\nInput: Teh cat.\n")}]  # one line: on the label's line
    other = bootstrap_prompt(examples, 2, "zh")[0]["content"]
    assert "- Write every task in the language of the examples.\n" in other and "in English" not in other
    ja = [Task("要約してください。", "", "ja"), Task("敬語に直してください。", "行けないです。", "ja")]
    assert bootstrap_prompt(ja, 2, "ja") == [{"role": "user", "content": (
        "テキストだけを扱うAIアシスタント向けに、新しく多様なタスクを2個作ってください。下の番号付きのタスクは例です。"
        "続けて3番から4番までを書いてください。\n\n条件：\n"
        "- 例と同じタスクを繰り返さず、同じ動詞もなるべく繰り返さないこと。\n"
        "- 質問、説明、要約、書き換え、分類、抽出、推論、計画、作文、プログラミングなど、種類を混ぜること。\n"
        "- 指示は1〜2文で、文章を読み書きするだけのモデルが実行できるものにすること。画像・音声・ファイル・地図・"
        "インターネットが必要なタスクは不可。\n"
        "- 入力（指示の対象となる具体的な文章・リスト・データ）はタスクに必要な場合だけ書き、不要なら「なし」と書くこと。\n"
        "- すべて日本語で書くこと。\n"
        "- 例と同じ形式（「N. 指示：…」、次の行に「入力：…」）で、リストだけを出力すること。前置きや補足は不要です。\n\n"
        "1. 指示：要約してください。\n入力：なし\n\n2. 指示：敬語に直してください。\n入力：行けないです。\n")}]
    ja_multiline = bootstrap_prompt([Task("要約してください。", "一行目\n二行目", "ja")], 1, "ja")[0]["content"]
    assert ja_multiline.endswith("1. 指示：要約してください。\n入力：\n一行目\n二行目\n")


def test_wrapped_instruction_lines_join_with_a_space_except_between_wide_characters():
    text = ("1. 指示：次のPython\n関数を説明してください。\n\n"  # ASCII then CJK: a space
            "2. 指示：次の変数A\nを説明してください。\n\n"       # ends in ASCII after CJK: a space
            "3. 指示：次の変数\nAを説明してください。\n\n"        # starts with ASCII then CJK: a space
            "4. 指示：次の文を要約してください\n（三行以内）。\n\n"  # full-width bracket: wide, no space
            "5. 指示：\n二つの文を比べて\nください。\n入力：なし。\n\n"  # text below an empty label; なし。 is no input
            "6. Instruction: Describe the sea.\nInput: None.\n")
    assert [(t.instruction, t.input) for t in parse_tasks(text)] == [
        ("次のPython 関数を説明してください。", ""), ("次の変数A を説明してください。", ""),
        ("次の変数 Aを説明してください。", ""), ("次の文を要約してください（三行以内）。", ""),
        ("二つの文を比べてください。", ""), ("Describe the sea.", "")]


def test_letter_loops_in_an_instruction_are_broken_but_number_signs_and_rules_are_not():
    flt = TaskFilter([], FilterConfig())
    for broken in ("Explain ABABABABAB to me.",  # capitals, two letters
                   "Explain ßßßßß to me.",       # one letter, but not ASCII (its capital is SS)
                   "Explain ǅǅǅǅǅ to me."):       # a titlecase letter
        assert flt.check(Task(broken)) == "broken_text", broken
    for fine in ("来訪者の欄に〇〇〇〇〇様と書いてください。",  # 〇 is a number sign (Nl), not a letter
                 "見出しの下にーーーーーの線を引いてください。",  # the prolonged-sound mark alone is a rule
                 "Explain the Roman numerals ⅫⅪⅫⅪⅫⅪⅫⅪⅫⅪ."):  # letter-numbers (Nl), not letters
        assert flt.check(Task(fine, lang=detect_lang(fine))) is None, fine


def test_near_duplicate_edge_cases_empty_units_and_one_word():
    loose = FilterConfig(min_units=0)
    # "()" has no units (brackets are punctuation): against texts with units it is nothing alike,
    # against another text without units it is a copy (rouge_l scores two empty texts 1.0).
    assert TaskFilter([Task("Write a poem about the sea.")], loose).check(Task("()")) is None
    assert TaskFilter([Task("[]")], loose).check(Task("()")) == "near_duplicate"
    # An empty pool item is skipped, not the end of the search.
    pool = [Task("[]"), Task("Write a short poem about the sea for young children")]
    assert TaskFilter(pool, loose).check(Task("Write a long story about the sea for sleepy children")) == "near_duplicate"
    # One word each, the same word: F1 = 1.
    assert TaskFilter([Task("Summarise")], FilterConfig(min_units=1)).check(Task("Summarise!")) == "near_duplicate"


def test_filter_settings_reach_the_checks():
    # ja_chars_per_word from the settings, not the default 2.3: 21 characters are 21 words at 1.0.
    text = "あいうえおかきくけこさしすせそたちつてとな"
    assert TaskFilter([], FilterConfig(max_units=20, ja_chars_per_word=1.0)).check(Task(text, lang="ja")) == "too_long"
    assert TaskFilter([], FilterConfig(max_units=20)).check(Task(text, lang="ja")) is None
    assert TaskFilter([], FilterConfig(blacklist=())).check(Task("Draw a picture of a cat.")) is None  # no list, no drop
    FilterConfig(ja_chars_per_word=0.5)  # any positive ratio
    # an opening or initial quote may start an instruction; other punctuation may not
    flt = TaskFilter([], FilterConfig())
    assert flt.check(Task("“Hello” means what in French?")) is None and flt.check(Task("«Bonjour» means what?")) is None
    assert flt.check(Task("” Hello means what in French?")) == "bad_start"  # a final quote (Pf)


def test_kept_tasks_join_the_pool_and_no_input_is_read_in_its_spelled_out_forms():
    flt = TaskFilter([Task("Summarise this memo in one line.")], FilterConfig())
    assert flt.add(Task("List three ways to save energy at home.", "no input"))
    assert flt.pool == [Task("Summarise this memo in one line."), Task("List three ways to save energy at home.", "no input")]
    tasks = parse_tasks("1. Instruction: Name a colour.\nInput: No input\n2. Instruction: Name a fruit.\nInput: 入力なし\n")
    assert [t.input for t in tasks] == ["", ""]
