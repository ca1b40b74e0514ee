"""The collaborative knowledge graph that the graph stage builds and its models train on.

Node spaces: users ``0..n_users-1``; "KG nodes" ``0..n_items + n_entities - 1`` where KG node ``i <
n_items`` is item ``i`` and KG node ``n_items + e`` is non-item entity ``e`` (a category, brand,
attribute value or external entity). Edges:

- user-item interactions from the TRAINING split only (``ui_user``, ``ui_item``, ``ui_weight``);
- typed knowledge triples over KG nodes (``kg_head`` -[``kg_rel``]-> ``kg_tail``), forward
  direction only; models add inverse relations themselves where they need them. Item-item
  relations mined from training sequences are triples between two item nodes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class KnowledgeGraph:
    """Arrays of the graph; see the module docstring for the node spaces."""

    n_users: int
    n_items: int
    ui_user: np.ndarray  # int64 [n_ui]
    ui_item: np.ndarray  # int64 [n_ui]
    ui_weight: np.ndarray  # float32 [n_ui], event-type x recency weight (1.0 when unweighted)
    entity_names: list[str] = field(default_factory=list)  # non-item entity e -> name
    entity_types: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    entity_type_names: list[str] = field(default_factory=list)  # e.g. category, brand, ...
    relation_names: list[str] = field(default_factory=list)  # relation r -> name
    kg_head: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    kg_rel: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    kg_tail: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def n_entities(self) -> int:
        return len(self.entity_names)

    @property
    def n_kg_nodes(self) -> int:
        return self.n_items + self.n_entities

    @property
    def n_relations(self) -> int:
        return len(self.relation_names)

    def with_interactions(
        self, user: np.ndarray, item: np.ndarray, weight: np.ndarray | None = None
    ) -> KnowledgeGraph:
        """A copy with extra user-item edges (e.g. validation events for test-time propagation)."""
        w = np.ones(len(user), dtype=np.float32) if weight is None else weight.astype(np.float32)
        return KnowledgeGraph(
            self.n_users, self.n_items,
            np.concatenate([self.ui_user, user.astype(np.int64)]),
            np.concatenate([self.ui_item, item.astype(np.int64)]),
            np.concatenate([self.ui_weight, w]),
            self.entity_names, self.entity_types, self.entity_type_names, self.relation_names,
            self.kg_head, self.kg_rel, self.kg_tail,
        )
