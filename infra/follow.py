"""Servers that follow an alias: a model server started on ``NAME@ALIAS`` serves whichever version the alias names.

    kiln serve sentiment@champion     # follows @champion: looks at the registry every follow_interval_s (5 s)
    kiln serve sentiment/3            # pinned: never changes

Every ``interval_s`` an :class:`AliasFollower` reads the alias from the registry. When it names another version,
the follower fetches that version's package (``fetch_package`` checks the registry's pin and every file), opens
its engine beside the one serving, runs a smoke test on a few fixed texts (outputs of the right shape with
finite values; the same task and the same labels in the same order as the version serving; the top-1
agreement with it is logged, not judged: the gate judged quality already), then swaps it in
(:meth:`kiln.infra.runtime.ModelPool.swap`: requests in flight finish on the old version, none fails).

If the new version fails to load or verify, the old one keeps serving and says so three ways: a log line
naming the version and the reason, ``kiln_server_swaps_total{model,result="failed"}`` (with the gauge
``kiln_server_served_version{model,alias}``), and the ``parameters`` of ``/v2/models/NAME``:
``following`` (the alias), ``served_version``, ``alias_version`` (what the registry says now; null once the
alias is deleted), ``pending_version`` (named by the alias but not serving) and ``last_error``. A failed
version is tried again after a back-off (interval × 2^failures, at most 5 minutes), or at once by
:meth:`AliasFollower.check_now`. A deleted alias (``@challenger`` after a promotion) leaves the server serving
what it served, and saying so.

Polling is not the only way to notice: MLflow's alias webhooks (``model_version_alias.created`` / ``.deleted``)
posted to the server's ``POST /hooks/mlflow`` call :meth:`AliasFollower.check_now` at once
(:mod:`kiln.infra.follow_events`; ``kiln serve --webhook-url`` registers the webhook). The event only wakes the
follower, which reads the alias from the registry as a poll does; polling stays as the safety net.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from kiln.errors import ArtifactError
from kiln.infra.runtime import ModelPool, ModelRuntime, ServedModel
from kiln.settings import Settings
from kiln.tasks.registry import client as registry

log = logging.getLogger(__name__)

# Short, plain and different from each other: enough to exercise tokenizer, engine and post-processing.
SMOKE_TEXTS = ("what a great day", "this is awful, I want a refund", "the parcel arrived on tuesday",
               "not bad at all")
MAX_BACKOFF_S = 300.0
Outcome = Literal["unchanged", "swapped", "failed", "alias-missing", "registry-error", "backing-off"]


def smoke_test(predictor: Any, task: str, labels: Sequence[str]) -> list[str]:
    """Run :data:`SMOKE_TEXTS` through a freshly opened predictor; its top-1 answer per text.

    Args:
        predictor: The new version's :class:`~kiln.tasks.models.predictor.Predictor`.
        task: The task of the version it would replace.
        labels: The labels of the version it would replace.

    Raises:
        ArtifactError: The new version is no drop-in replacement: another task, other labels (or their
            order: clients read ``scores`` by position), outputs of the wrong shape or not finite.
    """
    meta, texts = predictor.meta, list(SMOKE_TEXTS)
    if meta.task != task:
        raise ArtifactError(f"it is a {meta.task} model and the version serving is a {task} model")
    if list(meta.labels) != list(labels):
        raise ArtifactError(f"its labels {list(meta.labels)} are not the serving version's {list(labels)} "
                            "(names and order must match: clients read scores by position)")
    ids, mask = predictor.encode(texts)
    logits = np.asarray(predictor.run(ids, mask))
    want = (len(texts), len(labels) or logits.shape[-1]) if task != "causal-lm" else (len(texts), ids.shape[1])
    if logits.shape[:2] != want or (task == "causal-lm") != (logits.ndim == 3):
        raise ArtifactError(f"its logits for {len(texts)} smoke texts have shape {list(logits.shape)}, "
                            f"expected {list(want)}{' x vocabulary' if task == 'causal-lm' else ''}")
    if not np.isfinite(logits).all():
        raise ArtifactError(f"its logits for the smoke texts hold {int((~np.isfinite(logits)).sum())} "
                            "non-finite values (NaN or inf)")
    answers = top1(predictor, task, texts)
    if len(answers) != len(texts) or (labels and not set(answers) <= set(labels)):
        raise ArtifactError(f"it answered {answers} for {len(texts)} smoke texts")
    return answers


def top1(predictor: Any, task: str, texts: list[str]) -> list[str]:
    """Each text's top-1 label (classifiers) or short greedy continuation (causal LMs)."""
    if task == "causal-lm":
        return [str(t) for t in predictor.predict(texts, max_new_tokens=2)["generated_text"]]
    frame = predictor.predict(texts)
    scores = np.asarray(frame["scores"].tolist(), dtype=float)
    if scores.shape[0] != len(texts) or not np.isfinite(scores).all():
        raise ArtifactError(f"its scores for {len(texts)} smoke texts have shape {list(scores.shape)} or are "
                            "not finite")
    return [str(label) for label in frame["label"]]


def _reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return (text if isinstance(exc, ArtifactError) else f"{type(exc).__name__}: {text}")[:500]


class AliasFollower:
    """Keeps one served model on the version its registry alias names (see the module docstring).

    Attach it to the pool (:meth:`ModelPool.attach`): it polls while the pool serves. Registry reads,
    downloads and engine loading run in worker threads, so serving goes on meanwhile.
    """

    def __init__(self, pool: ModelPool, ref: registry.ModelRef, model: ServedModel, settings: Settings,
                 options: Any, *, interval_s: float | None = None,
                 prepare: Callable[[ServedModel], ServedModel] | None = None) -> None:
        """
        Args:
            pool: The pool serving ``model``.
            ref: ``NAME@ALIAS``, the alias to follow.
            model: The version serving now (an object in ``pool``).
            settings: Where the registry is (``follow_interval_s``, ``cache_dir`` too).
            options: :class:`~kiln.tasks.engines.EngineOptions` for opening new versions.
            interval_s: Seconds between looks at the registry; default: ``settings.follow_interval_s``.
            prepare: Applied to each new version after its smoke test, before it serves (fault injection).
        """
        if ref.alias is None:
            raise ValueError(f"{ref} names a version, which never changes; follow NAME@ALIAS")
        self.pool, self.ref, self.model, self.settings, self.options = pool, ref, model, settings, options
        self.interval_s = interval_s or settings.follow_interval_s
        self.prepare = prepare or (lambda m: m)
        self.status: dict[str, Any] = {"following": ref.alias, "served_version": model.version,
                                       "alias_version": model.version, "pending_version": None, "last_error": None}
        model.status = self.status
        self._lock = asyncio.Lock()
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._failures: dict[str, tuple[int, float]] = {}  # version → (failed attempts, monotonic time of retry)
        self._client: Any = None
        self._said: str | None = None  # the last condition logged, so that a lasting one is logged once

    @property
    def where(self) -> str:
        return f"{self.ref.name}@{self.ref.alias}"

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._gauge()
        self._task = asyncio.create_task(self._run(), name=f"follow-{self.where}")
        log.info("%s: serving v%s, following the alias every %gs", self.where, self.model.version, self.interval_s)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.check_now(force=False)
            except Exception:  # a bug in a check must not end following; the next look tries again
                log.exception("%s: checking the alias failed", self.where)

    async def check_now(self, *, force: bool = True) -> Outcome:
        """Look at the alias now and swap if it moved; what happened.

        Args:
            force: Try a version that failed before without waiting for its back-off.
        """
        async with self._lock:
            return await self._check(force)

    def check_from_thread(self, timeout_s: float = 300.0) -> Outcome:
        """:meth:`check_now` from another thread (a test, or code that just moved the alias), on the loop the
        server runs on; blocks until it is done."""
        if self._loop is None:
            raise RuntimeError(f"{self.where}: not following yet (the server has not started)")
        return asyncio.run_coroutine_threadsafe(self.check_now(), self._loop).result(timeout_s)

    async def _check(self, force: bool) -> Outcome:
        served = self.model.version
        try:
            target = await asyncio.to_thread(self._alias_target)
        except Exception as exc:  # noqa: BLE001 - an unreachable registry is reported and retried, never fatal
            return self._condition(f"cannot read @{self.ref.alias} from the registry ({_reason(exc)}); still "
                                   f"serving v{served}", "registry-error")
        self.status["alias_version"] = target
        if target is None:
            self.status["pending_version"] = None
            return self._condition(f"alias @{self.ref.alias} no longer exists in the registry; still serving "
                                   f"v{served}", "alias-missing", level=logging.INFO)
        if target == served:
            self.status.update(pending_version=None, last_error=None)
            self._said = None
            return "unchanged"
        attempts, retry_at = self._failures.get(target, (0, 0.0))
        if not force and time.monotonic() < retry_at:
            return "backing-off"
        self.status["pending_version"] = target
        try:
            new, agreement = await self._open(target)
        except Exception as exc:  # noqa: BLE001 - whatever went wrong, the old version keeps serving
            attempts += 1
            wait = min(self.interval_s * 2 ** attempts, MAX_BACKOFF_S)
            self._failures[target] = (attempts, time.monotonic() + wait)
            self.pool.metrics.swaps.labels(self.ref.name, "failed").inc()
            self.status["last_error"] = f"v{target} refused: {_reason(exc)}"
            self._said = None
            log.error("%s: v%s failed to load or verify, still serving v%s: %s (next try in %.0fs)", self.where,
                      target, served, _reason(exc), wait, exc_info=not isinstance(exc, ArtifactError))
            return "failed"
        await self.pool.swap(self.ref.name, new, replaces=self.model)
        self.model = new
        self._failures.pop(target, None)
        self.status.update(served_version=target, pending_version=None, last_error=None)
        self._said = None
        self.pool.metrics.swaps.labels(self.ref.name, "swapped").inc()
        self._gauge()
        shown = "unknown" if agreement is None else f"{agreement:.0%}"
        log.info("%s: now serving v%s (was v%s); top-1 agreement with v%s on %d smoke texts: %s", self.where,
                 target, served, served, len(SMOKE_TEXTS), shown)
        return "swapped"

    def _condition(self, message: str, outcome: Outcome, *, level: int = logging.WARNING) -> Outcome:
        """Record a lasting condition in the metadata; log it when it is new."""
        self.status["last_error"] = message
        if message != self._said:
            log.log(level, "%s: %s", self.where, message)
            self._said = message
        return outcome

    def _connect(self) -> Any:
        if self._client is None:
            self._client = registry.connect(self.settings)
        return self._client

    def _alias_target(self) -> str | None:
        return registry.aliases_of(self._connect(), self.ref.name).get(self.ref.alias)

    def _fetch(self, target: str) -> tuple[Path, tuple[str, ...]]:
        client = self._connect()
        version = registry.resolve(client, registry.ModelRef(self.ref.name, version=target))
        folder = registry.fetch_package(client, version, self.settings.cache_dir / "serving")
        return folder, tuple(dict.fromkeys([*(version.aliases or []), self.ref.alias]))

    async def _open(self, target: str) -> tuple[ServedModel, float | None]:
        """Fetch, open and smoke-test ``target`` beside the serving version; the model and top-1 agreement."""
        from kiln.tasks.models.predictor import Predictor

        old = self.model
        labels = list(old.predictor.meta.labels)
        folder, aliases = await asyncio.to_thread(self._fetch, target)
        predictor = await asyncio.to_thread(Predictor, folder, self.options)
        answers = await asyncio.to_thread(smoke_test, predictor, old.task, labels)
        agreement = None
        runtime = self._runtime(old)
        if runtime is not None:  # the old engine's own thread: engines are not guaranteed thread-safe
            try:
                before = await asyncio.get_running_loop().run_in_executor(
                    runtime.executor, top1, old.predictor, old.task, list(SMOKE_TEXTS))
                agreement = float(np.mean([a == b for a, b in zip(answers, before, strict=True)]))
            except Exception as exc:  # noqa: BLE001 - information only (a faulty old version may fail here)
                log.info("%s: no agreement figure, v%s failed the smoke texts: %s", self.where, old.version,
                         _reason(exc))
        new = self.prepare(ServedModel(self.ref.name, target, predictor, aliases))
        new.status = self.status
        return new, agreement

    def _runtime(self, model: ServedModel) -> ModelRuntime | None:
        return next((rt for rt in self.pool.runtimes.get(model.name, []) if rt.model is model), None)

    def _gauge(self) -> None:
        if self.model.version.isdigit():
            self.pool.metrics.served_version.labels(self.ref.name, self.ref.alias).set(int(self.model.version))


def follow_refs(pool: ModelPool, refs: Sequence[str], models: Sequence[ServedModel], settings: Settings,
                options: Any, *, follow: bool = True, interval_s: float | None = None,
                prepare: Callable[[ServedModel], ServedModel] | None = None) -> list[AliasFollower]:
    """Attach an :class:`AliasFollower` to ``pool`` for each ``NAME@ALIAS`` of ``refs``; mark the others pinned.

    Args:
        pool: The pool serving ``models``.
        refs: What the server was started on, one per model (``NAME``, ``NAME@ALIAS`` or ``NAME/VERSION``).
        models: The served models, in the order of ``refs`` (the objects in ``pool``).
        follow: False: serve what the aliases name now and never change (``--no-follow``).
        interval_s, prepare: As for :class:`AliasFollower`.
    """
    followers = []
    for text, model in zip(refs, models, strict=True):
        ref = registry.ModelRef.parse(text)
        if ref.alias is not None and follow:
            follower = AliasFollower(pool, ref, model, settings, options, interval_s=interval_s, prepare=prepare)
            pool.attach(follower)
            followers.append(follower)
        else:
            model.status = {"following": None, "served_version": model.version}
    return followers
