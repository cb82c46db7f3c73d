"""The README and docs/ stay true to the repository: short README, working links, the documented commands.

The README is the newcomer's ten-minute page (issue 13); everything else lives in docs/. These checks
keep it that way: a link that points nowhere or a README that grows back into a lab notebook fails here.
"""

import re
import subprocess

import pytest
from helpers import ROOT

README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]

FENCE = re.compile(r"^```.*?^```", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)

# renamed options (docs/renamed.md); no aliases, so they may appear only in that list
OLD_NAMES = [r"kernel=seed\b", r"schedule=edm\b", r"loss=fp16\b", r"loss=default\b", r"loss=imagenet\b"]


def prose(text: str) -> str:
    """The text outside code blocks and code spans, where markdown links are links."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path) -> set[str]:
    return {anchor(h) for h in HEADING.findall(FENCE.sub("", path.read_text()))}


def test_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n <= 250, f"README.md has {n} lines; move detail into docs/ (the limit is 250)"


def test_docs_pages_exist_and_index_lists_them():
    index = (DOCS / "index.md").read_text()
    pages = sorted(p.name for p in DOCS.glob("*.md") if p.name != "index.md")
    assert pages, "docs/ has no pages"
    missing = [p for p in pages if f"]({p})" not in index]
    assert not missing, f"docs/index.md does not link {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target} (no file {dest})")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            broken.append(f"{target} (no heading #{fragment} in {dest.name})")
    assert not broken, f"{page.name}: broken links: {broken}"


def test_readme_has_the_install_run_and_test_commands():
    text = README.read_text()
    assert '```bash\npip install -e ".[dev]"\npython launch.py\n```' in text
    assert "```bash\npython -m pytest -q\n```" in text
    # CI runs what the README tells a newcomer to run
    assert "python -m pytest -q" in (ROOT / ".ci" / "run").read_text()


def test_readme_architecture_names_every_package_and_folder():
    text = README.read_text()
    subpackages = sorted(p.parent.name for p in (ROOT / "imm").glob("*/__init__.py"))
    missing = [f"imm/{name}/" for name in subpackages if f"imm/{name}/" not in text]
    try:
        tracked = subprocess.run(
            ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True, timeout=30
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        tracked = []  # not a git checkout: the imm/ subpackages are still checked
    folders = sorted({f.split("/")[0] for f in tracked if "/" in f and (ROOT / f.split("/")[0]).is_dir()})
    missing += [f"{name}/" for name in folders if f"{name}/" not in text]
    assert not missing, f"README's Architecture block does not name {missing}"


def test_renamed_options_appear_only_in_the_rename_list():
    stale = []
    for page in PAGES:
        text = page.read_text()
        if page.name == "renamed.md":  # the rename list itself names the old options
            continue
        stale += [f"{page.name}: {m.group(0)}" for old in OLD_NAMES for m in re.finditer(old, text)]
    assert not stale, f"old option names left in the docs: {stale}"
