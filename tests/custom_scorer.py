"""Behaviour scorers named as ``module:function`` in the scorer tests (tests/ is on sys.path there)."""
import numpy as np


def has_letter_e(texts):
    """Flags the texts that contain the letter e (either case): a behaviour any generation can show."""
    return ["e" in t.lower() for t in texts]


def has_letter_y(texts):
    """Flags the texts that contain the letter y (either case): about half of the tiny study's texts."""
    return ["y" in t.lower() for t in texts]


def numpy_flags(texts):
    """The same flags as has_letter_e, as a numpy bool array (accepted: bool-like values)."""
    return np.array(has_letter_e(texts), dtype=bool)


def wrong_length(texts):
    return has_letter_e(texts)[:-1]


def probabilities(texts):
    return [0.7 for _ in texts]


def not_a_sequence(texts):
    return None


class Scorers:
    @staticmethod
    def always(texts):
        return [True] * len(texts)


NOT_CALLABLE = 3
