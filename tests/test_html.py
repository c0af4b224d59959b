"""report.html: one self-contained file (tables, plots inlined), checked as text and in a real
browser (headless Chromium): every image decodes, nothing is fetched from disk or network."""

import pytest

from distill.html import markdown_to_html, write_html_report


def plot(path, color="red"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([0, 1], [0, 1], color=color)
    fig.savefig(path, dpi=60)
    plt.close(fig)
    return path


REPORT = "# Student vs teacher\n\n| model | accuracy |\n|---|---|\n| teacher | 0.970 |\n| student | 0.922 |\n\n" \
         "![learning curve](curve.png)\n\n![latency](latency.png)\n"


def test_tables_and_images_are_inlined(tmp_path):
    plot(tmp_path / "curve.png"), plot(tmp_path / "latency.png", "blue")
    page = markdown_to_html(REPORT, tmp_path, "a <report>")
    assert page.count('src="data:image/png;base64,') == 2 and "curve.png" not in page
    assert "<table>" in page and "<td>0.922</td>" in page and "<title>a &lt;report&gt;</title>" in page


def test_a_missing_plot_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="curve.png"):
        markdown_to_html(REPORT, tmp_path, "r")


@pytest.mark.browser
def test_report_html_renders_offline_in_chromium(tmp_path, browser):
    plot(tmp_path / "curve.png"), plot(tmp_path / "latency.png", "blue")
    (tmp_path / "report.md").write_text(REPORT)
    html = write_html_report(tmp_path, title="demo")
    moved = tmp_path / "elsewhere" / "report.html"  # alone in another folder: nothing to fetch
    moved.parent.mkdir()
    html.rename(moved)
    page = browser.new_page(viewport={"width": 1000, "height": 900})
    failed = []
    page.on("requestfailed", lambda r: failed.append(r.url))
    page.goto(moved.as_uri(), wait_until="load")
    sizes = page.eval_on_selector_all("img", "imgs => imgs.map(i => [i.complete, i.naturalWidth])")
    assert sizes == [[True, 180], [True, 180]], sizes  # 3 in x 60 dpi, decoded
    assert page.inner_text("td >> nth=3") == "0.922" and not failed
    page.screenshot(path=tmp_path / "report.png", full_page=True)
    assert (tmp_path / "report.png").stat().st_size > 10_000
    page.close()
