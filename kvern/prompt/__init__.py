"""What the client asked: the tenant and prompt a body carries, normalized and rendered.

Reads request bodies, never changes what is sent upstream: ``requests`` finds
the prompt of each endpoint's body, ``normalize`` applies the config's rules,
``render`` runs the model's chat template.
"""
