"""What each job does, as importable functions below both of its entry points.

``python jobs/<verb>.py`` (also under ``ray job submit``) and ``trprompt <verb>``
(:mod:`jobs.cli`) call the same ``main(argv)``. :mod:`cluster.jobs.common` holds the
boilerplate every job shares: config loading with ``--set`` overrides, the Ray
connection, and the role engines plus SFT runner.
"""
