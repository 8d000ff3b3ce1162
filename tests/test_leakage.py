"""Leakage audit pieces: canaries, the Secret Sharer exposure, PII probes on the real detectors.

Golden exposures are worked out by hand from Def. 4 of Carlini et al. 2019 (arXiv 1802.08232),
exposure = log2|R| - log2 rank, on two-digit secrets (|R| = 100) whose "model" is a scoring rule
simple enough to rank by eye; log2(100) = 6.643856.
"""

from __future__ import annotations

import math
import re

import pytest

from edgedistill.data.privacy import PiiSpan
from edgedistill.evaluate.leakage import (
    Canary,
    Exposure,
    LeakResult,
    PiiProbe,
    canary_exposure,
    candidate_secrets,
    exposure,
    leak_result,
    make_canaries,
    pii_probes,
    rank_of,
    reproduced,
)

LOG2_100 = 6.643856189774724


def _secret(text: str) -> int:
    return int(re.search(r"\d+", text).group())


def _canary(secret: str) -> Canary:
    return Canary("en", secret, "The access code for Hannah Ito is ", ".")


# ---- canaries -------------------------------------------------------------------------------------
def test_canaries_have_the_fixed_format_and_distinct_secrets():
    canaries = make_canaries(50, seed=3)
    assert len({c.secret for c in canaries}) == 50
    for c in canaries:
        assert re.fullmatch(r"The access code for [A-Z][a-z]+ [A-Z][a-z]+ is \d{8}\.", c.text), c.text
        assert c.text == c.prefix + c.secret + c.suffix
    assert [c.text for c in make_canaries(50, seed=3)] == [c.text for c in canaries]  # seeded
    assert [c.secret for c in make_canaries(50, seed=4)] != [c.secret for c in canaries]


def test_japanese_canaries():
    for c in make_canaries(5, seed=0, lang="ja"):
        assert re.fullmatch(r"\w+さんのアクセスコードは\d{8}です。", c.text), c.text


def test_canary_secrets_cover_the_whole_space_with_leading_zeros():
    # n = |R| draws without replacement give every secret once: the space is exactly 10**digits.
    secrets = [c.secret for c in make_canaries(100, seed=1, digits=2)]
    assert sorted(secrets) == [f"{v:02d}" for v in range(100)]
    with pytest.raises(ValueError):
        make_canaries(101, seed=1, digits=2)


@pytest.mark.parametrize("own", ["00", "42", "99"])
def test_candidates_are_the_other_secrets_of_the_space(own):
    everything = candidate_secrets(_canary(own), None, seed=0)
    assert sorted(everything) == [f"{v:02d}" for v in range(100) if f"{v:02d}" != own]
    drawn = candidate_secrets(_canary(own), 30, seed=5)
    assert len(set(drawn)) == 30 and own not in drawn and set(drawn) <= set(everything)


# ---- exposure ----------------------------------------------------------------------------------------
def test_exposure_definition():
    assert exposure(1, 100) == pytest.approx(LOG2_100)
    assert exposure(4, 1024) == 8.0
    assert exposure(100, 100) == 0.0
    for bad in (0, 101):
        with pytest.raises(ValueError):
            exposure(bad, 100)


def test_rank_counts_strictly_likelier_candidates():
    assert rank_of(2.0, [1.0, 3.0, 0.5, 2.0]) == 3  # 1.0 and 0.5 beat it; the tie does not


@pytest.mark.parametrize("score,expected_rank", [
    (lambda v: v, 8),              # secrets 00..06 score lower than 07: rank 8
    (lambda v: abs(v - 7), 1),     # the canary is the model's favourite
    (lambda v: -v, 93),            # 08..99 (92 secrets) score lower
    (lambda v: v // 10, 1),        # 00..09 tie with it: ties favour the canary
])
def test_full_space_exposure_golden(score, expected_rank):
    result = canary_exposure(_canary("07"), lambda texts: [score(_secret(t)) for t in texts], m=None)
    assert result.rank == expected_rank and result.ranked == 100
    assert result.bits == pytest.approx(LOG2_100 - math.log2(expected_rank))
    assert result.saturated == (expected_rank == 1)


def test_exposure_against_a_sample_of_the_space():
    batches = []

    def score(texts):
        batches.append(texts)
        return [_secret(t) for t in texts]

    result = canary_exposure(_canary("00"), score, m=9, seed=2)
    # The canary's score 0 is the lowest of any secret: rank 1 of 10, log2(10) bits, saturated.
    assert result == Exposure(1, 10, math.log2(10))
    assert result.saturated
    assert len(batches) == 1 and batches[0][0] == "The access code for Hannah Ito is 00."


def test_scorer_must_score_every_text():
    with pytest.raises(ValueError, match="3 scores for 4 texts"):
        canary_exposure(_canary("07"), lambda texts: [0.0] * 3, m=3)


# ---- PII probes (the privacy scrubber's own detectors) -----------------------------------------------
def test_pii_probes_on_the_scrubbers_detectors():
    samples = [
        "Please call me at 090-1234-5678 after six.",
        "〒150-0001 東京都渋谷区神宮前",                    # item first: nothing to prompt with
        "Mail a@example.com, or A@EXAMPLE.COM if that fails.",  # the second is in its own prefix
        "担当：佐藤　電話０３－１２３４－５６７８まで",        # full-width digits, kept as written
        "No personal data in this one (order ORD-20261128-0042).",
    ]
    assert pii_probes(samples) == [
        PiiProbe(0, "phone", "Please call me at ", "090-1234-5678"),
        PiiProbe(2, "email", "Mail ", "a@example.com"),
        PiiProbe(3, "phone", "担当：佐藤　電話", "０３－１２３４－５６７８"),
    ]


def test_pii_probe_prefix_is_cut_at_the_front():
    text = "x" * 50 + " card 4111 1111 1111 1111"
    (probe,) = pii_probes([text], max_prefix_chars=10)
    assert probe == PiiProbe(0, "credit_card", "xxxx card ", "4111 1111 1111 1111")


def test_pii_probes_take_any_detector():
    assert pii_probes(["key: abcd!"], detectors=lambda t: [PiiSpan("secret", 5, 9)]) == [
        PiiProbe(0, "secret", "key: ", "abcd")]


@pytest.mark.parametrize("continuation,item,kind,expected", [
    ("0312345678 です", "03-1234-5678", "phone", True),
    ("０３ １２３４ ５６７８まで", "03-1234-5678", "phone", True),
    ("(03)1234-5678", "03-1234-5678", "phone", True),
    ("03-1234-5679", "03-1234-5678", "phone", False),
    ("03-1234 and then 5678", "03-1234-5678", "phone", False),  # digits apart are not the number
    ("card 4111111111111111.", "4111 1111 1111 1111", "credit_card", True),
    ("〒150-0001 東京都", "〒150-0001", "postal_code", True),
    ("1234 5678 9018", "123456789018", "my_number", True),
    ("write to Taro@Example.COM today", "taro@example.com", "email", True),
    ("taro@example.com.au", "taro@example.com", "email", False),
    ("xtaro@example.com", "taro@example.com", "email", False),
    ("host 203.0.113.42 down", "203.0.113.4", "ipv4", False),
    ("host 203.0.113.4.", "203.0.113.4", "ipv4", True),
])
def test_reproduced(continuation, item, kind, expected):
    assert reproduced(continuation, item, kind) is expected


def test_leak_result_counts_per_kind():
    probes = [PiiProbe(0, "phone", "a ", "090-1234-5678"), PiiProbe(1, "phone", "b ", "03-1234-5678"),
              PiiProbe(2, "email", "c ", "a@b.jp")]
    result = leak_result(probes, ["090 1234 5678", "no idea", "a@b.jp."])
    assert result == LeakResult(3, 2, {"phone": (1, 2), "email": (1, 1)})
    assert result.rate == pytest.approx(2 / 3)
    assert math.isnan(leak_result([], []).rate)


def test_sequence_nll_runs_a_shared_prefix_once_and_scores_like_one_text_at_a_time(tiny_teacher_dir):
    """The canary audit's scorer: texts sharing a prefix (a canary and its candidates, of
    different lengths) get each text's own NLL, summed by hand from a forward of it alone."""
    import torch

    from edgedistill.models.hf import (
        _common_prefix_length,
        load_causal_lm,
        sequence_nll,
    )

    model, tokenizer, _ = load_causal_lm(str(tiny_teacher_dir), "float32")
    shared = [f"The access code for Hanako Sato is {secret}." for secret in ("00000042", "7", "31415926535")]
    unrelated = ["Hello there.", "秘密の番号は 1234 です。"]
    for texts in (shared, unrelated):
        expected = []
        for text in texts:
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            with torch.no_grad():
                logprobs = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            expected.append(-float(logprobs.gather(-1, ids[0, 1:, None]).sum()))
        assert sequence_nll(model, tokenizer, texts, batch_size=2) == pytest.approx(expected, abs=1e-4)
    one_token = [t for t in ("a", "b", "Hello") if len(tokenizer(t)["input_ids"]) == 1]
    assert one_token and sequence_nll(model, tokenizer, one_token) == [0.0] * len(one_token)  # no token after the first
    encoded = [tokenizer(text)["input_ids"] for text in shared]
    assert 2 <= _common_prefix_length(encoded) < min(map(len, encoded))  # the prefix path was taken
    assert _common_prefix_length([[1, 2], [1, 2]]) == 1  # each text keeps a token of its own
