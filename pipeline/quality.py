"""Scoring a model's answer against reference answers, so pruned and unpruned runs can be compared on quality.

`vqa` and `exact` use the official VQA evaluation's answer normalisation (GT-Vision-Lab/VQA `vqaEval.py`, the one
EvalAI runs), so scores line up with published VQA numbers; `anls` is DocVQA's metric; `contains` is for free-form
generative answers that wrap the short answer in a sentence.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

from rapidfuzz.distance import Levenshtein

METRICS = ("vqa", "exact", "anls", "contains")

_ANLS_THRESHOLD = 0.5  # DocVQA: a normalised edit distance at or above this scores 0

# The official evaluation's tables, reproduced as data (keys that can never match after lowercasing, such as "Im",
# and the reversed "somebody'd" entry are theirs, kept so normalisation stays identical).
# fmt: off
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's",
    "somethingd": "something'd", "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd", "thered've": "there'd've",
    "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've",
    "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've",
    "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've",
    "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})
_PUNCTUATION = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)
# fmt: on
_COMMA_BETWEEN_DIGITS = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")


def normalize_answer(text: str) -> str:
    """The official VQA normalisation: whitespace, punctuation, then number words, articles and contractions."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles_contractions(_strip_punctuation(text))


def _strip_punctuation(text: str) -> str:
    """processPunctuation: a mark touching a space (or any mark, once the text has a digit-comma-digit such as
    "1,000") is deleted, otherwise it becomes a space, so "1,000" is "1000" and "left/right" is "left right";
    a period goes unless a digit follows, which keeps "3.5"."""
    delete_all = _COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        touches_space = f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if delete_all or touches_space else " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def _digits_articles_contractions(text: str) -> str:
    """processDigitArticle: lowercase, number words to digits, drop articles, restore apostrophes ("dont")."""
    words = (_NUMBER_WORDS.get(word, word) for word in text.lower().split())
    return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


def default_metric(references: list[str]) -> str:
    """VQA accuracy leaves one annotator out in turn, so it needs several: with one reference it is always 0, with two
    at most 1/3; shorter reference lists are scored by exact match instead."""
    return "vqa" if len(references) >= 3 else "exact"


def score(metric: str, prediction: str, references: list[str]) -> float:
    """The prediction's score in [0, 1] under `metric`, one of METRICS. A blank prediction scores 0
    (unless a reference is blank too): normalisation drops articles, so an empty answer would
    otherwise match a reference such as "A", and pruning that empties answers would look harmless."""
    scorer = _SCORERS.get(metric)
    if scorer is None:
        raise ValueError(f"unknown quality metric {metric!r}; expected one of {', '.join(METRICS)}")
    if isinstance(references, str) or not all(isinstance(r, str) for r in references):
        raise ValueError(f"references must be a list of texts, not {type(references).__name__} {references!r:.60}")
    if not references:
        raise ValueError(f"quality metric {metric!r} needs at least one reference answer")
    if not isinstance(prediction, str):
        raise ValueError(f"the prediction must be text, not {type(prediction).__name__}")
    if not prediction.strip() and all(r.strip() for r in references):
        return 0.0
    return scorer(prediction, references)


def _vqa(prediction: str, references: list[str]) -> float:
    """VQA accuracy: each reference in turn is left out, and the prediction earns min(1, matches among the others / 3);
    the score is the mean over references. Of 10 references, 3 matches score 0.9 and 4 or more score 1.

    Unlike the official code, which normalises only when the references disagree, both sides are always normalised:
    otherwise "Two" against ["2", "2", "2"] would score 0 while against ["2", "2", "3"] it earns partial credit.
    """
    predicted = normalize_answer(prediction)
    matches = [normalize_answer(reference) == predicted for reference in references]
    total = sum(matches)
    return sum(min(1.0, (total - matched) / 3) for matched in matches) / len(matches)


def _exact(prediction: str, references: list[str]) -> float:
    """1 when the normalised prediction equals some normalised reference."""
    predicted = normalize_answer(prediction)
    return float(any(normalize_answer(reference) == predicted for reference in references))


def _anls(prediction: str, references: list[str]) -> float:
    """DocVQA's ANLS for one question: the best normalised Levenshtein similarity over references, where a
    reference at a normalised edit distance of 0.5 or more counts 0 (a wrong answer, not a misread one)."""
    predicted = _collapse(prediction)
    return max(_similarity(predicted, _collapse(reference)) for reference in references)


def _collapse(text: str) -> str:
    """ANLS compares lowercased text with runs of whitespace collapsed, punctuation kept."""
    return " ".join(text.lower().split())


def _similarity(a: str, b: str) -> float:
    """1 - the edit distance over the longer length, or 0 when that distance reaches the threshold."""
    longest = max(len(a), len(b))
    if longest == 0:
        return 1.0
    # rapidfuzz's C++ edit distance, stopping once the distance reaches the threshold: a long answer
    # against a long reference costs microseconds, not the seconds of a Python loop.
    cutoff = math.ceil(_ANLS_THRESHOLD * longest)
    distance = Levenshtein.distance(a, b, score_cutoff=cutoff) / longest
    return 1.0 - distance if distance < _ANLS_THRESHOLD else 0.0


def _contains(prediction: str, references: list[str]) -> float:
    """1 when some normalised reference occurs in the normalised prediction as whole words, so "red" is found in
    "the car is red" but not in "reddish". Articles stay words here, so a multiple-choice reference "A" is found in
    "the answer is A"."""
    words = _words(prediction)
    return float(any(_has_run(words, _words(reference)) for reference in references))


def _words(text: str) -> list[str]:
    """The official normalisation's words, articles kept."""
    words = _strip_punctuation(text.replace("\n", " ").replace("\t", " ").strip()).lower().split()
    return [_CONTRACTIONS.get(w, w) for w in (_NUMBER_WORDS.get(w, w) for w in words)]


def _has_run(words: list[str], run: list[str]) -> bool:
    """Whether `run` appears contiguously in `words`."""
    if not run:
        return not words
    return any(words[start : start + len(run)] == run for start in range(len(words) - len(run) + 1))


_SCORERS: dict[str, Callable[[str, list[str]], float]] = {
    "vqa": _vqa,
    "exact": _exact,
    "anls": _anls,
    "contains": _contains,
}
