"""kgrank: a knowledge-graph-augmented multimodal ranker for e-commerce search and recommendation."""

__version__ = "0.1.0"
