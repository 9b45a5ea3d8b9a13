"""Unit-test vectors of the upstream scoring functions (lmms-eval @75571cf, MMMU @bb0b95a, MathVista @53d5258,
MMStar @88f243a, VLMEvalKit @e8e78f0), copied from the project's evaluation reference (§5) so that a clone of
the repository has them. Each tuple is (input..., expected output of the upstream function)."""

from __future__ import annotations

# EvalAI / lmms-eval answer normalisation.
NORMALISE = [
    ("Two", "2"), ("the Coca-Cola", "coca cola"), ("Dont", "don't"), ("It's", "it 's"), ("5.", "5"),
    ("3.5", "3.5"), ("$1,000", "$1000"), ("hello, world", "hello world"), ("Yes.", "yes"),
    ("a man's hat", "man 's hat"), ("N/A", "n"), ("e-mail", "e mail"), ("1/2", "1 2"), ("none", "0"),
    ("(A)", ""), ("10:30", "10:30"),
]

# TextVQA accuracy: prediction, ten references, score.
TEXTVQA = [
    ("2", ["two"] * 10, 1.0),
    ("2", ["2"] * 3 + ["3"] * 7, 0.9),
    ("2", ["two"] * 2 + ["three"] * 8, 0.6),
    ("2", ["2"] + ["3"] * 9, 0.3),
    ("Coca-Cola.", ["coca cola"] * 10, 1.0),
    ("the yankees", ["yankees"] * 10, 1.0),
    ("5.", ["5"] * 10, 1.0),
]

# ANLS: prediction, references, score (4 decimals).
ANLS = [
    ("1,250", ["1,250"], 1.0), ("1250", ["1,250"], 0.8), ("Sept 10", ["September 10"], 0.5833),
    ("abc", ["abd"], 0.6667), ("  abc  ", ["abd"], 0.8571), ("ab", ["abcd"], 0.5), ("abcde", ["abxyz"], 0.0),
    ("a", ["abcd"], 0.0), ("  The  Answer ", ["the answer"], 1.0), ("wrong", ["right", "wronk"], 0.8),
    ("12/05/2019", ["12/5/2019"], 0.9), ("", ["x"], 0.0),
]

# MMMU multiple choice with options A 1.5 m/s, B 3 m/s, C 4.5 m/s, D 6 m/s: response, letter (None: random).
MMMU_OPTIONS = ["1.5 m/s", "3 m/s", "4.5 m/s", "6 m/s"]
MMMU_CHOICE = [
    ("B", "B"), ("(C)", "C"), ("The answer is (D).", "D"), ("A.", "A"), ("Answer: C", "C"),
    ("I think B is wrong and C is right", "C"),
    ("The velocity is 3 m/s because the slope gives it so clearly", "B"),
    ("b", None),  # random: A with seed 42
]
MMMU_RANDOM_WITH_SEED_42 = "A"

# MMMU open answers: response, gold, correct.
MMMU_OPEN = [
    ("The answer is 3.14.", "3.14", True), ("So the final answer is 1,000 dollars", "1000", True),
    ("x = 12", "12", True), ("12.001", "12", True), ("It is 0.5", "1/2", False),
    ("The capital is Paris and not Lyon.", "Lyon", True), ("Answer: B", "b", True),
]

# MathVista normalisation with choices 3/11, 8/11, 6/11, 3/5: extraction, answer type, precision, result.
MATHVISTA_CHOICES = ["3/11", "8/11", "6/11", "3/5"]
MATHVISTA_CHOICE = [("B", "8/11"), ("(C) 6/11", "6/11"), ("8/11", "8/11"), ("eight/11", "3/11")]
MATHVISTA_OTHER = [
    ("14.0", "integer", 0, "14"), ("3.14159", "float", 2, "3.14"), ("3.14159", "float", 1, "3.1"),
    ("abc", "integer", 0, None), ("[1, 2]", "list", 0, "[1, 2]"),
]

# MMStar, gold B: response, official hit, lmms-eval extraction, VLMEvalKit can_infer (A cat, B dog, C bird, D fish).
MMSTAR_CHOICES = {"A": "cat", "B": "dog", "C": "bird", "D": "fish"}
MMSTAR = [
    ("B", 1, "B", "B"), ("b", 1, "", False), ("(B) dog", 1, "B", "B"), ("Option B", 1, "B", "B"),
    ("The answer is B.", 1, "B", "B"), ("Answer: B", 0, "B", "B"), ("The correct answer is B", 0, "B", "B"),
    ("dog", 0, "", "B"), ("A dog.", 0, "A", "A"), ("Bird", 1, "B", "C"), ("Both A and B", 1, "B", False),
    ("", 0, "", False),
]
