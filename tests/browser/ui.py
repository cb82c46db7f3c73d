"""Drive the MLflow 3 web UI in a real (headless) Chromium, for end-to-end tests.

Independent of how the tracking store was produced: point :func:`mlflow_server`
at any ``sqlite:///...`` (or other) backend store and the artifacts directory
that ``mlflow-artifacts:/`` URIs resolve to, then use the page helpers.

Import it as ``from browser import ui`` (pytest puts ``tests/`` on sys.path, as
for ``slurm_fixture``; ``tests`` itself is not a package).  Typical use::

    with ui.mlflow_server(f"sqlite:///{tmp}/mlflow.db", tmp / "artifacts") as base, \\
         ui.chromium_driver(tmp / "shots") as driver:
        ui.open_experiment(driver, base, exp_id, expected_runs=4)
        ui.show_param_column(driver, "kernel.weighting", ["paper", "inv_stride", "unit"])
        ui.open_compare(driver, base, child_ids, exp_id, param_key="kernel.weighting")
        ui.open_artifact(driver, base, exp_id, child_ids[0], "figures/samples.png")

Every page helper waits with a bounded ``WebDriverWait``; on timeout it saves a
``FAILED-<name>.png`` screenshot and raises :class:`UITimeout` carrying the URL,
the visible page text and the browser console errors.  On success it saves
``<name>.png`` into the driver's screenshot directory and returns its path.

Nothing here contacts any host but 127.0.0.1: MLflow telemetry is disabled in
the server's environment, and Chromium resolves every other host name to
NOTFOUND (``--host-resolver-rules``) with background networking disabled.

MLflow 3.17/3.18 UI notes (what the selectors rely on):
  * The experiment page defaults to the GenAI workflow (traces overview); the
    runs table lives at ``#/experiments/<id>/runs?workflowType=machine_learning``.
    On a first visit (no localStorage) ``#/experiments/<id>`` opens "Send your
    first trace", while ``#/experiments/<id>/runs`` ("Training runs") and
    ``#/experiments/<id>/runs/<run_id>`` (the run page) show the runs as they
    are: the addresses the training summary prints (checked with 3.18.0).
  * The runs table is an ag-grid: rows are ``[role=row][row-id=<run_id>]`` (each
    row is split into pinned-left/center/right containers, so a row-id appears
    several times); the run-name cell is ``[role=gridcell][col-id="attributes.`Run Name`"]``
    with an ``<a href="#/experiments/<id>/runs/<run_id>">``; child runs are
    collapsed under their parent, whose run-name cell holds the only ``<button>``
    (a +/- expander).
  * Param/metric columns are off by default; they are added through the
    "Columns" popover (``[data-testid=column-selection-dropdown]``, a search box
    and an antd tree of checkboxes grouped under "Metrics (n)"/"Parameters (n)");
    the column's col-id is ``params.`<key>``` / ``metrics.`<key>```.
  * Compare view: ``#/compare-runs?runs=[...]&experiments=[...]`` (JSON lists);
    run names are in the ``<tr>`` whose ``<th>`` is "Run Name:", params in
    ``table.mlflow-compare-table`` rows whose ``<th>`` is the param key.
  * Artifact view: ``#/experiments/<id>/runs/<run_id>/artifacts/<path>``; images
    are rendered as ``<img src="blob:..." alt="<path>">``.
  * Run page: ``#/experiments/<id>/runs/<run_id>`` (Overview tab): the run's
    description (the ``mlflow.note.content`` tag, rendered markdown), a metrics
    table with a "System metrics (n)" group, "About this run" (Source, git
    commit), Datasets and Tags; its visible text is what :func:`open_run` reads.
  * Console errors "ajax-api/2.0/mlflow/users/current ... 404" are normal
    (no auth app); they are reported on timeouts only for context.
  * The "MLflow Assistant" side panel auto-opens on a local server; it and the
    GenAI/ML workflow switch are preset through localStorage before page load.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable, Iterator, Sequence

CHROMIUM = os.environ.get("IMM_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("IMM_CHROMEDRIVER", "/usr/bin/chromedriver")

#: default bound for every explicit wait (seconds)
DEFAULT_TIMEOUT = float(os.environ.get("IMM_UI_TIMEOUT", "60"))

CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # /dev/shm is tiny in many containers; Debian's wrapper adds this too when it is.
    "--disable-dev-shm-usage",
    "--disable-default-apps",
    "--disable-extensions",
    "--no-default-browser-check",
    "--hide-scrollbars",
    # Never reach anything but the local MLflow server (no telemetry/CDN/fonts).
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1 , EXCLUDE localhost",
)

# localStorage presets applied before any MLflow page script runs
# (MLflow's useLocalStorage stores JSON under "<key>_v<version>").
_LOCAL_STORAGE_PRESETS = {
    "mlflow.workflowType_v1": json.dumps("machine_learning"),
    "mlflow.assistant.panelOpen_v1": "false",
    "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true",
    "mlflow.detectIssues.guidanceShown_v1": "true",
    "mlflow.flagForReview.guidanceShown_v1": "true",
}

RUN_NAME_CELL = '[role=gridcell][col-id="attributes.`Run Name`"]'


class UITimeout(AssertionError):
    """A bounded wait on the MLflow UI ran out."""


# ----------------------------------------------------------------------------
# availability
# ----------------------------------------------------------------------------


def browser_missing_reason() -> str | None:
    """None when chromium, chromedriver and selenium are usable, else why not."""
    for path, pkg in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            return f"{path} not found (apt-get install {pkg}; see .ci/browser-deps.sh)"
    if importlib.util.find_spec("selenium") is None:
        return "python package 'selenium' is not installed (pip install 'selenium>=4.20')"
    return None


# ----------------------------------------------------------------------------
# MLflow server
# ----------------------------------------------------------------------------


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 6000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError as e:  # pragma: no cover
        return f"<could not read {path}: {e}>"


def _kill_group(proc: subprocess.Popen, grace: float = 15.0) -> None:
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@contextlib.contextmanager
def mlflow_server(
    backend_store_uri: str,
    artifacts_dir: str | os.PathLike,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    startup_timeout: float = 120.0,
    log_path: str | os.PathLike | None = None,
) -> Iterator[str]:
    """Run ``mlflow server`` on 127.0.0.1 for the duration of the block; yield its base URL.

    ``--serve-artifacts --artifacts-destination <artifacts_dir>`` makes the server
    proxy ``mlflow-artifacts:/`` URIs to ``artifacts_dir`` (and new experiments
    created through the server land there).  Runs whose artifact URI is a plain
    local path (``file:///...``, what a client logging straight into a sqlite
    store produces) are read from that path directly.

    The server runs in its own process group, which is terminated on exit.  If it
    fails to come up, or the block raises, the server log tail is surfaced
    (in the exception, resp. on stderr).
    """
    artifacts_dir = Path(artifacts_dir).resolve()
    artifacts_dir.mkdir(parents=True, exist_ok=True)
    port = port or _free_port(host)
    own_log_dir = None
    if log_path is None:
        own_log_dir = tempfile.mkdtemp(prefix="mlflow-server-log-")
        log_path = Path(own_log_dir) / "server.log"
    log_path = Path(log_path)
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        backend_store_uri,
        "--serve-artifacts",
        "--artifacts-destination",
        str(artifacts_dir),
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    env = dict(os.environ)
    env.update(MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true", PYTHONUNBUFFERED="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    base = f"http://{host}:{port}"
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    ok = False
    startup_error = False
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                startup_error = True
                raise RuntimeError(
                    f"mlflow server exited with {proc.returncode} before becoming healthy\n"
                    f"cmd: {' '.join(cmd)}\n--- server log ---\n{_tail(log_path)}"
                )
            try:
                with direct.open(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                startup_error = True
                raise RuntimeError(
                    f"mlflow server not healthy after {startup_timeout:.0f}s at {base}\n"
                    f"cmd: {' '.join(cmd)}\n--- server log ---\n{_tail(log_path)}"
                )
            time.sleep(0.5)
        yield base
        ok = True
    finally:
        _kill_group(proc)
        if not ok and not startup_error:  # the block failed: show what the server saw
            print(f"--- mlflow server log ({log_path}) ---\n{_tail(log_path)}", file=sys.stderr)
        if own_log_dir:
            shutil.rmtree(own_log_dir, ignore_errors=True)


# ----------------------------------------------------------------------------
# Chromium
# ----------------------------------------------------------------------------


@contextlib.contextmanager
def chromium_driver(
    screenshot_dir: str | os.PathLike,
    *,
    width: int = 1600,
    height: int = 1000,
    chromium: str = CHROMIUM,
    chromedriver: str = CHROMEDRIVER,
    presets: bool = True,
):
    """Headless Chromium driven through the system chromedriver (no Selenium Manager).

    Yields a ``selenium.webdriver.Chrome`` with a fresh temporary profile and a
    ``width`` x ``height`` viewport; page helpers save screenshots into
    ``screenshot_dir`` (created if needed, kept on ``driver.imm_screenshot_dir``).
    ``presets=False`` leaves localStorage empty: the UI as a researcher's first visit shows it
    (MLflow 3 then opens an experiment on its GenAI pages, the assistant panel open).
    """
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    shots = Path(screenshot_dir)
    shots.mkdir(parents=True, exist_ok=True)
    profile = tempfile.mkdtemp(prefix="imm-chromium-profile-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={profile}")
    opts.add_argument(f"--window-size={width},{height}")
    opts.add_argument("--no-proxy-server")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=chromedriver, log_output=os.path.join(profile, "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=opts)
    try:
        driver.imm_screenshot_dir = shots
        driver.set_page_load_timeout(DEFAULT_TIMEOUT)
        script = (
            "try {"
            + "".join(
                f"localStorage.setItem({json.dumps(k)}, {json.dumps(v)});" for k, v in _LOCAL_STORAGE_PRESETS.items()
            )
            + "} catch (e) {}"
        )
        if presets:
            driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": script})
        # --window-size is the outer size; make the *viewport* width x height.
        dw, dh = driver.execute_script(
            "return [window.outerWidth - window.innerWidth, window.outerHeight - window.innerHeight]"
        )
        driver.set_window_size(width + max(dw, 0), height + max(dh, 0))
        yield driver
    finally:
        try:
            driver.quit()
        finally:
            shutil.rmtree(profile, ignore_errors=True)


# ----------------------------------------------------------------------------
# generic helpers
# ----------------------------------------------------------------------------


def _slug(text: str, maxlen: int = 80) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:maxlen] or "page"


def screenshot(driver, name: str) -> Path:
    """Save a PNG of the viewport as ``<screenshot_dir>/<name>.png``; return its path."""
    path = Path(driver.imm_screenshot_dir) / f"{_slug(name)}.png"
    driver.save_screenshot(str(path))
    return path


def console_errors(driver) -> list[str]:
    """SEVERE browser console messages since the last call (chromedriver drains the log)."""
    try:
        return [e.get("message", "") for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
    except Exception:  # pragma: no cover - log type unsupported
        return []


def _wait(driver, cond: Callable, what: str | Callable[[], str], name: str, timeout: float | None):
    """WebDriverWait(cond) with a diagnostic failure (screenshot + page text + console).

    ``what`` (or ``what()``, evaluated only on failure) describes the awaited state."""
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    timeout = DEFAULT_TIMEOUT if timeout is None else timeout
    try:
        return WebDriverWait(
            driver, timeout, poll_frequency=0.25, ignored_exceptions=(StaleElementReferenceException,)
        ).until(cond)
    except TimeoutException:
        shot = screenshot(driver, f"FAILED-{name}")
        try:
            text = driver.execute_script("return document.body ? document.body.innerText : ''")[-3000:]
        except Exception:
            text = "<unavailable>"
        errors = "\n".join(console_errors(driver)[-20:])
        if callable(what):
            what = what()
        raise UITimeout(
            f"timed out after {timeout:.0f}s waiting for {what}\nurl: {driver.current_url}\n"
            f"screenshot: {shot}\n--- page text (tail) ---\n{text}\n--- console errors ---\n{errors}"
        ) from None


def _navigate(driver, url: str) -> None:
    """Full page load of an MLflow hash route (never a same-document hash change,
    so no element of the previous route can satisfy the next wait)."""
    if driver.current_url.split("#")[0] == url.split("#")[0]:
        driver.get("about:blank")
    driver.get(url)


def _hash_url(base: str, route: str, query: dict | None = None) -> str:
    url = f"{base.rstrip('/')}/#/{route.lstrip('/')}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    return url


# ----------------------------------------------------------------------------
# experiment runs table
# ----------------------------------------------------------------------------

_JS_RUN_ROWS = """
const seen = new Map();
for (const cell of document.querySelectorAll(arguments[0])) {
  const row = cell.closest('[role=row]');
  const a = cell.querySelector('a[href*="/runs/"]');
  if (!row || !a) continue;
  const r = cell.getBoundingClientRect();
  if (r.width === 0 || r.height === 0) continue;
  const id = row.getAttribute('row-id');
  if (seen.has(id)) continue;
  seen.set(id, {run_id: id, name: a.textContent.trim(),
                index: parseInt(row.getAttribute('row-index') || '0', 10),
                expander: !!cell.querySelector('button')});
}
return Array.from(seen.values()).sort((x, y) => x.index - y.index);
"""


def _run_rows(driver) -> list[dict]:
    return driver.execute_script(_JS_RUN_ROWS, RUN_NAME_CELL) or []


def run_names_visible(driver) -> list[str]:
    """Run names currently rendered in the runs table, top to bottom."""
    return [r["name"] for r in _run_rows(driver)]


def _expand_nested_runs(driver, handled: set, settle: float = 5.0) -> bool:
    """Expand every parent row not handled yet; True if any expander was clicked.

    The +/- expander carries no expanded-state attribute and the expanded state
    persists in localStorage, so click it and check that rows appeared; if rows
    disappeared instead (it was already expanded), click it again.
    """
    from selenium.webdriver.common.by import By

    did = False
    for row in _run_rows(driver):
        if not row["expander"] or row["run_id"] in handled:
            continue
        sel = '[role=row][row-id="%s"] %s button' % (row["run_id"], RUN_NAME_CELL)
        for _attempt in range(2):
            buttons = driver.find_elements(By.CSS_SELECTOR, sel)
            if not buttons:
                break
            before = len(_run_rows(driver))
            driver.execute_script("arguments[0].scrollIntoView({block: 'nearest'});", buttons[0])
            buttons[0].click()
            did = True
            deadline = time.monotonic() + settle
            while len(_run_rows(driver)) == before and time.monotonic() < deadline:
                time.sleep(0.1)
            if len(_run_rows(driver)) >= before:
                break  # expanded (or nothing to show); a decrease means we collapsed it
        handled.add(row["run_id"])
    return did


def open_experiment(
    driver,
    base: str,
    experiment_id: str,
    expected_runs: int | None = None,
    *,
    expand_nested: bool = True,
    timeout: float | None = None,
) -> Path:
    """Open the experiment's runs table (ML workflow) and expand nested runs.

    Waits until at least ``expected_runs`` run rows (parents + expanded children)
    are rendered (or, when None, at least one row and no unexpanded parent).
    Returns the screenshot path ``experiment-<id>-runs.png``.
    """
    name = f"experiment-{experiment_id}-runs"
    _navigate(driver, _hash_url(base, f"experiments/{experiment_id}/runs", {"workflowType": "machine_learning"}))
    _wait(driver, lambda d: _run_rows(d), "the runs table to show a run", name, timeout)
    clicked: set = set()

    def ready(d):
        if expand_nested and _expand_nested_runs(d, clicked):
            return False  # give the grid a poll to render the children
        rows = _run_rows(d)
        if expected_runs is not None:
            return len(rows) >= expected_runs
        return bool(rows) and (not expand_nested or all(r["run_id"] in clicked for r in rows if r["expander"]))

    _wait(
        driver,
        ready,
        lambda: f"{expected_runs or 'all'} runs visible in the runs table (have: {run_names_visible(driver)})",
        name,
        timeout,
    )
    return screenshot(driver, name)


_COLUMN_KINDS = {"params": "Parameters", "metrics": "Metrics", "tags": "Tags"}


def _col(kind: str, key: str) -> str:
    if kind not in _COLUMN_KINDS:
        raise ValueError(f"kind must be one of {sorted(_COLUMN_KINDS)}, not {kind!r}")
    return f'[col-id="{kind}.`{key}`"]'


def column_values_visible(driver, kind: str, key: str) -> dict[str, str]:
    """``{run name: cell text}`` of the runs-table column ``<kind>.`<key>``` (kind:
    "params", "metrics" or "tags"); empty if the column is not shown."""
    js = """
    const out = {};
    for (const cell of document.querySelectorAll('[role=gridcell]' + arguments[1])) {
      const row = cell.closest('[role=row]');
      const id = row && row.getAttribute('row-id');
      const a = id && document.querySelector(
          '[role=row][row-id="' + id + '"] ' + arguments[0] + ' a[href*="/runs/"]');
      if (a) out[a.textContent.trim()] = cell.textContent.trim();
    }
    return out;
    """
    return driver.execute_script(js, RUN_NAME_CELL, _col(kind, key)) or {}


def param_values_visible(driver, param_key: str) -> dict[str, str]:
    """``{run name: value}`` from the runs table's column for ``param_key`` (must be shown)."""
    return column_values_visible(driver, "params", param_key)


def _add_column(driver, kind: str, key: str, timeout: float | None, name: str) -> None:
    """Tick ``key`` under the Parameters/Metrics/Tags group of the "Columns" popover."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    group = _COLUMN_KINDS[kind]
    button = _wait(
        driver,
        lambda d: next(iter(d.find_elements(By.CSS_SELECTOR, "[data-testid=column-selection-dropdown]")), None),
        "the 'Columns' button",
        name,
        timeout,
    )
    button.click()
    search = _wait(
        driver,
        lambda d: next((e for e in d.find_elements(By.CSS_SELECTOR, "[role=dialog] input") if e.is_displayed()), None),
        "the column selector's search box",
        name,
        timeout,
    )
    search.send_keys(key)
    group_re = re.compile(r"^(Attributes|Metrics|Parameters|Tags)( \(\d+\))?$")

    def leaf(d):
        current = None  # the tree is a flat list: group node, then its leaves
        for node in d.find_elements(By.CSS_SELECTOR, "[role=dialog] [class*='tree-treenode']"):
            if not node.is_displayed():
                continue
            text = node.text.strip()
            m = group_re.match(text)
            if m:
                current = m.group(1)
            elif current == group and text == key:
                boxes = node.find_elements(By.CSS_SELECTOR, "[class*='tree-checkbox']")
                return boxes[0] if boxes else node
        return None

    _wait(driver, leaf, f"'{key}' under '{group}' in the column selector", name, timeout).click()
    _wait(
        driver,
        lambda d: d.find_elements(By.CSS_SELECTOR, "[role=columnheader]" + _col(kind, key)),
        f"a '{kind}.{key}' column in the runs table",
        name,
        timeout,
    )
    search.send_keys(Keys.ESCAPE)
    _wait(
        driver,
        lambda d: not any(e.is_displayed() for e in d.find_elements(By.CSS_SELECTOR, "[role=dialog]")),
        "the column selector to close",
        name,
        timeout,
    )


def show_column(
    driver,
    kind: str,
    key: str,
    expected_values: Sequence[str] | None = None,
    *,
    timeout: float | None = None,
) -> Path:
    """Make the runs-table column ``<kind>.`<key>``` visible and wait for its values.

    Call on an open experiment page (:func:`open_experiment`).  Adds the column
    through the "Columns" selector if it is not shown, scrolls it into view and
    waits until every string in ``expected_values`` appears in it (default: any
    value other than "-").  Returns the screenshot path ``experiment-<kind>-<key>.png``.
    """
    from selenium.webdriver.common.by import By

    name = f"experiment-{kind}-{key}"
    header = "[role=columnheader]" + _col(kind, key)
    if not driver.find_elements(By.CSS_SELECTOR, header):
        _add_column(driver, kind, key, timeout, name)
    head = driver.find_element(By.CSS_SELECTOR, header)
    driver.execute_script("arguments[0].scrollIntoView({block: 'nearest', inline: 'center'});", head)

    def ready(d):
        shown = {v for v in column_values_visible(d, kind, key).values() if v not in ("", "-")}
        return shown >= set(expected_values) if expected_values else bool(shown)

    _wait(
        driver,
        ready,
        lambda: (
            f"values {list(expected_values or ['<any>'])} in column "
            f"{kind}.{key} (have: {column_values_visible(driver, kind, key)})"
        ),
        name,
        timeout,
    )
    time.sleep(0.3)  # let the grid settle its horizontal scroll before the screenshot
    return screenshot(driver, name)


def show_param_column(
    driver, param_key: str, expected_values: Sequence[str] | None = None, *, timeout: float | None = None
) -> Path:
    """:func:`show_column` for a param: screenshot ``experiment-params-<key>.png``."""
    return show_column(driver, "params", param_key, expected_values, timeout=timeout)


def show_metric_column(
    driver, metric_key: str, expected_values: Sequence[str] | None = None, *, timeout: float | None = None
) -> Path:
    """:func:`show_column` for a metric (latest value, as the table formats it)."""
    return show_column(driver, "metrics", metric_key, expected_values, timeout=timeout)


# ----------------------------------------------------------------------------
# compare runs
# ----------------------------------------------------------------------------

_JS_COMPARE_TABLE = """
const out = {};
for (const tr of document.querySelectorAll('tr')) {
  const th = tr.querySelector(':scope > th');
  if (!th) continue;
  const key = th.textContent.trim();
  if (!key || key in out) continue;
  out[key] = Array.from(tr.querySelectorAll(':scope > td')).map(td => td.textContent.trim());
}
return out;
"""


def compare_table(driver) -> dict[str, list[str]]:
    """Rows of the compare-runs page: ``{row header: [value per run]}``
    (e.g. ``"Run Name:"``, ``"Run ID:"``, each param and metric key)."""
    return driver.execute_script(_JS_COMPARE_TABLE) or {}


def open_compare(
    driver,
    base: str,
    run_ids: Sequence[str],
    experiment_id: str | Sequence[str],
    *,
    expected_names: Sequence[str] | None = None,
    param_key: str | None = None,
    timeout: float | None = None,
) -> Path:
    """Open MLflow's compare-runs view for ``run_ids``.

    Waits until the "Run Name:" row lists ``expected_names`` (default: one
    non-empty name per run) and, if ``param_key`` is given, a parameter row for
    it with one value per run (scrolled into view).  Returns the screenshot path
    ``compare-<n>-runs.png``.
    """
    from selenium.webdriver.common.by import By

    exps = [experiment_id] if isinstance(experiment_id, (str, int)) else list(experiment_id)
    name = f"compare-{len(run_ids)}-runs"
    query = {
        "runs": json.dumps(list(run_ids), separators=(",", ":")),
        "experiments": json.dumps([str(e) for e in exps], separators=(",", ":")),
    }
    _navigate(driver, _hash_url(base, "compare-runs", query))

    def ready(d):
        table = compare_table(d)
        names = [n for n in table.get("Run Name:", []) if n]
        if expected_names is not None:
            if not set(expected_names) <= set(names):
                return False
        elif len(names) < len(run_ids):
            return False
        if param_key is not None:
            vals = table.get(param_key, [])
            if len([v for v in vals if v]) < len(run_ids):
                return False
        return True

    _wait(
        driver,
        ready,
        lambda: (
            f"run names {list(expected_names or [])} and param row "
            f"'{param_key}' in the compare view (have: {compare_table(driver)})"
        ),
        name,
        timeout,
    )
    # Frame the screenshot: the run-details table at the top, and the param row
    # on screen too (centred if it does not fit below the run names).
    names_row = driver.find_elements(By.XPATH, "//tr[th[normalize-space()='Run Name:']]")
    if names_row:
        driver.execute_script("arguments[0].closest('table').scrollIntoView({block: 'start'});", names_row[0])
    if param_key is not None:
        row = driver.find_elements(By.XPATH, f"//tr[th[normalize-space()={_xpath_str(param_key)}]]")
        if row and not driver.execute_script(
            "const r = arguments[0].getBoundingClientRect(); return r.bottom <= window.innerHeight;", row[0]
        ):
            driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", row[0])
    time.sleep(0.3)
    return screenshot(driver, name)


def _xpath_str(s: str) -> str:
    if "'" not in s:
        return f"'{s}'"
    if '"' not in s:
        return f'"{s}"'
    return "concat(" + ', "\'", '.join(f"'{p}'" for p in s.split("'")) + ")"


# ----------------------------------------------------------------------------
# artifacts
# ----------------------------------------------------------------------------

_JS_IMAGES = """
return Array.from(document.images).filter(i => {
  const r = i.getBoundingClientRect();
  return i.complete && i.naturalWidth > 0 && r.width > 0 && r.height > 0;
}).map(i => ({src: i.currentSrc || i.src, alt: i.alt || '',
              natural: [i.naturalWidth, i.naturalHeight],
              shown: [Math.round(i.getBoundingClientRect().width), Math.round(i.getBoundingClientRect().height)]}));
"""


def rendered_images(driver) -> list[dict]:
    """Decoded, visible ``<img>``s: ``{src, alt, natural: [w, h], shown: [w, h]}``."""
    return driver.execute_script(_JS_IMAGES) or []


def open_artifact(
    driver,
    base: str,
    experiment_id: str,
    run_id: str,
    artifact_path: str,
    *,
    timeout: float | None = None,
) -> Path:
    """Open a run's artifact viewer on ``artifact_path`` (an image) and wait until
    the image is decoded (``naturalWidth > 0``) and visible.  Returns the
    screenshot path ``artifact-<run_id[:8]>-<path>.png``."""
    name = f"artifact-{run_id[:8]}-{os.path.splitext(artifact_path)[0]}"
    route = f"experiments/{experiment_id}/runs/{run_id}/artifacts/{artifact_path.lstrip('/')}"
    _navigate(driver, _hash_url(base, route))

    def ready(d):
        imgs = rendered_images(d)
        # the viewer's <img alt="<artifact path>">; fall back to any blob: image
        return [i for i in imgs if i["alt"] == artifact_path] or [i for i in imgs if i["src"].startswith("blob:")]

    _wait(driver, ready, f"image artifact '{artifact_path}' to render", name, timeout)
    return screenshot(driver, name)


# ----------------------------------------------------------------------------
# run page
# ----------------------------------------------------------------------------


def page_text(driver) -> str:
    """The page's visible text (``document.body.innerText``)."""
    return driver.execute_script("return document.body ? document.body.innerText : ''") or ""


def open_run(
    driver,
    base: str,
    experiment_id: str,
    run_id: str,
    expected_text: Sequence[str],
    *,
    timeout: float | None = None,
) -> Path:
    """Open a run's page (Overview) and wait until its visible text holds every
    string in ``expected_text`` (e.g. a line of the description, a system metric's
    name, the dataset).  Returns the screenshot path ``run-<run_id[:8]>.png``."""
    url = _hash_url(base, f"experiments/{experiment_id}/runs/{run_id}")
    return open_address(driver, url, expected_text, f"run-{run_id[:8]}", timeout=timeout)


def open_address(driver, url: str, expected_text: Sequence[str], name: str, *, timeout: float | None = None) -> Path:
    """Open ``url`` as it was printed (e.g. a run page's address from a training summary) and wait until the
    page's visible text holds every string in ``expected_text``.  Returns the screenshot path ``<name>.png``."""
    _navigate(driver, url)
    _wait(
        driver,
        lambda d: all(t in page_text(d) for t in expected_text),
        lambda: f"{[t for t in expected_text if t not in page_text(driver)]} on {url}",
        name,
        timeout,
    )
    time.sleep(0.3)
    return screenshot(driver, name)
