"""kgrank.data stage."""
