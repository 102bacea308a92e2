"""The docs: _quarto.yml is the one config, the site renders, README.md is current."""
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
    return docs.render_site(ROOT)


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
