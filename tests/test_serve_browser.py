"""The explorer in a real headless Chromium (Debian's `chromium`, driven by Playwright) on the
bundled demo run: runs page, circuit slider and sign toggle, clicking an edge, expanding the
search tree, two runs side by side (compare), and the exported HTML opened from file:// with
networking off. Screenshots go to the artifacts dir (PATHDB_TEST_ARTIFACTS, else a temporary
dir printed in the report).

Outside CI the tests skip, loudly, when no Chromium or Playwright is installed; with
PATHDB_REQUIRE_BROWSER=1 (set by .ci/run) a missing browser fails them instead.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pathdb.evaluate.compare import agreement
from pathdb.query import circuit, top_paths
from pathdb.store.db import open_store
from tests.cli_process import pathdb
from tests.serve_fixtures import artifacts_dir, compare_store, demo_store, serving

CHROMIUM = os.environ.get("PATHDB_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
# DOM of the circuit plot: one plotly trace per drawn edge, then the edge midpoints, then the nodes
TRACES = "#circuit-plot .scatterlayer .trace"


def _no_browser(reason: str) -> None:
    msg = (
        f"BROWSER TESTS NOT RUN: {reason}. Install Debian's Chromium (apt-get install chromium) "
        "and Playwright (pip install playwright; no `playwright install` needed)."
    )
    if os.environ.get("PATHDB_REQUIRE_BROWSER") or os.environ.get("CI"):
        pytest.fail(msg)
    warnings.warn(msg, stacklevel=2)
    pytest.skip(msg)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _no_browser("the playwright package is not installed")
    if not Path(CHROMIUM).is_file():
        _no_browser(f"no Chromium at {CHROMIUM}")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo_store(tmp_path_factory)


@pytest.fixture(scope="module")
def screens(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return artifacts_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def url(demo: Path) -> Iterator[str]:
    with serving(demo) as (address, _proc):
        yield address


@pytest.fixture(scope="module")
def tab(browser: Any) -> Iterator[tuple[Any, list[str]]]:
    """One page for the module (plotly.js is parsed once; views change by URL hash)."""
    context = browser.new_context(viewport={"width": 1400, "height": 950})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg, errors
    context.close()


@pytest.fixture()
def page(
    tab: tuple[Any, list[str]], screens: Path, request: pytest.FixtureRequest
) -> Iterator[Any]:
    """The module's page; a screenshot of it is saved after each test."""
    pg, errors = tab
    yield pg
    pg.screenshot(path=str(screens / f"{request.node.name}.png"))
    assert not errors, errors


def _drawn(pg: Any) -> tuple[int, int, set[str]]:
    """(edges drawn, nodes drawn, edge names listed) of the circuit on the page."""
    n_traces = pg.locator(TRACES).count()
    n_nodes = pg.locator(f"{TRACES}:last-child .point").count()
    names = set(
        pg.locator("#edge-table tr.edge-row").evaluate_all("rows => rows.map(r => r.dataset.edge)")
    )
    return max(n_traces - 2, 0), n_nodes, names


def _expected(db: Path, k: int, sign: str | None = None) -> tuple[int, int, set[str]]:
    with open_store(db, read_only=True) as store:
        c = circuit(store.con, "demo", top_k=k, sign=sign)
    return len(c.edges), len(c.nodes), set(c.edges["edge"])


def _show(pg: Any, sign: str, k: int) -> None:
    """Choose the sign, then move the slider to ``k`` (at most the run's edges of that sign);
    return once that circuit is drawn."""
    drawn = "v => document.getElementById('circuit-plot').dataset.view.startsWith(v)"
    pg.check(f"input[name=sign][value={sign}]")
    pg.wait_for_function(drawn, arg=f"{sign} ")
    k = min(k, int(pg.locator("#edge-slider").get_attribute("max")))
    pg.locator("#edge-slider").evaluate(
        "(el, k) => { el.value = String(k); el.dispatchEvent(new Event('input')); }", k
    )
    pg.wait_for_function(
        "v => document.getElementById('circuit-plot').dataset.view === v", arg=f"{sign} {k}"
    )


def _open_circuit(pg: Any, url: str) -> None:
    pg.goto(url + "#/run/demo/circuit")
    pg.wait_for_selector("#edge-slider")
    pg.wait_for_function("() => document.getElementById('circuit-plot').dataset.view")


def test_runs_page_lists_the_run(page: Any, url: str) -> None:
    page.goto(url)
    page.wait_for_selector("#runs-table")
    rows = page.locator("#runs-table tr.run-row")
    assert rows.count() == 1 and rows.first.get_attribute("data-run") == "demo"
    assert "completed" in rows.first.inner_text()
    page.click("a.run-link")
    page.wait_for_selector("#circuit-plot .scatterlayer")
    assert page.url.endswith("#/run/demo/circuit")


def test_slider_draws_the_circuit_of_query_circuit(page: Any, url: str, demo: Path) -> None:
    _open_circuit(page, url)
    for k in (10, 3, 45):
        _show(page, "both", k)
        edges, nodes, names = _drawn(page)
        assert (edges, nodes, names) == _expected(demo, k), k
        assert page.locator("#circuit-plot").get_attribute("data-edges") == str(edges)
        assert f"{edges} edges · {nodes} nodes drawn" in page.inner_text("#circuit-status")


def test_sign_toggle_changes_the_drawn_edges(page: Any, url: str, demo: Path) -> None:
    _open_circuit(page, url)
    _show(page, "both", 20)
    both = _drawn(page)
    assert both == _expected(demo, 20)
    _show(page, "negative", 20)
    negative = _drawn(page)
    assert negative == _expected(demo, 20, "negative") and negative[2] != both[2]


def test_clicking_an_edge_lists_the_paths_of_the_cli(page: Any, url: str, demo: Path) -> None:
    _open_circuit(page, url)
    _show(page, "both", 30)
    n_edges = _drawn(page)[0]
    first = page.locator("#edge-table tr.edge-row").first.get_attribute("data-edge")
    marker = page.locator(f"{TRACES}:nth-child({n_edges + 1}) .point").first
    box = marker.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.wait_for_selector("#paths-list tr.path-row")
    assert first in page.inner_text("#paths-title")
    shown = page.locator("#paths-list td.path-label").all_inner_texts()
    with open_store(
        demo, read_only=True
    ) as store:  # what `pathdb query paths demo --edge E` prints
        want = list(top_paths(store.con, "demo", k=20, edge=first)["path"])
    assert shown == want and shown


def test_expanding_the_root_shows_every_stored_child(page: Any, url: str, demo: Path) -> None:
    page.goto(url + "#/run/demo/tree")
    page.wait_for_selector("#tree > li.tree-node")
    page.click("#tree > li.tree-node .expand")
    page.wait_for_selector("#tree > li > ul.children > li.tree-node")
    shown = page.locator("#tree > li > ul.children > li.tree-node").count()
    with open_store(demo, read_only=True) as store:
        (want,) = store.con.execute(
            "SELECT count(*) FROM paths WHERE run_id = 1 AND parent_id = "
            "(SELECT path_id FROM paths WHERE run_id = 1 AND parent_id IS NULL)"
        ).fetchall()[0]
    assert shown == want > 0
    first = page.locator("#tree > li > ul.children > li.tree-node").first
    assert first.locator(".flag").first.inner_text() in ("kept", "pruned")


def test_exported_html_renders_offline_from_file(
    browser: Any, demo: Path, screens: Path, tmp_path: Path
) -> None:
    out = tmp_path / "circuit.html"
    res = pathdb("export", "demo", "--db", str(demo), "-o", str(out), "--top-k", "12", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    context = browser.new_context(offline=True, viewport={"width": 1400, "height": 950})
    requests: list[str] = []
    context.on("request", lambda r: requests.append(r.url))
    context.route(
        "**/*",
        lambda route: route.continue_() if route.request.url.startswith("file:") else route.abort(),
    )
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(out.as_uri())
    pg.wait_for_selector("#edge-table")
    drawn = _drawn(pg)
    pg.locator("#edge-table tr.edge-row").first.click()
    pg.wait_for_selector("#paths-list tr.path-row")
    pg.screenshot(path=str(screens / "exported_html_offline.png"), full_page=True)
    context.close()
    assert drawn == _expected(demo, 12)
    assert not errors, errors
    assert [u for u in requests if not u.startswith("file:")] == []


def test_compare_view_draws_both_circuits_and_the_jaccard(
    tmp_path_factory: pytest.TempPathFactory, tab: tuple[Any, list[str]], screens: Path
) -> None:
    pair = compare_store(tmp_path_factory)
    with open_store(pair, read_only=True) as store:
        want = {r: len(circuit(store.con, r, top_k=25).edges) for r in ("demo", "attr")}
        negative = {
            r: len(circuit(store.con, r, top_k=25, sign="negative").edges) for r in ("demo", "attr")
        }
        jaccard = agreement(store.con, ["demo", "attr"], top_k=50)["jaccard_top50"].iloc[0]
    pg, errors = tab
    with serving(pair) as (address, _proc):
        pg.goto(address)
        pg.wait_for_selector("#compare-go")
        pg.select_option("#compare-a", "demo")
        pg.select_option("#compare-b", "attr")
        pg.click("#compare-go")
        pg.wait_for_selector("#compare-agreement")
        pg.wait_for_function("() => document.getElementById('compare-plot-b').dataset.view")
        pg.locator("#compare-slider").evaluate(
            "el => { el.value = '25'; el.dispatchEvent(new Event('input')); }"
        )
        views = "['a', 'b'].every(s => document.getElementById('compare-plot-' + s).dataset.view === 'both 25')"
        pg.wait_for_function(f"() => {views}")
        drawn = {
            run: (
                int(pg.locator(f"#compare-plot-{side}").get_attribute("data-edges")),
                pg.locator(f"#compare-plot-{side} .scatterlayer .trace").count() - 2,
            )
            for side, run in (("a", "demo"), ("b", "attr"))
        }
        pg.check("input[name=compare-sign][value=negative]")
        views = "['a', 'b'].every(s => document.getElementById('compare-plot-' + s).dataset.view.startsWith('negative '))"
        pg.wait_for_function(f"() => {views}")
        drawn_negative = {
            run: int(pg.locator(f"#compare-plot-{side}").get_attribute("data-edges"))
            for side, run in (("a", "demo"), ("b", "attr"))
        }
        pg.check("input[name=compare-sign][value=both]")
        shown = float(pg.locator("#compare-agreement").get_attribute("data-jaccard"))
        text = pg.inner_text("#compare-agreement")
        pg.wait_for_selector("#compare-curves .scatterlayer .trace")
        curves = pg.locator("#compare-curves .legendtext").evaluate_all(
            "els => els.map(e => e.textContent)"
        )
        pg.screenshot(path=str(screens / "compare_view.png"), full_page=True)
    assert drawn == {r: (n, n) for r, n in want.items()} and all(want.values())
    assert drawn_negative == negative != want
    assert shown == pytest.approx(jaccard, rel=1e-12) and f"{jaccard:.4g}" in text
    assert {c.split(":")[0] for c in curves} == {"demo", "attr"}
    assert pg.locator("#compare-table tr.compare-row").count() == 2
    assert not errors, errors
