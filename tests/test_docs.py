"""The documentation in docs/ builds with `mkdocs build --strict`: a broken link, a missing heading or
page, or an API reference to something that does not exist fails it; the configuration page lists every
key of the schema."""
import html
import re
import shutil
import subprocess
import sys

from cli_utils import ROOT

from ioisray.config.describe import all_keys


def _build(root, site):
    """`mkdocs build --strict` of `root`/mkdocs.yml, as a user or CI runs it."""
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(root / "mkdocs.yml"),
                           "-d", str(site)], cwd=root, capture_output=True, text=True, timeout=120)


def test_docs_build_strict_with_every_config_key(tmp_path):
    done = _build(ROOT, tmp_path / "site")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "WARNING" not in done.stderr, done.stderr
    page = html.unescape(re.sub(r"<[^>]+>", "", (tmp_path / "site/configuration/index.html").read_text()))
    assert "<!--" not in page  # every generated part was filled in
    missing = [k.key for k in all_keys() if not k.is_section and k.key not in page]
    assert not missing, f"keys missing from the configuration page: {missing}"
    api = (tmp_path / "site/package-layout/index.html").read_text()
    assert "start_epoch" in api and "largest_remainder" in api  # mkdocstrings rendered the core's docstrings


def test_a_broken_link_fails_the_strict_build(tmp_path):
    # A copy of the docs beside the repository's config and package, one page given two broken links.
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path)
    (tmp_path / "ioisray").symlink_to(ROOT / "ioisray")
    with open(tmp_path / "docs/index.md", "a") as f:
        f.write("\n[a heading that is not there](data.md#no-such-heading) and [a page](no_such_page.md)\n")
    done = _build(tmp_path, tmp_path / "site")
    assert done.returncode != 0
    assert "no-such-heading" in done.stderr and "no_such_page.md" in done.stderr
