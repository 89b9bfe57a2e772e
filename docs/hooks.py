"""MkDocs hook: the configuration page's key reference and examples are generated from the config schema
at build time (ioisray/config/describe.py, the same walk as `ioisray config describe`), so they cannot
drift from it."""
import re
import sys
from pathlib import Path

from mkdocs.exceptions import PluginError

# The checkout's own package, whatever else is installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ioisray.config.describe import describe, format_text, markdown_reference  # noqa: E402

MARKER = "<!-- config-reference -->"
EXAMPLE = re.compile(r"<!-- describe (\S+) -->\n")  # `ioisray config describe PREFIX`'s output


def on_page_markdown(markdown, page, config, files, **kwargs):
    if page.file.src_uri != "configuration.md":
        return markdown
    if MARKER not in markdown:
        raise PluginError(f"docs/configuration.md lacks the line {MARKER} where the key reference goes")
    markdown = EXAMPLE.sub(lambda m: format_text(describe(m.group(1))), markdown)
    return markdown.replace(MARKER, markdown_reference(level=3))
