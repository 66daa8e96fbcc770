"""Kiln's Prefect forms seen in a real browser: Prefect's own UI on loopback, in Debian's headless Chromium.

The session's Prefect test server holds the deployments (registered as ``kiln serve-flows`` builds them:
:func:`kiln.deployments.deployments`) and a real rollout flow run paused at a manual gate; Prefect's UI app
serves against it (:func:`tests.chromium.prefect_ui`), and Playwright reads the rendered DOM. Screenshots go
to the test's tmp dir; their paths are in the assertion messages.

These tests run wherever Chromium is installed (``infra/ci/services.sh`` installs it); they skip only when it
is not there, saying so.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from kiln.tasks.compress.recipes import library
from kiln.tasks.registry import client as registry
from tests.chromium import CHROMIUM, TIMEOUT_MS, WHY_NOT, choices, chromium, field, pick, prefect_ui
from tests.integration.test_rollout import _spec, _stack
from tests.integration.test_rollout_pause import _Run, _token, cli, tiny  # noqa: F401 - fixtures

pytestmark = [pytest.mark.browser, pytest.mark.timeout(120),
              pytest.mark.skipif(CHROMIUM is None, reason=WHY_NOT)]


@pytest.fixture(scope="module")
def ui(prefect_server):
    """Prefect's UI on loopback against the session's Prefect API; yields its base URL."""
    from prefect.settings import PREFECT_API_URL

    with prefect_ui(PREFECT_API_URL.value()) as url:
        yield url


@pytest.fixture(scope="module")
def browser(ui, tmp_path_factory):
    with chromium(tmp_path_factory.mktemp("chromium-cache")) as launched:
        yield launched


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1600})
    context.set_default_timeout(TIMEOUT_MS)
    opened = context.new_page()
    yield opened
    context.close()


@pytest.fixture(scope="module")
def deployment_ids(prefect_server, settings_module):
    """The kiln-optimize and kiln-demo deployments, registered as ``kiln serve-flows`` makes them.

    Built in a thread of their own: Playwright's sync API runs an event loop in this one, and Prefect's
    ``to_deployment``/``apply`` would then hand back coroutines."""
    from kiln.deployments import deployments

    def register() -> dict[str, str]:
        made = {d.name: d for d in deployments(settings_module)}
        return {name: str(made[name].apply()) for name in ("kiln-optimize", "kiln-demo")}

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(register).result(timeout=60)


@pytest.fixture(scope="module")
def settings_module(tmp_path_factory):
    from kiln.settings import Settings

    return Settings(home=tmp_path_factory.mktemp("kiln-home"))


def _shot(page, path) -> str:
    page.screenshot(path=str(path), full_page=True)
    return f"(screenshot: {path})"


def test_optimize_form_renders_its_fields_and_choices(page, ui, deployment_ids, tmp_path):
    page.goto(f"{ui}/deployments/deployment/{deployment_ids['kiln-optimize']}/run")
    page.get_by_text("Backend (Optional)", exact=True).wait_for()
    seen = _shot(page, tmp_path / "optimize-form.png")
    labels = set(page.locator(".schema-form-property__label").all_inner_texts())
    assert {"Model", "Recipes (Optional)", "Recipe File (Optional)", "Policy (Optional)", "Backend (Optional)",
            "Seq Len (Optional)", "Eval Limit (Optional)"} <= labels, f"{sorted(labels)} {seen}"
    assert choices(page, field(page, "Backend (Optional)")) == ["onnxruntime", "tensorrt", "auto"], seen
    recipes = field(page, "Recipes (Optional)")  # a multi-select holding the defaults as tags
    assert recipes.locator(".p-tag").all_inner_texts() == ["onnx-fp32", "int8-dynamic"], seen


def test_optimize_form_offers_the_recipe_names_as_choices(page, ui, deployment_ids, tmp_path):
    page.goto(f"{ui}/deployments/deployment/{deployment_ids['kiln-optimize']}/run")
    recipes = field(page, "Recipes (Optional)")
    recipes.wait_for()
    seen = _shot(page, tmp_path / "optimize-recipes.png")
    assert recipes.locator(".schema-form-property-kind-json").count() == 0, f"recipes drawn as JSON editors {seen}"
    assert choices(page, recipes) == sorted(library()), seen


def test_demo_form_offers_every_named_recipe_in_a_dropdown(page, ui, deployment_ids, tmp_path):
    page.goto(f"{ui}/deployments/deployment/{deployment_ids['kiln-demo']}/run")
    recipes = field(page, "Recipes (Optional)")
    recipes.wait_for()
    seen = _shot(page, tmp_path / "demo-form.png")
    assert recipes.locator(".p-tag").all_inner_texts() == ["onnx-fp32", "int8-dynamic"], seen
    assert choices(page, recipes) == sorted(library()), seen


def test_rollout_paused_at_a_gate_shows_paused_with_its_form_and_the_form_aborts_it(
        page, ui, tiny, settings, cli, keys, tmp_path, monkeypatch):  # noqa: F811 - fixtures imported above
    spec = _spec(tmp_path, [{"weight": 100, "analysis_s": 1.0, "manual_gate": True}])
    with _stack() as stack:
        run = _Run(spec, monkeypatch, stack.url)
        paused = run.flow_run(deadline_s=30)
        page.goto(f"{ui}/runs/flow-run/{paused.id}")
        page.get_by_text(run.name, exact=True).first.wait_for()
        badge = page.locator(".state-badge").first
        badge.wait_for()
        shown = _shot(page, tmp_path / "run-page.png")
        assert badge.inner_text().strip() == "Paused", f"{badge.inner_text()!r} {shown}"
        resume = page.get_by_role("button", name="Resume", exact=True)
        assert resume.is_visible(), shown
        resume.click()
        form = page.locator(".p-modal").filter(has_text="Resume Flow Run")
        form.get_by_text("Decision (Optional)", exact=True).wait_for()
        seen = _shot(page, tmp_path / "gate-form.png")
        labels = set(form.locator(".schema-form-property__label").all_inner_texts())
        assert {"Decision (Optional)", "Reason (Optional)", "Token (Optional)"} <= labels, f"{labels} {seen}"
        assert "step 1 has a manual gate" in form.inner_text(), f"the gate's description is missing {seen}"
        decision = field(page, "Decision (Optional)")
        assert choices(page, decision) == ["resume", "promote", "abort"], seen

        # Answer in the UI as a person does: abort, with bob's signed command pasted into Token.
        token = _token(cli, "rollout", "abort", "tiny", "--key", str(keys.key("bob")), "--reason", "seen in the UI")
        pick(page, decision, "abort")
        field(page, "Reason (Optional)").locator("textarea").fill("seen in the UI")
        field(page, "Token (Optional)").locator("textarea").fill(token)
        seen = _shot(page, tmp_path / "gate-form-filled.png")
        form.get_by_role("button", name="Submit").click()
        result = run.join(timeout=60)
        assert stack.gw.routing.weight == 0
    assert result["status"] == "aborted" and "bob" in result["message"], f"{result} {seen}"
    assert registry.aliases_of(tiny, "tiny") == {"champion": "1"}
