"""Request-time features shared by fusion, ranking and serving: requests, context, behaviour.

Every feature of a request is computed from the events that precede it in the user's history, so
that training, offline evaluation and the search endpoint compute features the same way.
"""
