"""Ray actors that host engines (:mod:`actors.engine_actor`) and pools of them (:mod:`actors.pool`)."""
