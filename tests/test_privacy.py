"""PII scrubbing before prompts reach a remote teacher: what must go, and what must survive.

Expected strings are written from the spec by hand. Check digits were worked out on paper:
Luhn for the cards (the usual network test numbers), and the My Number formula of
平成26年総務省令第85号 第5条 for 123456789018 (sum 212, mod 11 = 3, check 8) and 983205673214.
"""

from __future__ import annotations

import copy

import pytest

from edgedistill.data.privacy import (
    PII_TYPES,
    PiiSpan,
    ScrubResult,
    find_pii,
    scrub,
    scrub_messages,
)

CUSTOMER_MAIL_JA = (
    "件名: 注文番号 A-2024-000123 の配送先変更について\n"
    "いつもお世話になっております。山田です。\n"
    "配送先を〒150-0001 東京都渋谷区神宮前1-2-3 に変更してください。\n"
    "日中は090-1234-5678、会社は03-1234-5678（内線 204）までご連絡ください。\n"
    "返信は yamada.taro@example.co.jp までお願いします。\n"
    "（2026/11/28 14:30 送信）"
)
CUSTOMER_MAIL_JA_SCRUBBED = (
    "件名: 注文番号 A-2024-000123 の配送先変更について\n"
    "いつもお世話になっております。山田です。\n"
    "配送先を[POSTAL_CODE] 東京都渋谷区神宮前1-2-3 に変更してください。\n"
    "日中は[PHONE]、会社は[PHONE]（内線 204）までご連絡ください。\n"
    "返信は [EMAIL] までお願いします。\n"
    "（2026/11/28 14:30 送信）"
)

RINGI_MEMO_JA = (
    "稟議書 R-2026-0117\n"
    "件名: 海外ベンダーへの初回支払い\n"
    "金額: ¥1,260,000（税込 1,260,000円、前年比 12.5% 増）\n"
    "支払方法: 法人カード 4111-1111-1111-1111\n"
    "源泉徴収用 個人番号: 1234 5678 9018\n"
    "申請者連絡先: 〒060-0001 札幌市中央区北1条西2丁目 ／ ０１１－２３４－５６７８\n"
    "承認期限: 令和8年11月28日\n"
    "品目: SKU-4412-889 ×3"
)
RINGI_MEMO_JA_SCRUBBED = (
    "稟議書 R-2026-0117\n"
    "件名: 海外ベンダーへの初回支払い\n"
    "金額: ¥1,260,000（税込 1,260,000円、前年比 12.5% 増）\n"
    "支払方法: 法人カード [CREDIT_CARD]\n"
    "源泉徴収用 個人番号: [MY_NUMBER]\n"
    "申請者連絡先: [POSTAL_CODE] 札幌市中央区北1条西2丁目 ／ [PHONE]\n"
    "承認期限: 令和8年11月28日\n"
    "品目: SKU-4412-889 ×3"
)

SUPPORT_TICKET_EN = (
    "Ticket #58213: checkout fails after upgrading to v1.2.3\n"
    "From: Jane Doe <jane.doe+billing@example.com>, +1 415 555 0132\n"
    "Order ORD-20261128-0042 ($4,999.00) was charged to card 5555 5555 5555 4444.\n"
    "Log: 2026-11-28T14:30:12Z ERROR payment 203.0.113.42 -> 10.0.0.7:8443 timeout after 99.9% of 30s\n"
    "Escalated to our London desk: +44 20 7946 0958."
)
SUPPORT_TICKET_EN_SCRUBBED = (
    "Ticket #58213: checkout fails after upgrading to v1.2.3\n"
    "From: Jane Doe <[EMAIL]>, [PHONE]\n"
    "Order ORD-20261128-0042 ($4,999.00) was charged to card [CREDIT_CARD].\n"
    "Log: 2026-11-28T14:30:12Z ERROR payment [IPV4] -> [IPV4]:8443 timeout after 99.9% of 30s\n"
    "Escalated to our London desk: [PHONE]."
)

DOCUMENTS = [
    (CUSTOMER_MAIL_JA, CUSTOMER_MAIL_JA_SCRUBBED, {"email": 1, "phone": 2, "postal_code": 1}),
    (RINGI_MEMO_JA, RINGI_MEMO_JA_SCRUBBED, {"credit_card": 1, "my_number": 1, "phone": 1, "postal_code": 1}),
    (SUPPORT_TICKET_EN, SUPPORT_TICKET_EN_SCRUBBED, {"email": 1, "phone": 2, "credit_card": 1, "ipv4": 2}),
]


@pytest.mark.parametrize("text,expected,counts", DOCUMENTS, ids=["mail_ja", "ringi_ja", "ticket_en"])
def test_business_documents(text, expected, counts):
    result = scrub(text)
    assert result.text == expected
    assert result.counts == counts


@pytest.mark.parametrize("text", [doc for doc, _, _ in DOCUMENTS]
                         + ["03-1234-5678 1234 5678 9018", "連絡は 090-1234-5678 か a@b.jp へ"])
def test_idempotent(text):
    once = scrub(text)
    twice = scrub(once.text)
    assert twice.text == once.text
    assert sum(twice.counts.values()) == 0


def test_neighbouring_items_are_both_replaced():
    # The My Number is guarded by the phone's digits until the phone is gone; both are PII.
    assert scrub("03-1234-5678 1234 5678 9018").text == "[PHONE] [MY_NUMBER]"


@pytest.mark.parametrize("phone", [
    "03-1234-5678", "090-1234-5678", "0120-123-456", "(03)1234-5678", "0312345678", "09012345678",
    "03 1234 5678", "+81 3-1234-5678", "+81-90-1234-5678", "+81 (0)3-1234-5678",
    "+1 415 555 0132", "+1 (415) 555-0132", "+44 20 7946 0958",
])
def test_phone_formats(phone):
    for template in ("連絡先: {} まで", "電話{}まで", "call {} today", "Tel.{}", "(tel {}) paid", "（{}）"):
        result = scrub(template.format(phone))
        assert result.text == template.format("[PHONE]"), phone
        assert result.counts == {"phone": 1}


def test_full_width_digits_match_but_surroundings_stay_full_width():
    assert scrub("お電話は０３－１２３４－５６７８まで").text == "お電話は[PHONE]まで"
    result = scrub("ＴＥＬ：０９０－１２３４－５６７８／ＦＡＸ：（０３）１２３４－５６７９")
    assert result.text == "ＴＥＬ：[PHONE]／ＦＡＸ：[PHONE]"
    assert result.counts == {"phone": 2}
    assert scrub("０３　１２３４　５６７８").text == "[PHONE]"  # ideographic spaces
    assert scrub("〒１５０－０００１ 東京都").text == "[POSTAL_CODE] 東京都"
    assert scrub("個人番号１２３４５６７８９０１８です").text == "個人番号[MY_NUMBER]です"
    assert scrub("カード４１１１　１１１１　１１１１　１１１１").text == "カード[CREDIT_CARD]"


@pytest.mark.parametrize("card", [
    "4111111111111111", "4111 1111 1111 1111", "4111-1111-1111-1111",  # Visa test number
    "5555555555554444",                                                  # Mastercard test number
    "378282246310005", "3782 822463 10005",                              # Amex, 4-6-5
    "4222222222222",                                                     # 13 digits
    "4111111111111111110", "4111 1111 1111 1111 110",                    # 19 digits
])
def test_luhn_valid_cards_are_replaced(card):
    result = scrub(f"Card: {card}.")
    assert result.text == "Card: [CREDIT_CARD]."
    assert result.counts == {"credit_card": 1}


@pytest.mark.parametrize("number", ["4111111111111112", "4111 1111 1111 1112", "4111-1111-1111-1112",
                                    "4111111111111111111"])
def test_luhn_invalid_numbers_survive(number):
    assert scrub(f"Card: {number}.") == ScrubResult(f"Card: {number}.", {})


def test_a_card_number_has_13_to_19_digits_luhn_or_not():
    from edgedistill.data.privacy import _is_card, _luhn_valid

    assert _luhn_valid("12345678901234567894") and not _is_card("12345678901234567894")  # 20 digits
    assert _luhn_valid("1234567890123456785") and _is_card("1234567890123456785")  # 19 digits
    assert _luhn_valid("4222222222222") and not _is_card("422222222222")  # 13 yes, 12 no


@pytest.mark.parametrize("number", [
    "123456789018", "1234 5678 9018", "1234-5678-9018",
    "983205673214",
    "123456789000",  # remainder 1 -> check digit 0
    "123456789050",  # remainder 0 -> check digit 0
])
def test_valid_my_numbers_are_replaced(number):
    result = scrub(f"マイナンバー: {number}")
    assert result.text == "マイナンバー: [MY_NUMBER]"
    assert result.counts == {"my_number": 1}


@pytest.mark.parametrize("last", [d for d in "0123456789" if d != "8"])
def test_wrong_my_number_check_digit_survives(last):
    text = f"マイナンバー: 12345678901{last}"
    assert scrub(text) == ScrubResult(text, {})


@pytest.mark.parametrize("text", ["〒123-4567", "123-4567", "〒1234567", "〒 123-4567", "〒123ー4567"])
def test_postal_codes(text):
    result = scrub(f"住所 {text} 東京都")
    assert result.text == "住所 [POSTAL_CODE] 東京都"
    assert result.counts == {"postal_code": 1}


@pytest.mark.parametrize("ip", ["192.168.0.1", "0.0.0.0", "255.255.255.255", "203.0.113.42"])
def test_ipv4(ip):
    result = scrub(f"host={ip}:8080 down")
    assert result.text == "host=[IPV4]:8080 down"
    assert result.counts == {"ipv4": 1}


@pytest.mark.parametrize("email", ["taro@example.co.jp", "jane.doe+billing@mail.example.com", "a_1@b-c.org"])
def test_emails(email):
    result = scrub(f"連絡先は{email}です")
    assert result.text == "連絡先は[EMAIL]です"
    assert result.counts == {"email": 1}


FALSE_POSITIVES = [
    "2026-11-28", "2026/11/28", "令和8年11月28日", "14:30", "14:30:12",
    "注文番号 A-2024-000123", "ORD-20261128-0042",
    "¥1,260,000", "1,260,000円", "$4,999.00",
    "123456789012",            # My Number with a wrong check digit (should be 8)
    "1234 5678 9012",
    "4111111111111112",        # 16 digits failing Luhn
    "v1.2.3", "1.2.3", "version 10.0.19045.2965",
    "12.5%", "99.9%", "100%",
    "SKU-4412-889", "SKU-441-2889",
    "注文番号 1234567", "order 1234567",  # plain 7 digits: not a postal code without 〒 or hyphen
    "256.1.1.1", "10.0.0.256", "1.2.3.4.5",
    "0312345678901",           # 13 digits: too long for a phone, fails Luhn
    "ORD-0312345678",
    "+20 30",
]


@pytest.mark.parametrize("text", FALSE_POSITIVES)
def test_false_positives_survive(text):
    for wrapped in (text, f"本日 {text} です", f"see {text}."):
        assert scrub(wrapped) == ScrubResult(wrapped, {})


def test_scrub_messages_sums_counts_and_leaves_input_alone():
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "私のメールは a@example.com、電話は 03-1234-5678 です。"},
        {"role": "assistant", "content": "承知しました。"},
        {"role": "user", "content": "Also reach me at b@example.org or +81-90-1234-5678."},
    ]
    before = copy.deepcopy(messages)
    scrubbed, counts = scrub_messages(messages)
    assert messages == before
    assert counts == {"email": 2, "phone": 2}
    assert scrubbed == [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "私のメールは [EMAIL]、電話は [PHONE] です。"},
        {"role": "assistant", "content": "承知しました。"},
        {"role": "user", "content": "Also reach me at [EMAIL] or [PHONE]."},
    ]


def test_types_and_order():
    assert set(PII_TYPES) == {"email", "phone", "credit_card", "my_number", "postal_code", "ipv4"}
    assert len(PII_TYPES) == 6
    # Long numbers are claimed before the phone rule can cut a phone out of them.
    assert PII_TYPES.index("credit_card") < PII_TYPES.index("phone")
    assert PII_TYPES.index("my_number") < PII_TYPES.index("phone")


def test_empty_and_clean_text():
    assert scrub("") == ScrubResult("", {})
    assert scrub("PII のない普通の文章です。") == ScrubResult("PII のない普通の文章です。", {})


# Every text this file scrubs, for find_pii's agreement with scrub.
FULL_WIDTH = ["お電話は０３－１２３４－５６７８まで", "ＴＥＬ：０９０－１２３４－５６７８／ＦＡＸ：（０３）１２３４－５６７９",
              "０３　１２３４　５６７８", "〒１５０－０００１ 東京都", "個人番号１２３４５６７８９０１８です",
              "カード４１１１　１１１１　１１１１　１１１１"]
ALL_TEXTS = ([doc for doc, _, _ in DOCUMENTS] + FULL_WIDTH + FALSE_POSITIVES
             + ["03-1234-5678 1234 5678 9018", "連絡は 090-1234-5678 か a@b.jp へ", "", "⑴⑵ 03-1234-5678"])


@pytest.mark.parametrize("text", ALL_TEXTS)
def test_find_pii_finds_what_scrub_replaces(text):
    pieces, copied_to, counts = [], 0, {}
    for span in find_pii(text):
        pieces += [text[copied_to:span.start], f"[{span.kind.upper()}]"]
        copied_to = span.end
        counts[span.kind] = counts.get(span.kind, 0) + 1
    pieces.append(text[copied_to:])
    assert ScrubResult("".join(pieces), {k: counts[k] for k in PII_TYPES if k in counts}) == scrub(text)


def test_find_pii_spans_are_offsets_into_the_original_text():
    spans = find_pii(CUSTOMER_MAIL_JA)
    assert [(s.kind, CUSTOMER_MAIL_JA[s.start:s.end]) for s in spans] == [
        ("postal_code", "〒150-0001"), ("phone", "090-1234-5678"), ("phone", "03-1234-5678"),
        ("email", "yamada.taro@example.co.jp")]
    # Full-width items keep their original characters; the neighbour found on the second pass
    # (the phone's digits guarded it) is still an offset into the original text.
    assert find_pii("ＴＥＬ：０９０－１２３４－５６７８") == [PiiSpan("phone", 4, 17)]
    assert find_pii("03-1234-5678 1234 5678 9018") == [PiiSpan("phone", 0, 12), PiiSpan("my_number", 13, 27)]


@pytest.mark.parametrize("phone,found", [
    ("+1 234 5678", True), ("+1 234 567", False),  # E.164 with its country code: 8 digits at least ...
    ("+123 4567 8901 2345", True), ("+123 4567 8901 2345 6", False),  # ... and 15 at most
])
def test_international_phone_digit_bounds(phone, found):
    text = f"call {phone} now"
    assert scrub(text) == (ScrubResult("call [PHONE] now", {"phone": 1}) if found else ScrubResult(text, {}))


def test_my_number_whose_remainder_is_2_has_check_digit_9():
    # 12345678906: the sum of 12345678901 (212) less 2·1 plus 2·6 = 222, 222 mod 11 = 2, check 11 - 2 = 9.
    assert scrub("番号 123456789069 です") == ScrubResult("番号 [MY_NUMBER] です", {"my_number": 1})
    assert scrub("番号 123456789060 です") == ScrubResult("番号 123456789060 です", {})


def test_messages_without_content_are_copied_and_the_rest_still_scrubbed():
    messages = [{"role": "tool", "name": "lookup"}, {"role": "user", "content": "a@example.com"}]
    scrubbed, counts = scrub_messages(messages)
    assert scrubbed == [{"role": "tool", "name": "lookup"}, {"role": "user", "content": "[EMAIL]"}]
    assert scrubbed[0] is not messages[0] and counts == {"email": 1}


def test_the_number_pattern_builder_matches_whole_numbers_in_one_layout():
    # _number and _grouped build the card and My Number patterns when the module is imported, so
    # they are called here directly too.
    import re

    from edgedistill.data.privacy import _DASH, _grouped, _number

    assert _grouped((3, 4)) == [r"\d{3}" + _DASH + r"\d{4}", r"(?<!\d )\d{3} \d{4}(?! \d)"]
    pattern = _number(r"\d{12}", ((4, 4, 4),))
    assert pattern.flags & re.ASCII
    found = lambda text: [m.group() for m in pattern.finditer(text)]  # noqa: E731
    assert found("番号123456789018です") == ["123456789018"]  # Japanese may touch a number
    assert found("1234-5678-9018 / 1234 5678 9018") == ["1234-5678-9018", "1234 5678 9018"]
    assert found("1234 5678-9018") == [] and found("9 1234 5678 9018") == [] and found("1234 5678 9018 7") == []
    assert found("v1.123456789018") == [] and found("1234567890189") == []


def test_a_rejected_match_does_not_stop_the_scan():
    # The first number fails Luhn and stays; the card after it is still found.
    assert scrub("cards 4111111111111112 and 4111111111111111") == ScrubResult(
        "cards 4111111111111112 and [CREDIT_CARD]", {"credit_card": 1})


def test_one_character_holding_the_end_of_one_match_and_the_start_of_the_next():
    # ⅓ is 1⁄3 after NFKC: "123-4561" ends and "345-6789" starts inside it. The first is
    # replaced (with the whole ⅓), the second skipped, and the scan goes on to the next one.
    assert scrub("123-456⅓45-6789 と 〒100-0001") == ScrubResult("[POSTAL_CODE]45-6789 と [POSTAL_CODE]",
                                                               {"postal_code": 2})


def test_counts_add_up_over_the_rescans():
    # The second phone is guarded by the first one's digits until the first is replaced: one
    # phone in each pass, two in all.
    assert scrub("03-1234-5678 03 1234 5678") == ScrubResult("[PHONE] [PHONE]", {"phone": 2})
