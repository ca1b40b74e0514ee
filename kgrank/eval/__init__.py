"""kgrank.eval stage."""
