"""The docs: _quarto.yml is the one config, the site renders with the notebooks' outputs, README.md is current, and the rendered
site is driven in headless Chromium (links, content, sidebar, widgets, the quickstart's plot, the index of names).

Runtime: the render executes the notebooks (cached under _exec/ by content hash; cold, about a minute of CPU per core for all of
them, as nbdev_test takes) and renders ~45 pages (about 20 s); the browser checks take about 30 s."""
import os
from pathlib import Path
import pytest
from alignlab import docs

ROOT = Path(__file__).resolve().parents[1]


def test_top_level_quarto_yml_is_the_one_nbdev_reads():
    link = ROOT / "nbs" / "_quarto.yml"
    assert link.is_symlink() and link.resolve() == (ROOT / "_quarto.yml").resolve()


def test_notebooks_are_in_the_sidebar_in_reading_order_with_unique_numbers():
    import re
    entries = [nb for _, nb in docs.sidebar(ROOT)]
    on_disk = sorted(p.name for p in (ROOT / "nbs").glob("*.ipynb"))
    assert sorted(entries) == on_disk, set(on_disk) ^ set(entries)  # every notebook is in the sidebar, and only those
    numbered = [nb for nb in entries if re.match(r"\d", nb)]
    keys = [re.match(r"(\d+[a-z]?)_", nb).group(1) for nb in numbered]
    assert len(set(keys)) == len(keys), keys  # no two notebooks share a number
    assert numbered == sorted(numbered), numbered  # the sidebar reads in number order


@pytest.fixture(scope="module")
def site():
    import time
    t0 = time.time()
    out = docs.render_site(ROOT)
    print(f"docs: site rendered in {time.time() - t0:.0f} s")
    return out


def test_every_sidebar_page_renders(site):
    entries = docs.sidebar(ROOT)
    assert len(entries) >= 5
    for _, nb in entries:
        page = site / docs.page_name(nb, ROOT)
        assert page.exists() and page.stat().st_size > 1000, page
    html = (site / docs.page_name("01_zoo.ipynb", ROOT)).read_text()
    assert "build_tiny_llama" in html and "{target=" not in html and "#| export" not in html
    index = (site / "index.html").read_text()
    assert 'href="templates.html#chattemplate"' in index and "alignlab.invalid" not in index  # doc links stay in the site


def test_docs_page_loads_in_chromium(site, page):
    from playwright.sync_api import expect
    page.goto((site / docs.page_name("02_templates.ipynb", ROOT)).as_uri())
    expect(page.locator("h1.title")).to_have_text("templates")
    expect(page.locator("nav")).to_contain_text("quickstart")
    page.locator("nav a", has_text="zoo").click()
    expect(page.locator("h1.title")).to_have_text("zoo")


def test_readme_is_generated_from_index_notebook():
    assert (ROOT / "README.md").read_text() == docs.readme_text(ROOT), "README.md is stale: run `alignlab docs --readme`"


# --- the rendered site, read and driven ------------------------------------------------------------------------------------

def _pages(site):
    return {p.name: p.read_text() for p in site.glob("*.html")}


def _links(html):
    import re
    return re.findall(r'<a\s[^>]*href="([^"]+)"', html)


def test_no_broken_internal_link(site):
    import re
    pages, broken, checked = _pages(site), [], 0
    ids = {name: set(re.findall(r'\sid="([^"]+)"', h)) for name, h in pages.items()}
    for name, h in pages.items():
        for href in _links(h):
            if re.match(r"^(https?:|mailto:|javascript:)", href): continue
            target, _, anchor = href.partition("#")
            target = target or name
            checked += 1
            if not (site / target).exists(): broken.append(f"{name} -> {href} (no page)")
            elif anchor and target.endswith(".html") and anchor not in ids.get(target, set()):
                broken.append(f"{name} -> {href} (no #{anchor} on {target})")
    assert checked > 500, checked  # the negative control: the crawl did see the site's links
    assert not broken, f"{len(broken)} broken links:\n" + "\n".join(broken[:40])


def test_every_page_has_content_and_executed_outputs(site):
    import re
    entries = docs.sidebar(ROOT)
    with_outputs = []
    for _, nb in entries:
        h = (site / docs.page_name(nb, ROOT)).read_text()
        main = re.sub(r"<[^>]+>", " ", h.split("<main>", 1)[1])
        assert len(main.split()) > 30, f"{nb}: the page has almost no content"
        # executed outputs (nbconvert's classes); show_doc's are output_markdown and do not count
        if re.search(r'class="output_(?:html|png|svg|jpeg|text)\b|class="output_subarea output_stream', h): with_outputs.append(nb)
    # executed outputs, not only show_doc's: tables, token views, plans and plots
    for nb in ["01_zoo.ipynb", "02_templates.ipynb", "10a_plan.ipynb", "11_experiment.ipynb", "12_inspect_tokens.ipynb", "13_quickstart.ipynb"]:
        assert nb in with_outputs, f"{nb} shows no outputs"
    assert len(with_outputs) >= 0.7 * len(entries), (len(with_outputs), len(entries))


def test_getting_started_is_the_readmes_two_commands(site):
    import re
    readme = (ROOT / "README.md").read_text()
    cmds = re.findall(r"```sh\n(python3 -m venv[^\n]+)\n```", readme)
    assert len(cmds) == 2, cmds
    import html
    index = html.unescape(re.sub(r"<[^>]+>", "", (site / "index.html").read_text()))  # the text, without the highlighting spans
    for c in cmds: assert c in index, c


def test_every_sidebar_page_is_reachable_from_the_nav(site, page):
    from playwright.sync_api import expect
    entries = docs.sidebar(ROOT)
    page.goto((site / "index.html").as_uri())
    links = page.locator("nav a[href$='.html']:not([href='api.html'])")
    hrefs = links.evaluate_all("els => els.map(e => e.getAttribute('href'))")
    hrefs = [h for i, h in enumerate(hrefs) if i > 0]  # the first is the site title (index.html again)
    assert hrefs == [docs.page_name(nb, ROOT) for _, nb in entries], "the nav follows the sidebar of _quarto.yml, in order"
    for href in hrefs:
        page.locator(f"nav a[href='{href}']").last.click()
        assert page.url.endswith("/" + href), page.url
        expect(page.locator("h1.title")).not_to_be_empty()
        assert len(page.locator("main").inner_text().split()) > 30, href


# Widget pages: each widget's docs page shows it as a static embed that still reacts (the states Panel precomputed), or for the
# review app its static export (no script, no server: the page a reviewer gets by mail).
# One row a widget: (notebook, which widget on the page (its static page is `<notebook stem>-<n>.html`), a part of the drawn
# widget, an interaction inside the iframe, a probe that must change).
def _other_option(f, probe):
    "Pick another value of the first select, one Panel embedded (it embeds `max_opts` values per widget): until `probe` changes."
    import time
    s, before = f.locator("select").first, probe(f)
    cur = s.evaluate("e => e.selectedIndex")
    for i in range(s.locator("option").count()):
        if i == cur: continue
        s.select_option(index=i); time.sleep(0.5)
        if probe(f) != before: return


DOC_WIDGETS = [
    ("12_inspect_tokens.ipynb", 1, lambda f: f.locator(".summary").first,  # "80 tokens, 14 carry loss; ..."
     lambda f: f.get_by_role("checkbox").first.click(),         # only_answer_loss, the first checkbox
     lambda f: f.locator(".summary").first.inner_text()),
    ("17d_attention_view.ipynb", 1, lambda f: f.locator(".tokens-heatmap").first,
     lambda f: _other_option(f, lambda f: f.locator(".tokens-heatmap").first.get_attribute("data-layer")),  # the layer: the first select
     lambda f: f.locator(".tokens-heatmap").first.get_attribute("data-layer")),  # switched in the browser: widgets.js_states
    ("18h_patch_view.ipynb", 1, lambda f: f.locator(".patch-detail").first,
     lambda f: _other_option(f, lambda f: f.locator(".patch-detail").first.get_attribute("data-output")),  # the embedding picker
     lambda f: f.locator(".patch-detail").first.get_attribute("data-output")),  # switched in the browser: widgets.js_states
    pytest.param("19b_review_app.ipynb", 2, lambda f: f.locator("details.rv-item").first,  # the export (widget 1 is the app itself)
     lambda f: f.locator("details.rv-item summary").first.click(),  # open the first prompt's answers
     lambda f: str(f.locator("details.rv-item").first.evaluate("d => d.open"))),  # shown since the cell building it no longer mixes an import with code (nbdev's docs step ran it with the import)
]


@pytest.mark.parametrize("nb,n,ready,interact,probe", DOC_WIDGETS, ids=[(w.values if hasattr(w, "values") else w)[0] for w in DOC_WIDGETS])
def test_widget_page_shows_its_widget(site, page, nb, n, ready, interact, probe):
    from pathlib import Path
    from playwright.sync_api import expect
    page.goto((site / docs.page_name(nb, ROOT)).as_uri())
    sel = f"iframe.alignlab-widget[title='{Path(nb).stem}-{n}.html']"
    frame_el = page.locator(sel)
    expect(frame_el).to_be_visible()
    frame_el.scroll_into_view_if_needed()
    f = page.frame_locator(sel)
    expect(ready(f)).to_be_visible(timeout=120000)  # a 7 MB page (every embedded state): slow to draw on a loaded 2-core box
    before = probe(f)
    interact(f)
    for _ in range(20):  # the embedded state is applied by Panel's JS
        if probe(f) != before: break
        page.wait_for_timeout(250)
    assert probe(f) != before, f"{nb}: the embedded widget did not change ({before!r})"
    shots = site / "screenshots"; shots.mkdir(exist_ok=True)
    page.screenshot(path=str(shots / docs.page_name(nb, ROOT).replace(".html", ".png")))


def test_quickstart_page_shows_the_loss_plot(site, page):
    from playwright.sync_api import expect
    page.goto((site / docs.page_name("13_quickstart.ipynb", ROOT)).as_uri())
    img = page.locator("main .output_png img").first
    expect(img).to_be_visible()
    w = img.evaluate("i => i.naturalWidth")
    assert w >= 300, w  # a real figure (600 px at the plot's 6 in x 100 dpi), not a broken image
    img.scroll_into_view_if_needed()
    shots = site / "screenshots"; shots.mkdir(exist_ok=True)
    page.screenshot(path=str(shots / "quickstart.png"))


def test_search_box_finds_a_name_and_links_to_its_docs(site, page):
    from playwright.sync_api import expect
    page.goto((site / "index.html").as_uri())
    page.locator("#site-search").fill("token_inspector")
    page.locator("#site-search").press("Enter")
    assert "api.html?q=token_inspector" in page.url
    rows = page.locator("#api tbody tr:visible")
    expect(rows.first).to_contain_text("token_inspector")
    assert rows.count() < 10, rows.count()  # filtered: the index holds hundreds of names
    rows.first.locator("a").click()
    assert page.url.endswith("#token_inspector"), page.url
    expect(page.locator("h1.title")).to_have_text("inspect.tokens")


def test_show_doc_has_a_parameter_table(site):
    h = (site / docs.page_name("12_inspect_tokens.ipynb", ROOT)).read_text()
    assert "<strong>max_tokens_count</strong>" in h and "truncate to whole messages within this many tokens" in h
