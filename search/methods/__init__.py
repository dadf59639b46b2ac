"""Edge- and node-attribution methods of the seed documents, on EAP-IG's position-free graph.

One module per method (``eap``, ``eap_ig``, ``edge_patching``, ``atp_star``, ``learned_mask``);
each returns :class:`search.methods.common.EdgeScores` whose ``scores[f, b]`` is the metric
change when edge ``f -> b`` alone gets its corrupted message (positive: the edge supports the
behaviour, as path contributions). :mod:`search.methods.run` validates options and stores runs.
"""

from __future__ import annotations

from pathdb.methods import METHODS

__all__ = ["METHODS"]
