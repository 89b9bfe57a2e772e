"""MkDocs hook: the configuration page's reference is generated from the config schema at build time
(ioisray/config/describe.py, the same walk as `ioisray config describe`), so it cannot drift from it."""
import sys
from pathlib import Path

from mkdocs.exceptions import PluginError

# The checkout's own package, whatever else is installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ioisray.config.describe import markdown_reference  # noqa: E402

MARKER = "<!-- config-reference -->"


def on_page_markdown(markdown, page, config, files, **kwargs):
    if page.file.src_uri != "configuration.md":
        return markdown
    if MARKER not in markdown:
        raise PluginError(f"docs/configuration.md lacks the line {MARKER} where the key reference goes")
    return markdown.replace(MARKER, markdown_reference(level=3))
