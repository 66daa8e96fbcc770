"""``kiln serve`` (the model server) and ``kiln gateway`` (the canary gateway in front of two of them).

Registered on the main app by :func:`register_commands`. The servers themselves live in ``infra/``:
:mod:`kiln.infra.server` (the OIP v2 REST API over a model pool), :mod:`kiln.infra.grpc_server` (the same
over gRPC), :mod:`kiln.infra.follow` (servers on ``NAME@ALIAS`` follow the alias) and :mod:`kiln.infra.gateway`.
``python -m kiln.infra.server`` and ``python -m kiln.infra.gateway`` run the same servers without the CLI.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Annotated, Any

import typer

from kiln.cli.support import ConfigOpt, exit_epilog, handle_errors, load
from kiln.errors import ConfigError

BACKENDS = ("auto", "onnxruntime", "tensorrt")


def _listen(host: str, port: int, what: str) -> socket.socket:
    """A listening socket on ``host:port``, or a :class:`ConfigError` saying the port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another {what}") from exc
    return sock


def _run(app: Any, sock: socket.socket) -> None:
    """Serve ``app`` with uvicorn on an already bound socket until Ctrl-C."""
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", timeout_keep_alive=30, access_log=False)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shut down gracefully, then re-raised Ctrl-C: a normal end, exit 0
        pass


@handle_errors
def serve(
    models: Annotated[list[str] | None, typer.Argument(
        metavar="NAME@ALIAS|NAME/VERSION", show_default=False,
        help="Registered versions to serve: NAME@ALIAS follows the alias (see --follow), NAME/VERSION never "
             "changes, NAME means NAME@champion.")] = None,
    package: Annotated[Path | None, typer.Option(help="Serve a Kiln package folder instead (no registry).")] = None,
    name: Annotated[str, typer.Option(help="Model name for --package.")] = "model",
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int | None, typer.Option(help="HTTP port (default: the server_port setting, 8000).",
                                             show_default=False)] = None,
    grpc: Annotated[bool, typer.Option(help="Also serve the OIP v2 gRPC API (GRPCInferenceService).")] = True,
    grpc_port: Annotated[int, typer.Option(help="gRPC port.")] = 8001,
    follow: Annotated[bool, typer.Option(help="Swap to the version an alias names when it moves: load beside, "
                                         "verify, swap, drain. --no-follow serves what it names now, for good.")
                      ] = True,
    follow_interval: Annotated[float | None, typer.Option(
        help="Seconds between looks at the registry (default: the follow_interval_s setting, 5; with "
             "--webhook-url, follow_webhook_interval_s, 60).", show_default=False)] = None,
    webhook_url: Annotated[str | None, typer.Option(
        help="Register an MLflow webhook that POSTs alias events to this URL, the address MLflow can reach this "
             "server's /hooks/mlflow at (e.g. http://this-host:8000/hooks/mlflow): the server then swaps as soon as "
             "an alias moves, and polls only as a safety net. Needs KILN_MLFLOW_WEBHOOK_SECRET and an MLflow "
             "server; the webhook is deleted when the server stops.", show_default=False)] = None,
    max_batch_size: Annotated[int, typer.Option(help="Most rows merged into one engine call.")] = 32,
    max_wait_ms: Annotated[float, typer.Option(help="Batching delay; 0 batches greedily.")] = 0.0,
    max_body_bytes: Annotated[int | None, typer.Option(help="Largest infer request body; larger ones get 413 "
                                                       "(default: the server_max_body_bytes setting, 8 MiB).",
                                                       show_default=False)] = None,
    max_rows: Annotated[int | None, typer.Option(help="Most rows per infer request; more get 413 (default: "
                                                 "4096, kiln.infra.oip.MAX_ROWS).", show_default=False)] = None,
    backend: Annotated[str, typer.Option(help="Engine backend: auto, onnxruntime or tensorrt.")] = "onnxruntime",
    threads: Annotated[int | None, typer.Option(help="Engine intra-op threads (default: KILN_THREADS if set, "
                                                "else one less than the CPUs).", show_default=False)] = None,
    fault_errors: Annotated[float, typer.Option(help="Fault drill: fail this share of engine calls.",
                                                rich_help_panel="Fault injection")] = 0.0,
    fault_latency_ms: Annotated[float, typer.Option(help="Fault drill: add this much latency per call.",
                                                    rich_help_panel="Fault injection")] = 0.0,
    fault_wrong: Annotated[float, typer.Option(help="Fault drill: answer a wrong label this often.",
                                               rich_help_panel="Fault injection")] = 0.0,
    config: ConfigOpt = None,
) -> None:
    """Serve registered model versions over the Open Inference Protocol v2 (HTTP, and gRPC on --grpc-port),
    with dynamic batching; runs until Ctrl-C.

    A server on NAME@ALIAS follows the alias: when it moves (a promotion, a rollback), the server fetches the
    new version, checks the registry's pin on it and runs a smoke test beside the version serving, then
    swaps with no request failing. If the new version fails, the old one keeps serving and says so: a log
    line, `kiln_server_swaps_total{result="failed"}` on /metrics and `last_error` in `GET /v2/models/NAME`
    (`parameters`: following, served_version, alias_version, pending_version, last_error). Every answer
    names its version (`model_version`). With KILN_MLFLOW_WEBHOOK_SECRET set, MLflow alias events POSTed to
    /hooks/mlflow wake the follower at once (--webhook-url registers that webhook). Bad input (an unknown
    model, a package that does not verify, a taken port) exits 2 before anything serves.
    """
    from kiln.infra.faults import Faults

    settings = load(config)
    if bool(models) == bool(package):
        raise ConfigError("give the registered versions to serve (NAME@ALIAS or NAME/VERSION) or --package "
                          "FOLDER, not both")
    if backend not in BACKENDS:
        raise ConfigError(f"unknown --backend {backend!r}; use {', '.join(BACKENDS)}")
    if (max_rows is not None and max_rows < 1) or (max_body_bytes is not None and max_body_bytes < 1024):
        raise ConfigError(f"--max-rows must be at least 1 (got {max_rows}) and --max-body-bytes at least 1024 "
                          f"(got {max_body_bytes})")
    if follow_interval is not None and follow_interval <= 0:
        raise ConfigError(f"--follow-interval must be a positive number of seconds, not {follow_interval:g}")
    from kiln.infra.follow_events import check_options

    check_options(settings, models or [], follow=follow, webhook_url=webhook_url)
    if package is not None and not (package / "kiln.json").is_file():
        raise ConfigError(f"{package} is not a Kiln package (no kiln.json); give a folder `kiln optimize` built")
    port = settings.server_port if port is None else port
    if grpc and grpc_port == port:
        raise ConfigError(f"--grpc-port {grpc_port} is the HTTP --port too; choose another, or --no-grpc")
    try:
        faults = Faults(fault_errors, fault_latency_ms, fault_wrong)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    sock = _listen(host, port, "--port")  # before the models load: a taken port fails in a second
    try:
        if grpc:
            from kiln.infra.grpc_server import add_grpc, check_port

            try:
                check_port(host, grpc_port)
            except OSError as exc:
                raise ConfigError(str(exc)) from exc
        app = _server_app(settings, models or [], package, name, faults, follow=follow,
                          follow_interval=follow_interval, webhook_url=webhook_url, backend=backend, threads=threads,
                          limits={"max_batch_size": max_batch_size, "max_wait_ms": max_wait_ms,
                                  "max_body_bytes": max_body_bytes or settings.server_max_body_bytes,
                                  **({"max_rows": max_rows} if max_rows else {})})
        if grpc:
            add_grpc(app, host=host, port=grpc_port)  # on the same event loop and model pool as HTTP
    except BaseException:
        sock.close()
        raise
    typer.echo(f"serving on http://{host}:{port}" + (f" and gRPC {host}:{grpc_port}" if grpc else "")
               + "; Ctrl-C stops", err=True)
    _run(app, sock)


def _server_app(settings: Any, refs: list[str], package: Path | None, name: str, faults: Any, *, follow: bool,
                follow_interval: float | None, webhook_url: str | None, backend: str, threads: int | None,
                limits: dict[str, Any]) -> Any:
    """The model server's ASGI app, its models loaded (and verified), followers attached and woken by MLflow
    alias events (the webhook registered when ``webhook_url``); ``limits`` are
    :func:`kiln.infra.server.create_app`'s batching and request-size keywords."""
    from kiln.infra.follow import follow_refs
    from kiln.infra.follow_events import follow_events
    from kiln.infra.oip import LLMLimits
    from kiln.infra.runtime import ServedModel
    from kiln.infra.server import create_app, load_registered, serving_threads, with_faults
    from kiln.tasks.engines import EngineOptions
    from kiln.tasks.models.predictor import Predictor

    options = EngineOptions(backend=backend, threads=threads or serving_threads(settings))
    served = load_registered(refs, settings, options) if refs else [ServedModel(name, "1", Predictor(package, options))]
    served = with_faults(served, faults)
    app = create_app(served, llm_limits=LLMLimits.from_settings(settings), **limits)
    if refs:
        followers = follow_refs(app.state.server.pool, refs, served, settings, options, follow=follow,
                                interval_s=follow_interval, prepare=lambda model: with_faults([model], faults)[0])
        follow_events(app, followers, settings, webhook_url=webhook_url, interval_given=follow_interval is not None)
    return app


@handle_errors
def gateway(
    champion: Annotated[str, typer.Option(help="Champion model server URL, e.g. http://127.0.0.1:8001.",
                                          show_default=False)],
    challenger: Annotated[str, typer.Option(help="Challenger model server URL, e.g. http://127.0.0.1:8002.",
                                            show_default=False)],
    champion_version: Annotated[str | None, typer.Option(help="Version label until the server says which it "
                                                         "serves (default: asked).", show_default=False)] = None,
    challenger_version: Annotated[str | None, typer.Option(help="Version label until the server says which it "
                                                           "serves (default: asked).", show_default=False)] = None,
    model_name: Annotated[str | None, typer.Option(help="The served model whose versions the upstreams are asked "
                                                   "for (default: learnt from the first request).",
                                                   show_default=False)] = None,
    weight: Annotated[float, typer.Option(help="Challenger weight, percent (0-100), to start from when the state "
                                          "file holds no split yet.")] = 0.0,
    state_file: Annotated[Path | None, typer.Option(help="Routing state (weights, shadow, versions) kept across "
                                                    "restarts (default: <KILN_HOME>/gateway/state-<port>.json).",
                                                    show_default=False)] = None,
    no_state_file: Annotated[bool, typer.Option("--no-state-file", help="Keep the routing state in memory only: "
                                                "a restart starts from --weight.")] = False,
    poll_interval: Annotated[float, typer.Option(help="How often each upstream is asked which version it serves, "
                                                 "seconds.")] = 2.0,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int | None, typer.Option(help="Port (default: the gateway_port setting, 8080).",
                                             show_default=False)] = None,
    timeout: Annotated[float, typer.Option(help="Upstream timeout, seconds.")] = 30.0,
    grpc_port: Annotated[int | None, typer.Option(help="Also serve the OIP v2 gRPC API on this port, routed like "
                                                  "HTTP (needs --champion-grpc and --challenger-grpc).",
                                                  show_default=False)] = None,
    champion_grpc: Annotated[str | None, typer.Option(metavar="HOST:PORT", help="The champion server's gRPC "
                                                      "address, e.g. 127.0.0.1:8001.", show_default=False)] = None,
    challenger_grpc: Annotated[str | None, typer.Option(metavar="HOST:PORT", help="The challenger server's gRPC "
                                                        "address, e.g. 127.0.0.1:8011.", show_default=False)] = None,
    config: ConfigOpt = None,
) -> None:
    """The canary gateway: one OIP v2 address in front of a champion and a challenger model server; runs
    until Ctrl-C.

    Requests go to the challenger by its weight (or by the X-Kiln-Sticky header's hash), a share can be
    mirrored to it (shadow), and `kiln rollout` moves the split through the admin API (`/admin/...`, bearer
    token KILN_GATEWAY_TOKEN, which must be set). The split survives a restart (--state-file); each upstream
    is asked which version it serves, so servers that follow an alias are reported as they swap. Prometheus
    metrics by upstream and version on /metrics. With --grpc-port (and --champion-grpc, --challenger-grpc: the
    servers' gRPC addresses) gRPC clients such as tritonclient.grpc are routed by the same split and counted in
    the same metrics, and mirrored to the challenger's gRPC API under the shadow share.
    """
    from kiln.infra.feedback_sink import sink_from_settings
    from kiln.infra.gateway import create_app, default_state_file, grpc_options_problem
    from kiln.infra.gateway_proxy import TOKEN_ENV, Gateway, Upstream

    settings = load(config)
    if settings.gateway_token is None or not settings.gateway_token.get_secret_value():
        raise ConfigError(f"set {TOKEN_ENV} (or gateway_token in kiln.yaml) to the admin API's bearer token")
    urls = {}
    for option, url in (("--champion", champion), ("--challenger", challenger)):
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"{option} {url!r} must be an http(s):// URL, e.g. http://127.0.0.1:8001")
        urls[option] = url.rstrip("/")
    if no_state_file and state_file is not None:
        raise ConfigError("give --state-file or --no-state-file, not both")
    port = settings.gateway_port if port is None else port
    if problem := grpc_options_problem(grpc_port, champion_grpc, challenger_grpc, port):
        raise ConfigError(problem)
    feedback = settings.gateway_feedback_token
    try:
        gw = Gateway(Upstream(urls["--champion"], champion_version), Upstream(urls["--challenger"], challenger_version),
                     settings.gateway_token.get_secret_value(), weight=weight, timeout_s=timeout,
                     model_name=model_name, poll_s=poll_interval, max_body_bytes=settings.server_max_body_bytes,
                     feedback_token=feedback and feedback.get_secret_value(),
                     text_sample=settings.gateway_text_sample,  # KILN_GATEWAY_TEXT_SAMPLE / kiln.yaml
                     feedback_sink=sink_from_settings(settings),  # scored rows as Parquet: feedback_store
                     state_file=None if no_state_file else state_file or default_state_file(settings.home, port))
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    sock = _listen(host, port, "--port")
    app = create_app(gw)
    if grpc_port is not None:
        from kiln.infra.gateway_grpc import add_grpc

        try:
            add_grpc(app, champion=champion_grpc, challenger=challenger_grpc, host=host, port=grpc_port)
        except OSError as exc:
            sock.close()
            raise ConfigError(str(exc)) from exc
    typer.echo(f"gateway on http://{host}:{port}" + (f" and gRPC {host}:{grpc_port}" if grpc_port is not None else "")
               + f": champion {urls['--champion']}, challenger {urls['--challenger']} at {weight:g}%; Ctrl-C stops",
               err=True)
    _run(app, sock)


def register_commands(app: typer.Typer) -> None:
    """Add ``serve`` and ``gateway`` to ``app``."""
    app.command(epilog=exit_epilog())(serve)
    app.command(epilog=exit_epilog())(gateway)
