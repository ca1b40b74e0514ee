"""Path attributions of a LightGBM model: per-family explanations in a table lookup.

TreeSHAP (``pred_contrib=True``, :meth:`kgrank.ranking.ltr.LTRModel.explain`) costs
``O(trees x leaves x depth^2)`` per row: ~1.3 ms per row for the demo's 211-tree ranker, most of
a search request's time when ten results are explained. The path attribution of Saabas
(``treeinterpreter``; XGBoost's ``approx_contribs``) walks the row's root-to-leaf path in each
tree and credits every split's feature with the change of the node value it causes:

    phi_f(x) = sum_trees sum_{splits s on x's path, feature(s) = f} v(child_s(x)) - v(s)

so that ``sum_f phi_f(x) + sum_trees v(root) = f(x)`` exactly, like TreeSHAP. Everything after
the leaf is fixed, so the attribution of each (tree, leaf) is precomputed once per family and a
row's explanation is a gather over its leaves (``pred_leaf=True``, as cheap as a prediction).
Saabas values are not Shapley values: they are local to the path and credit splits near the root
more (Lundberg et al., 2018, "Consistent individualized feature attribution for tree
ensembles"), so the offline report keeps TreeSHAP and the serving API offers both.

LightGBM's node values (``internal_value``, ``leaf_value``) are the hessian-weighted mean outputs
with the learning rate applied (``Tree::Shrinkage``), what ``dump_model`` reports.
"""

from __future__ import annotations

from typing import Any

import lightgbm as lgb
import numpy as np


class PathExplainer:
    """Per-family path attributions of ``booster`` (its first ``num_iteration`` trees).

    ``family_matrix`` [F, n_families] maps each of the model's features to its family.
    """

    def __init__(self, booster: lgb.Booster, family_matrix: np.ndarray,
                 num_iteration: int | None = None) -> None:
        dump = booster.dump_model(num_iteration=num_iteration)
        trees = dump["tree_info"]
        n_fam = family_matrix.shape[1]
        n_leaves = max((int(t["num_leaves"]) for t in trees), default=1)
        self.num_iteration = num_iteration
        self.table = np.zeros((len(trees), n_leaves, n_fam))
        """[trees, leaves, families]: the attribution of a row that lands in that leaf."""
        self.bias = 0.0
        """Sum of the trees' root values (the attribution's expected value)."""
        fam_of = np.argmax(family_matrix, axis=1)
        for t, tree in enumerate(trees):
            root = tree["tree_structure"]
            self.bias += _value(root)
            stack: list[tuple[dict[str, Any], np.ndarray]] = [(root, np.zeros(n_fam))]
            while stack:
                node, acc = stack.pop()
                if "leaf_index" in node or "split_feature" not in node:
                    self.table[t, int(node.get("leaf_index", 0))] = acc
                    continue
                fam = fam_of[int(node["split_feature"])]
                for side in ("left_child", "right_child"):
                    child = node[side]
                    step = acc.copy()
                    step[fam] += _value(child) - _value(node)
                    stack.append((child, step))
        # row (tree, leaf) of the table flattened, for one np.take per explanation
        self._offsets = np.arange(len(trees)) * n_leaves
        self._booster = booster

    def explain(self, X: np.ndarray, num_threads: int = 0) -> tuple[np.ndarray, float]:
        """``(contrib [N, n_families], bias)``; each row's contributions plus ``bias`` equal
        the model's raw score of that row (``num_threads`` 0: LightGBM's default)."""
        kw: dict[str, Any] = {"num_threads": num_threads} if num_threads > 0 else {}
        leaves = np.asarray(self._booster.predict(X, num_iteration=self.num_iteration,
                                                  pred_leaf=True, **kw), np.int64)
        leaves = leaves.reshape(len(X), -1)
        flat = self.table.reshape(-1, self.table.shape[2])
        return np.take(flat, leaves + self._offsets, axis=0).sum(axis=1), self.bias


def _value(node: dict[str, Any]) -> float:
    return float(node["leaf_value"] if "leaf_value" in node else node["internal_value"])
