"""Ray Serve application that turns a finished TRPrompt run into an HTTP service.

The service writes a query-aware instruction for every question it receives, using
the run's prompt model Π (base model + the run's best LoRA adapter) conditioned on
the run's optimal textual reward t*; ``/v1/solve`` also hands question + instruction
to the target model and extracts the final answer.

Deployments (names as they appear in ``serve status``):

* ``PromptModel``: one engine (built with :func:`trprompt.engines.factory.build_engine`
  from the run's ``models.prompt_model``, so HF on CPU and vLLM on GPUs alike) with the
  run's adapter loaded under a versioned adapter id. Concurrent requests are merged by
  ``@serve.batch`` into one engine call (behind a :class:`BatchGate`, so that requests
  arriving during a long engine call form one next batch rather than many small ones).
  When the target model has the same settings and the run shares engines, this
  deployment answers target requests as well.
* ``TargetModel`` (optional): the run's ``models.target_model`` behind the same batching.
* ``Ingress``: FastAPI (``/docs`` has the OpenAPI page); validates every request
  before anything reaches an engine and turns every failure into a JSON error body.

Hot swap: ``POST /v1/admin/reload`` goes to one ``PromptModel`` replica, which loads
the new adapter under a new id, swaps its active version with a single assignment,
and unloads the old adapter once the last batch that started with it has finished.
A reload is checked in full first (paths under the allowed roots, config, templates,
t* limits, the adapter loads, one trial prompt) and on failure the old version stays.
It then publishes the new version to a deployment-scoped actor (``versions``); the
other replicas poll it and swap the same way, and replicas started later (autoscaling,
restarts after a crash) start from the published version rather than the original one.

Build the application with :func:`build_app` (also usable as a Serve app builder:
``serve run cluster.serve.app:build_app run_dir=runs/cpu-demo``) or run
``python jobs/serve.py --run-dir runs/cpu-demo``. See ``docs/serving.md``.

Modules, one concern each: :mod:`~cluster.serve.args` (settings), :mod:`~cluster.serve.run_spec`
(the run directory being served), :mod:`~cluster.serve.messages` (what the deployments exchange),
:mod:`~cluster.serve.schemas` (HTTP bodies), :mod:`~cluster.serve.errors` (JSON error mapping),
:mod:`~cluster.serve.versions` (the published version), :mod:`~cluster.serve.batching` (the batch
gate), :mod:`~cluster.serve.metrics`, :mod:`~cluster.serve.deployments` (the model deployments),
:mod:`~cluster.serve.security` (tokens, Host allow-list, reload roots, rate limits),
:mod:`~cluster.serve.guard` (the ASGI middleware that enforces them), :mod:`~cluster.serve.openai_compat`
(the OpenAI-compatible bodies and stream), :mod:`~cluster.serve.ingress` (FastAPI routes, retries
across replica deaths) and :mod:`~cluster.serve.app` (:func:`build_app`).
"""
