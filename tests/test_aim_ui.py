"""Aim's own UI shows the trained run: `aim up` on 127.0.0.1, its REST API, and the page in headless Chromium."""
import pytest
from conftest import ARTIFACTS, CHROMIUM_ARGS, aim_process, get_json

pytestmark = pytest.mark.slow


@pytest.fixture
def aim_up(trained):
    with aim_process("up", "--repo", trained["out"]) as port:
        yield f"http://127.0.0.1:{port}"


def test_aim_ui_lists_the_run(trained, aim_up, chromium):
    from aim import Repo
    run_hash = Repo(str(trained["out"])).list_all_runs()[0]
    info = get_json(f"{aim_up}/api/runs/{run_hash}/info/")
    assert info["props"]["experiment"]["name"] == "pytest"
    assert info["params"]["hparams"]["arch"] == "resnet50"

    from playwright.sync_api import sync_playwright
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"{aim_up}/runs", wait_until="networkidle", timeout=60000)
            page.get_by_text(f"Run: {run_hash}").wait_for(timeout=60000)
            assert "pytest" in page.inner_text("body")
            page.screenshot(path=str(ARTIFACTS / "aim-ui-runs.png"))
        finally:
            browser.close()
    assert (ARTIFACTS / "aim-ui-runs.png").stat().st_size > 10000
