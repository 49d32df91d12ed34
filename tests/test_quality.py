"""Answer scoring: the official VQA normalisation and accuracy, exact match, ANLS and whole-word containment."""

from __future__ import annotations

import pytest

from pipeline.quality import METRICS, default_metric, normalize_answer, score


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("Two", "2"),  # number word, lowercased
        ("none", "0"),
        ("Ten", "10"),
        ("a dog.", "dog"),  # article dropped, final period dropped
        ("The  An A cat", "cat"),
        ("yes.", "yes"),
        ("dont", "don't"),  # contraction table
        ("isnt", "isn't"),
        ("don't", "don't"),  # an apostrophe is not in the punctuation list
        ("1,000", "1000"),  # a digit-comma-digit anywhere deletes every mark
        ("1, 2", "1 2"),  # a mark touching a space is deleted
        ("left/right", "left right"),  # a mark touching no space becomes a space
        ("3.5", "3.5"),  # a period before a digit stays
        ("what?!", "what"),
        ("red\tcar\n", "red car"),
    ],
)
def test_normalize_answer_follows_the_official_rules(raw: str, normalised: str) -> None:
    assert normalize_answer(raw) == normalised


def test_vqa_number_word_matches_digit() -> None:
    # 10 references all "2": each leaves one out and sees 9 matches, min(1, 9/3) = 1.
    assert score("vqa", "Two", ["2"] * 10) == 1.0


def test_vqa_normalises_even_when_references_agree() -> None:
    # The official code skips normalisation when all references are identical; we do not.
    # 3 references all match: each sees 2 others, min(1, 2/3) = 2/3, mean 2/3.
    assert score("vqa", "Two", ["2", "2", "2"]) == pytest.approx(2 / 3)


def test_vqa_article_and_period_are_ignored() -> None:
    assert score("vqa", "a dog.", ["dog"] * 10) == 1.0


def test_vqa_partial_credit_from_two_of_ten() -> None:
    # The 2 matching refs see 1 other match -> 1/3 each; the 8 others see 2 -> 2/3 each.
    # (2 * 1/3 + 8 * 2/3) / 10 = (2/3 + 16/3) / 10 = 6 / 10 = 0.6
    references = ["cat", "cat"] + ["dog"] * 8
    assert score("vqa", "cat", references) == pytest.approx(0.6)


def test_vqa_three_of_ten() -> None:
    # The 3 matching refs see 2 others -> 2/3 each; the 7 others see 3 -> 1 each.
    # (3 * 2/3 + 7 * 1) / 10 = 9 / 10 = 0.9
    references = ["cat"] * 3 + ["dog"] * 7
    assert score("vqa", "cat", references) == pytest.approx(0.9)


@pytest.mark.parametrize("matches", [4, 5, 10])
def test_vqa_four_or_more_of_ten_is_full_credit(matches: int) -> None:
    # Every leave-one-out subset still holds at least 3 matches: min(1, >=3/3) = 1.
    references = ["cat"] * matches + ["dog"] * (10 - matches)
    assert score("vqa", "cat", references) == 1.0


def test_vqa_no_match_scores_zero() -> None:
    assert score("vqa", "bird", ["cat"] * 3 + ["dog"] * 7) == 0.0


@pytest.mark.parametrize(
    ("prediction", "reference"),
    [("dont", "don't"), ("isnt", "isn't"), ("three", "3"), ("1,000", "1000"), ("yes.", "yes"), ("Yes", "yes")],
)
def test_vqa_equivalent_spellings_match(prediction: str, reference: str) -> None:
    assert score("vqa", prediction, [reference] * 10) == 1.0


def test_exact() -> None:
    assert score("exact", "A Dog.", ["cat", "dog"]) == 1.0
    assert score("exact", "dogs", ["cat", "dog"]) == 0.0
    assert score("exact", "red car", ["car"]) == 0.0  # containment is not equality


def test_anls_one_deletion() -> None:
    # levenshtein("hello", "helo") = 1, longer length 5: 1 - 1/5 = 0.8
    assert score("anls", "hello", ["helo"]) == pytest.approx(0.8)


def test_anls_classic_distance() -> None:
    # kitten -> sitting: k->s, e->i, +g = 3 edits over 7 chars, 3/7 < 0.5: 1 - 3/7 = 4/7
    assert score("anls", "kitten", ["sitting"]) == pytest.approx(4 / 7)


def test_anls_distance_at_or_over_half_scores_zero() -> None:
    assert score("anls", "ab", ["ac"]) == 0.0  # 1 edit over 2 chars = 0.5, at the threshold
    assert score("anls", "abc", ["xyz"]) == 0.0  # 3/3 = 1


def test_anls_is_the_best_reference() -> None:
    assert score("anls", "hello", ["xyz", "helo"]) == pytest.approx(0.8)  # max(0, 0.8)
    assert score("anls", "hello", ["world", "helo", "hello"]) == 1.0


def test_anls_ignores_case_and_extra_whitespace() -> None:
    assert score("anls", "  Hello   World ", ["hello world"]) == 1.0
    assert score("anls", "", [""]) == 1.0  # two empty strings are identical


def test_contains_whole_words() -> None:
    assert score("contains", "The car is red.", ["red"]) == 1.0
    assert score("contains", "It is reddish.", ["red"]) == 0.0
    assert score("contains", "a red car is parked", ["blue", "red car"]) == 1.0
    assert score("contains", "the car is red", ["red car"]) == 0.0  # words must be in order and adjacent


def test_contains_normalises_both_sides() -> None:
    assert score("contains", "There are two dogs.", ["2"]) == 1.0


def test_contains_keeps_articles_as_words() -> None:
    # A multiple-choice letter is a word: found in a sentence, not in every prediction.
    assert score("contains", "The answer is A.", ["A"]) == 1.0
    assert score("contains", "a dog", ["the"]) == 0.0
    assert score("contains", "the", ["an"]) == 0.0


@pytest.mark.parametrize("metric", ["vqa", "exact", "contains", "anls"])
def test_a_blank_answer_scores_nothing(metric) -> None:
    # Normalisation drops articles: without the rule, "" would equal "A" under vqa and exact.
    assert score(metric, "", ["A"] * 4) == 0.0
    assert score(metric, "  ", ["the"] * 4) == 0.0


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="list of texts"):
        score("exact", "r", "red")  # a string is not a list of one reference
    with pytest.raises(ValueError, match="list of texts"):
        score("exact", "r", ["red", None])
    with pytest.raises(ValueError, match="prediction must be text"):
        score("exact", None, ["red"])


def test_anls_on_long_texts() -> None:
    long = "the quick brown fox jumps over the lazy dog " * 150  # 6,600 characters
    assert score("anls", long, [long[::-1], long.upper()]) == 1.0  # case does not count
    assert score("anls", long, [long[::-1]]) == 0.0  # past the threshold: the cut-off distance is enough
    assert score("anls", long, [long[:-40]]) == pytest.approx(1 - 40 / len(long.strip()), abs=1e-3)


def test_default_metric() -> None:
    assert default_metric([]) == "exact"
    assert default_metric(["a", "b"]) == "exact"
    assert default_metric(["a", "b", "c"]) == "vqa"
    assert default_metric(["a"] * 10) == "vqa"


@pytest.mark.parametrize("metric", METRICS)
def test_every_metric_scores_a_perfect_answer_one(metric: str) -> None:
    assert score(metric, "dog", ["dog"] * 10) == 1.0


def test_unknown_metric_is_named() -> None:
    with pytest.raises(ValueError, match="bleu"):
        score("bleu", "dog", ["dog"])


@pytest.mark.parametrize("metric", METRICS)
def test_empty_references_are_refused(metric: str) -> None:
    with pytest.raises(ValueError, match=metric):
        score(metric, "dog", [])
