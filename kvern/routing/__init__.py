"""Several upstreams: presence of prefixes, load, health and the choice of one.

``presence`` and ``book`` model which upstream holds which prefix (on the
tracking thread); ``pool``, ``breaker`` and ``health`` keep each upstream's
load and circuit; ``policies`` pick; ``router`` runs a decision per request.
"""
