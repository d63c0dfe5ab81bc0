"""ROUGE on hand-checked pairs."""
import pytest

from peftsum.evaluation import lead_3, rouge, split_sentences


def test_rouge_hand_checked_pair():
    # unigrams: 5 of 6 shared (the ×2, cat, on, mat) → 83.33; bigrams: the cat, on the, the mat → 3 of 5 = 60;
    # longest common subsequence "the cat on the mat" = 5 of 6 → 83.33
    s = rouge(["the cat sat on the mat"], ["the cat was on the mat"])
    assert s["rouge1"] == pytest.approx(500 / 6)
    assert s["rouge2"] == pytest.approx(60.0)
    assert s["rougeL"] == pytest.approx(500 / 6)


def test_rouge_lsum_is_per_sentence():
    # Same two sentences in the other order: rougeL's single LCS finds 2 of 4 tokens, rougeLsum (LCS per sentence
    # of the reference, union over the prediction's sentences) finds all. Stemming maps cats → cat on both sides.
    s = rouge(["Cats sleep. Dogs bark."], ["Dogs bark.\nCats sleep."])
    assert s["rougeL"] == pytest.approx(50.0)
    assert s["rougeLsum"] == pytest.approx(100.0)
    assert s["rouge1"] == pytest.approx(100.0)


def test_rouge_averages_per_example():
    s = rouge(["the cat", "x y z"], ["the cat", "a b c"])
    assert s["rouge1"] == pytest.approx(50.0)


def test_split_sentences():
    assert split_sentences("One here. Two there!\nThree? four") == "One here.\nTwo there!\nThree? four"


def test_split_sentences_keeps_abbreviations_and_initials_inside_sentences():
    text = "It began at 3 a.m. ET Tuesday. Mr. Smith and J. K. Rowling met in the U.S. Capital. Then 2 more came!"
    assert split_sentences(text).splitlines() == [
        "It began at 3 a.m. ET Tuesday.", "Mr. Smith and J. K. Rowling met in the U.S. Capital.", "Then 2 more came!"]
    assert lead_3(text + " Fourth one. Fifth.").count("\n") == 2
