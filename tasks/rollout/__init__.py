"""Canary rollouts: move live traffic to @challenger step by step, judge it against @champion, then
promote it or roll it back.

    params          RolloutParams, the spec file, RolloutError
    judge           the rollout spec and the pure judgement of one analysis window (stats: its statistics,
                    drift: input/prediction drift checks)
    router          the TrafficRouter interface (set split, read split, promote, roll back)
    gateway_client  GatewayRouter: the Kiln gateway's admin API, the first router
    k8s_routers     HTTPRouteRouter (Gateway API weights), KServeRouter (canaryTrafficPercent); k8s_objects:
                    their custom objects through the kubernetes client, the split's expiry annotation
    state           RolloutState, its JSON store and the one-rollout-per-machine lock
    commands        pause / resume / promote / abort through a tag on the challenger
    status          the challenger's summary tags and the text of ``kiln rollout status``
    tracking        the rollout's MLflow run (metrics per analysis, final state, plot)
    driver          RolloutDriver: the loop that routes, waits, judges and acts
    launch          preflight and run_rollout, for the flow and the CLI (with the drift wiring)

The top layer of stage logic: may import ``lifecycle`` (promotion), ``reports`` and everything below them.
"""
