"""Graph stage: the user-item-category-brand knowledge graph and GNN embeddings."""
