"""Second stage: candidate generation from several sources and LightGBM LambdaRank re-ranking.

:func:`generate_candidates` unions the top-N of each source per request (history masked) and
gathers every source's score at every candidate; :class:`LTRModel` ranks them and explains each
score by feature family; :func:`full_scores` turns candidate scores back into a full-catalog
matrix for :func:`kgrank.eval.protocol.evaluate`.
"""

from kgrank.ranking.candidates import (
    NON_CANDIDATE_SCORE,
    Candidates,
    candidate_recall,
    full_scores,
    generate_candidates,
)
from kgrank.ranking.ltr import LTRModel, top_reasons

__all__ = [
    "NON_CANDIDATE_SCORE",
    "Candidates",
    "LTRModel",
    "candidate_recall",
    "full_scores",
    "generate_candidates",
    "top_reasons",
]
