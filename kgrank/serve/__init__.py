"""Real-time serving of an export: :class:`~kgrank.serve.searcher.Searcher` (the request path)
and the FastAPI app (:func:`kgrank.serve.app.create_app`)."""
