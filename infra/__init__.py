"""Long-running parts of Kiln (model server, serving gateway, webhook receiver, registry poller, local stack)
and scale-out material (``k8s/``, ``ci/``, ``prefect.yaml``).

The spine (issue 2) needs none of them: flows run on Prefect's ephemeral API and MLflow's embedded
SQLite store. See README.md, "What is built and verified where".

Entry points (``python -m kiln.infra.X``, each with ``main()``): ``server``, ``gateway``, ``webhooks``,
``registry_events``, ``loadgen``. The modules, by concept:

- serving: ``server`` (OIP v2 model server), ``oip`` (the protocol's codec), ``oip_generate`` (the generate
  extension for causal LMs: ``/generate``, ``/generate_stream``), ``batching``, ``faults``
  (deliberate faults for canary drills), ``runtime`` (served versions, swapped while serving), ``follow``
  (servers on ``NAME@ALIAS`` follow the alias);
- gateway: ``gateway`` (app + command), ``gateway_proxy`` (forwarding by weight, shadow mirroring),
  ``gateway_stream`` (generate_stream relayed as it is written), ``gateway_feedback`` (``POST /feedback``),
  ``gateway_admin`` (token-guarded admin routes), ``gateway_stats`` (split, windows, metrics),
  ``upstream`` (pooled HTTP client), ``loadgen`` (loopback load generator);
- triggers: ``starter`` (start Prefect deployments), ``webhooks`` (git push receiver), ``webhook_body``;
- registry events: ``registry_events`` (overview + poller command), ``registry_actions`` (what an event
  leads to), ``mlflow_webhook`` (the ``/hooks/mlflow`` route), ``mlflow_signature`` (signature and replay
  checks), ``registry_poller``, ``paused_promotions`` (Prefect's paused promote runs);
- local stack (``kiln up``): ``stack`` (process supervision), ``stack_services`` (what runs, readiness
  probes), ``stack_databases`` (PostgreSQL stores);
- ``background``: run an ASGI app on loopback in a thread (tests, benchmarks, the demo).

May import: ``kiln.tasks`` (what it serves: models, engines, registry, data, lifecycle) and the bottom-layer
modules (``kiln.errors``, ``kiln.settings``, ``kiln.yamlfile``, ``kiln.logs``). Never ``kiln.flows``,
``kiln.cli`` or ``kiln.demo``: servers run as their own processes and start flows only through Prefect's API.
"""
