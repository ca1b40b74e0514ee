"""Honest baselines every later stage must beat: random, popularity, ItemKNN, transition.

Each is a small class with ``fit(history, n_users, n_items)`` and ``score(users) -> [B, n_items]``;
:func:`kgrank.eval.protocol.tune_and_test` tunes their grids on validation only.
"""

from kgrank.baselines.itemknn import ItemKNN
from kgrank.baselines.popularity import Popularity, RandomScores
from kgrank.baselines.transition import Transition

__all__ = ["ItemKNN", "Popularity", "RandomScores", "Transition"]
