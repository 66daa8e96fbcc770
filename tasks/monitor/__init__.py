"""Watching a served champion: a monitoring policy, its verdict on live statistics, and actions taken once.

policy    the monitoring policy (YAML): SLOs, drift, quality, minimum samples, what each breach does
snapshot  the champion's live statistics, from the Kiln gateway's window or from Prometheus
evaluate  the verdict: healthy | breach | inconclusive, every check with its reason, the actions to take
actions   acting exactly once per model (ActionGuard), the signed webhook, rollback to @previous

The top layer of ``kiln.tasks``: it may use rollout, lifecycle, evaluate, registry, data and core. Retraining
and the Prefect event are started by ``flows/monitor.py`` (tasks never import Prefect).
"""
