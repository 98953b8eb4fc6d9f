"""mkdocs hook for `make docs`: links from docs/ to files beside it (../README.md, ../bench/README.md).

On GitHub those relative links work as written. mkdocs only knows the files under docs/ and would call each a
broken link, so this hook checks the target itself (the file, and a heading anchor in a Markdown file) and
fails the build when it is missing, then points the link at the repository (`repo_url`, when mkdocs.yml sets
one) or at the file in this checkout.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError

# [text](target) outside code; a target with a scheme, an absolute path or only an anchor is not ours.
LINK = re.compile(r"(\]\()(\.\./[^)\s#]+)(#[^)\s]*)?(\))")
FENCE = re.compile(r"^(```|~~~).*?^\1\s*$", re.MULTILINE | re.DOTALL)


def github_anchor(heading: str) -> str:
    """The id GitHub gives a Markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    text = FENCE.sub("", markdown)
    return {github_anchor(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*$", text, re.MULTILINE)}


def _rewrite(match: re.Match[str], page_dir: Path, root: Path, repo_url: str | None, where: str) -> str:
    target = (page_dir / match.group(2)).resolve()
    if not target.exists():
        raise PluginError(f"{where}: links to {match.group(2)}, which does not exist")
    anchor = match.group(3) or ""
    if anchor and target.suffix == ".md" and anchor[1:] not in anchors(target.read_text()):
        raise PluginError(f"{where}: links to {match.group(2)}{anchor}, which has no such heading")
    relative = target.relative_to(root).as_posix()
    url = f"{repo_url.rstrip('/')}/blob/main/{relative}" if repo_url else target.as_uri()
    return f"{match.group(1)}{url}{anchor}{match.group(4)}"


def on_page_markdown(markdown: str, page: Any, config: Any, **_: Any) -> str:
    """Links that leave docs/: checked here (mkdocs cannot), then pointed somewhere a built site can reach."""
    docs_dir = Path(config["docs_dir"]).resolve()
    root = docs_dir.parent
    page_dir = (docs_dir / page.file.src_uri).parent
    repo_url = config.get("repo_url")
    where = page.file.src_uri
    out, last = [], 0
    for fence in [*FENCE.finditer(markdown), None]:
        end = fence.start() if fence else len(markdown)
        out.append(LINK.sub(lambda m: _rewrite(m, page_dir, root, repo_url, where), markdown[last:end]))
        if fence:
            out.append(fence.group(0))
            last = fence.end()
    return "".join(out)
