"""Cluster-side helpers: role engines and placement (:mod:`cluster.resources`), run metrics (:mod:`cluster.metrics`)."""
