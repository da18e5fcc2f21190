"""The notebooks in a real browser: JupyterLab served here, Debian's chromium driven by Playwright.

Every notebook is opened and run top to bottom; no cell may show an error, and every widget must
render (not "Loading widget..." or "Error displaying widget"). Each widget's screenshot, and one
of the whole notebook, go to ``build/test-artifacts`` (or ``$DINB_ARTIFACTS``). Notebook 03 is
also driven: its MLP explorer's device count goes from 2 to 4, and the tile grid and the bytes
per rank must follow.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "03_strategy_explorer.ipynb"
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]
ARTIFACTS = Path(os.environ.get("DINB_ARTIFACTS", ROOT / "build" / "test-artifacts"))

pytestmark = pytest.mark.browser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory):
    """JupyterLab on 127.0.0.1 with a copy of every notebook, in its own config directories."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing; `make test` installs it (apt-get install chromium)")
    base = tmp_path_factory.mktemp("lab")
    root = base / "notebooks"
    root.mkdir()
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:  # the browser must produce every output itself
            if cell.cell_type == "code":
                cell.outputs, cell.execution_count = [], None
        nbformat.write(nb, root / path.name)
    for beside in ("benchmarks", "tests"):  # what notebook 07 reads from the checkout, as in Binder's
        (base / beside).symlink_to(ROOT / beside)
    port, token = _free_port(), "dinb-browser-test"
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(base / "config"), JUPYTER_RUNTIME_DIR=str(base / "runtime"),
               JUPYTERLAB_SETTINGS_DIR=str(base / "settings"), JUPYTERLAB_WORKSPACES_DIR=str(base / "ws"),
               JUPYTER_DATA_DIR=str(base / "data"))
    env.pop("JAX_PLATFORMS", None)
    # every cell in the page, not only those in view: the checks read all outputs
    tracker = base / "settings" / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings"
    tracker.parent.mkdir(parents=True)
    tracker.write_text('{"windowingMode": "none"}')
    log = open(base / "lab.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
         f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
         f"--ServerApp.root_dir={root}", "--LabApp.news_url=", "--LabApp.extension_manager=readonly",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
        + (["--allow-root"] if os.geteuid() == 0 else []),
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"JupyterLab did not start within 90 s; its log:\n"
                            f"{(base / 'lab.log').read_text(errors='replace')[-3000:]}")
            time.sleep(0.5)
    yield url, token, root
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@contextlib.contextmanager
def lab_page(name: str):
    """A chromium page (headless); on a failure, a screenshot of it as ``{name}_failure.png``."""
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 2200})
        page.set_default_timeout(60_000)
        try:
            yield page
        except Exception:
            page.screenshot(path=str(ARTIFACTS / f"{name}_failure.png"), full_page=True)
            raise
        finally:
            browser.close()


def open_and_run(page, url: str, token: str, name: str) -> None:
    """Open a notebook in JupyterLab, start its kernel and run all its cells (not waiting)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import expect

    # a workspace of its own: JupyterLab would reopen the notebooks of the tests before
    page.goto(f"{url}/lab/workspaces/{Path(name).stem}/tree/{name}?reset&token={token}")
    page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=120_000)
    select = page.locator(".jp-Dialog button", has_text="Select")
    try:  # JupyterLab may ask which kernel to start
        select.wait_for(timeout=10_000)
        select.click()
    except PlaywrightTimeout:
        pass
    idle = page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']")
    expect(idle).to_have_count(1, timeout=120_000)
    no_news = page.get_by_role("button", name="No", exact=True)
    if no_news.count():  # JupyterLab asks whether to fetch its news; it must not
        no_news.first.click()
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()


def wait_until_all_ran(page, name: str, timeout_s: float = 600):
    """Wait until every code cell of the open notebook is numbered, or an error shows; the
    errors shown (a locator)."""
    # a folded input (an exercise's reference answer) shows a placeholder, not its prompt
    prompts = page.locator(".jp-CodeCell:not(:has(.jp-InputPlaceholder)) .jp-InputPrompt")
    deadline = time.monotonic() + timeout_s
    while True:
        texts = prompts.all_inner_texts()
        errors = page.locator(STDERR, has_text="Traceback")
        if errors.count() or (texts and all(re.search(r"\[\d+\]", t) for t in texts)):
            return errors
        assert time.monotonic() < deadline, f"{name} did not finish within {timeout_s:.0f} s: {texts}"
        time.sleep(1)


def shut_down_kernels(url: str, token: str) -> None:
    """End every kernel of the lab (each notebook's kernel goes once its test is done)."""
    import json

    with urllib.request.urlopen(f"{url}/api/kernels?token={token}", timeout=10) as r:
        kernels = json.loads(r.read())
    for k in kernels:
        req = urllib.request.Request(f"{url}/api/kernels/{k['id']}?token={token}", method="DELETE")
        urllib.request.urlopen(req, timeout=30).close()


BROKEN_WIDGET = ("Loading widget...", "Error displaying widget")
STDERR = ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']"


def widget_outputs(path: Path) -> int:
    """How many widget views the notebook as stored displays and keeps (not counting progress bars,
    which close when done)."""
    nb = nbformat.read(path, as_version=4)
    return sum("application/vnd.jupyter.widget-view+json" in o.get("data", {})
               and not re.search(r"\d+%\|", o["data"].get("text/plain", ""))
               for c in nb.cells if c.cell_type == "code" for o in c.outputs)


@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if p != NOTEBOOK], ids=lambda p: p.stem)
def test_every_notebook_runs_in_jupyterlab_with_its_widgets(lab, path):
    url, token, root = lab
    try:
        with lab_page(path.stem) as page:
            open_and_run(page, url, token, path.name)
            errors = wait_until_all_ran(page, path.name)
            assert errors.count() == 0, f"{path.name}: {errors.first.inner_text()[-2000:]}"
            page.wait_for_timeout(1000)  # the last widget views render
            outputs = page.locator(".jp-OutputArea-output")
            for text in BROKEN_WIDGET:
                assert outputs.filter(has_text=text).count() == 0, f"{path.name}: a widget shows {text!r}"
            # every widget the stored notebook shows is drawn here too
            widgets = outputs.filter(has=page.locator(".jupyter-widgets"))
            expected = widget_outputs(path)
            assert widgets.count() >= expected, f"{path.name}: {widgets.count()} widgets drawn of {expected}"
            for i in range(widgets.count()):
                widgets.nth(i).scroll_into_view_if_needed()
                widgets.nth(i).screenshot(path=str(ARTIFACTS / f"{path.stem}_widget_{i}.png"))
            page.screenshot(path=str(ARTIFACTS / f"{path.stem}_in_jupyterlab.png"), full_page=True)
    finally:
        shut_down_kernels(url, token)


def test_explorer_follows_the_device_count_in_jupyterlab(lab):
    from playwright.sync_api import expect

    url, token, root = lab
    with lab_page(NOTEBOOK.stem) as page:
        open_and_run(page, url, token, NOTEBOOK.name)
        # the last cell prints this once everything above it ran
        done = page.get_by_text("every rank within tolerance of numpy: True")
        expect(done).to_be_visible(timeout=300_000)

        explorer = page.locator(".dinb-explorer").filter(
            has=page.locator("svg.dinb-tiles[data-tensor='w1']")).first
        explorer.scroll_into_view_if_needed()
        w1 = explorer.locator("svg.dinb-tiles[data-tensor='w1']")
        bars = explorer.locator("svg.dinb-bytes")
        expect(w1).to_have_attribute("data-tiles", "2")
        expect(w1.locator("g.dinb-tile")).to_have_count(2)
        expect(bars).to_have_attribute("data-ranks", "2")
        bytes_2 = int(bars.locator("g.dinb-rank-bar[data-rank='0']").get_attribute("data-bytes"))
        explorer.screenshot(path=str(ARTIFACTS / "strategy_explorer_mlp_2_ranks.png"))

        explorer.locator(".dinb-devices select").select_option("4")

        expect(w1).to_have_attribute("data-tiles", "4", timeout=60_000)
        expect(w1.locator("g.dinb-tile")).to_have_count(4)
        expect(bars).to_have_attribute("data-ranks", "4")
        expect(bars.locator("g.dinb-rank-bar")).to_have_count(4)
        bytes_4 = int(bars.locator("g.dinb-rank-bar[data-rank='0']").get_attribute("data-bytes"))
        assert bytes_4 < bytes_2, (bytes_2, bytes_4)
        expect(explorer.locator("tr.dinb-collective[data-kind='all-reduce']")).to_have_attribute(
            "data-group-size", "4")
        explorer.screenshot(path=str(ARTIFACTS / "strategy_explorer_mlp_4_ranks.png"))
        page.screenshot(path=str(ARTIFACTS / "notebook_04_in_jupyterlab.png"), full_page=True)


def test_the_pool_picture_goes_back_over_a_generation_in_jupyterlab(lab):
    """Notebook 07's live picture of a paged cache: drawn empty after the generation, and the
    slider brings back the step where three questions held 9 blocks."""
    from playwright.sync_api import expect

    url, token, root = lab
    path = ROOT / "notebooks" / "07_generation.ipynb"
    try:
        with lab_page(path.stem) as page:
            open_and_run(page, url, token, path.name)
            picture = page.locator(".dinb-pool-picture").first
            expect(picture.locator(".dinb-pool-caption")).to_contain_text("after", timeout=300_000)
            pool = picture.locator("svg.dinb-pool")
            expect(pool).to_have_attribute("data-held", "0")
            expect(pool.locator("rect.dinb-block")).to_have_count(10)
            # the slider's steps come from the kernel: let it finish the notebook's later cells first
            # (they also remove the notebook's temporary folder)
            assert wait_until_all_ran(page, path.name).count() == 0
            picture.scroll_into_view_if_needed()
            readout = picture.locator(".widget-readout")
            readout.click()
            page.keyboard.press("Control+A")
            page.keyboard.type("1")
            page.keyboard.press("Enter")
            expect(picture.locator(".dinb-pool-caption")).to_contain_text("step 1", timeout=30_000)
            expect(pool).to_have_attribute("data-held", "9")
            picture.screenshot(path=str(ARTIFACTS / "pool_picture_step_1.png"))
    finally:
        shut_down_kernels(url, token)
