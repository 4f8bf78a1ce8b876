"""Generation scores: exact match and ROUGE-L of decoded text against references."""

import pytest

from kdbench.heads.generation import score_generations


def test_exact_match_and_rouge_l():
    assert score_generations("exact_match", ["Plot positive ", "a b"], ["plot  positive", "a c"]) == 0.5
    # ROUGE-L F1: the longest common subsequence of words, here 5 of 6 on both sides
    assert score_generations("rouge_l", ["the cat sat on the mat"], ["the cat was on the mat"]) == pytest.approx(
        5 / 6, rel=1e-5)
    assert score_generations("rouge_l", ["a b", "x"], ["a b", "y"]) == pytest.approx(0.5)
    assert score_generations("rouge_l", ["completely different"], ["nothing shared here"]) == 0.0
