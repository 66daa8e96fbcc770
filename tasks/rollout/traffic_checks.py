"""What the rollout driver checks and says about live traffic, in the words of the router it drives.

    check_versions     the router must send traffic to the versions the rollout judges, or its evidence is
                       about another model
    reset_after_error  all traffic back on the champion after an error, and where traffic truly stands:
                       "back on the champion" only once the router confirms it, otherwise what it reports,
                       whether the split lapses by itself, and how to reset it by hand

The router says what it is, how it is reset by hand and whether its split lapses (``describe()``,
:class:`~kiln.tasks.rollout.router.RouterHint`): the Kiln gateway's admin API, an HTTPRoute's weights, an
InferenceService's canaryTrafficPercent.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from kiln.tasks.rollout.params import RolloutError
from kiln.tasks.rollout.router import CanaryRouter, RouterHint, hint_of


def check_versions(router: CanaryRouter, model: str, expected: dict[str, str | None], *,
                   require_known: bool = True) -> None:
    """Refuse a router whose upstreams serve other versions than ``expected`` (``{role: version}``).

    Fails closed: with ``require_known`` (once a window was judged), an upstream that does not say which version
    it serves stops the rollout too. Before any traffic moved, versions not learnt yet may be missing.
    """
    served = router.served_versions()
    what = hint_of(router).what
    for role, version in expected.items():
        serving = served.get(role)
        if serving and version and str(serving) != str(version):
            raise RolloutError(f"the {role} upstream of {what} serves v{serving}, but @{role} of {model} is "
                               f"v{version}; point {what} at the right model server ({model}@{role})")
        if require_known and version and not serving:
            raise RolloutError(f"{what} does not say which version its {role} upstream serves (expected "
                               f"v{version} of {model}), so its evidence cannot be trusted; put a Kiln model server "
                               "there (it names its version in every answer)")


def reset_after_error(router: CanaryRouter, put_back: Callable[[], None], ttl_s: float | None) -> str:
    """Run ``put_back`` (all traffic on the champion), then say where traffic stands, as the router reports it.

    Args:
        router: the router the rollout drove.
        put_back: puts all traffic back on the champion (the driver's, so its own state follows).
        ttl_s: the TTL of the split the rollout held when the error came (None: it held none).
    """
    hint = hint_of(router)
    try:
        put_back()
        now = router.read_split()
        if now.weight == 0 and now.shadow == 0:
            return "traffic back on the champion"
        problem = f"{hint.what} still sends {now.weight:g}% to the challenger (shadow {now.shadow:g})"
    except Exception as exc:  # noqa: BLE001 - the rollout is failing anyway; this is about telling the truth
        problem = f"traffic could NOT be put back on the champion ({str(exc)[:200]})"
        with contextlib.suppress(Exception):
            now = router.read_split()
            problem += f"; {hint.what} reports {now.weight:g}% on the challenger"
    return f"{problem}: {lapse_note(hint, ttl_s)}to reset it now, {hint.reset}"


def lapse_note(hint: RouterHint, ttl_s: float | None) -> str:
    """Whether a split left behind goes back to the champion by itself (with its trailing "; ")."""
    if not ttl_s:
        return ""
    if hint.lapses:
        return f"the split lapses to the champion by itself within {ttl_s:g} s of its last renewal; "
    return f"nothing reverts the split on {hint.what} by itself; "
