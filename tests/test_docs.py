"""The examples in README.md and docs/ cannot drift: each fenced block that shows a config, a command, a request or a
plugin is run here.

- ```toml: a gateway.toml, loaded by `load_config` and checked against the installed backends and placements (a
  block whose first line says it is a plugin's pyproject.toml: its entry-point group must be ours).
- ```sh with `curl`: run by bash against one real `gateway serve` on the repository's gateway.toml (`make serve`'s
  config), `KEY` set to the key it generated; the ```json or ```text block right below it is the answer shown,
  compared with the real one (ids and timestamps aside, float values to 1e-4, `...` for what was cut).
- ```sh without `curl`: `make X` must be a target of the Makefile; `gateway ...` must parse with the CLI's parser.
- ```python: a plugin (`@hookimpl`) is imported, registered and serves a model; other code runs against the server.
- ```json alone must parse (ellipses allowed); ```text is output shown as is, whose `gateway X` lines must name
  real subcommands; anything else (```yaml, an unknown command) must carry sybil's marker
  `<!-- skip: next "why" -->` on the line above it.

Blocks are found with sybil's Markdown lexers (fences, and the skip marker in an HTML comment).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sybil import Document, Region
from sybil.parsers.markdown.lexers import DirectiveInHTMLCommentLexer, FencedCodeBlockLexer

from .upstream import ROOT, free_port, serve_process

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
#: Where the docs say the server listens (`make serve`'s config); requests are sent to the test's server instead.
SHOWN_ADDRESS = "http://127.0.0.1:8000"
#: Fields whose values change on every call: only their type is compared.
VOLATILE = {"id", "created"}
#: Float values are compared to this absolute tolerance (the shown ones are rounded; runtimes differ a little).
FLOAT_TOLERANCE = 1e-4
#: The skip markers allowed in all the docs together: keep the list of untested examples short.
MAX_SKIPPED = 4
ELLIPSIS = "\u2026"


@dataclass
class Block:
    """One fenced block (and, for a request, the answer shown right below it)."""

    path: Path
    line: int
    language: str
    source: str
    answer: str | None = None
    answer_language: str = ""
    skip: str | None = None

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}-{self.language or 'plain'}"


def _parse(document: Document) -> Iterator[Region]:
    """Fenced blocks as Regions; a request absorbs the answer block that follows it with only blank lines between."""
    skips = {
        lexed.end: lexed.lexemes["arguments"].removeprefix("next").strip()
        for lexed in DirectiveInHTMLCommentLexer("skip")(document)  # <!-- skip: next "reason" -->
    }
    fences = list(FencedCodeBlockLexer(r"[\w-]*")(document))
    text = document.text
    i = 0
    while i < len(fences):
        region = fences[i]
        line = text.count("\n", 0, region.start) + 1
        block = Block(Path(document.path), line, region.lexemes["language"], str(region.lexemes["source"]))
        # The lexed comment ends before its closing `-->`.
        between = {end: text[end : region.start] for end in skips}
        block.skip = next((skips[end] for end, gap in between.items() if re.fullmatch(r"\s*-+>\s*", gap)), None)
        end = region.end
        if block.language == "sh" and "curl " in block.source and i + 1 < len(fences):
            following = fences[i + 1]
            if not text[region.end : following.start].strip() and following.lexemes["language"] in ("json", "text"):
                block.answer = str(following.lexemes["source"])
                block.answer_language = following.lexemes["language"]
                end = following.end
                i += 1
        yield Region(region.start, end, parsed=block)
        i += 1


def _blocks() -> list[Block]:
    blocks = []
    for path in DOCS:
        document = Document.parse(str(path), _parse)
        blocks.extend(example.parsed for example in document)
    return blocks


BLOCKS = _blocks()


# --- the server the requests go to ------------------------------------------------------------------------------


@dataclass
class Server:
    url: str
    key: str


@pytest.fixture(scope="module")
def docs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`make serve`'s config, served for real on a free port, with the key it generates for itself."""
    tmp = tmp_path_factory.mktemp("docs-server")
    port = free_port()
    log, key_file = tmp / "serve.log", tmp / "key"
    proc = serve_process(ROOT / "gateway.toml", log, "--port", str(port), "--key-file", str(key_file))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    try:
        while True:
            try:
                if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"gateway.toml did not serve: {log.read_text()[-3000:]}")
            time.sleep(0.1)
        yield Server(url, key_file.read_text().strip())
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# --- comparing an answer shown with the real one ----------------------------------------------------------------


def parse_shown_json(text: str) -> Any:
    """JSON as the docs show it: `...` may end an array (the rest cut) or stand for members of an object."""
    parts = re.split(r'("(?:[^"\\]|\\.)*")', text)  # strings at odd indexes: leave their contents alone
    for n in range(0, len(parts), 2):
        parts[n] = re.sub(r"\.\.\.(?=\s*\])", f'"{ELLIPSIS}"', parts[n])
        parts[n] = re.sub(r"\.\.\.(?=\s*[,}])", f'"{ELLIPSIS}": null', parts[n])
    return json.loads("".join(parts))


def mismatches(shown: Any, real: Any, where: str = "$") -> list[str]:
    """Where `real` differs from `shown` (empty: it matches)."""
    if isinstance(shown, dict):
        if not isinstance(real, dict):
            return [f"{where}: shown an object, got {real!r:.80}"]
        cut = ELLIPSIS in shown
        keys = [k for k in shown if k != ELLIPSIS]
        problems = [f"{where}.{k}: shown, missing from the answer" for k in keys if k not in real]
        if not cut:
            problems += [f"{where}.{k}: in the answer, not shown" for k in real if k not in shown]
        for k in keys:
            if k not in real:
                continue
            if k in VOLATILE:
                if type(shown[k]) is not type(real[k]):
                    problems.append(f"{where}.{k}: shown a {type(shown[k]).__name__}, got {real[k]!r}")
            else:
                problems += mismatches(shown[k], real[k], f"{where}.{k}")
        return problems
    if isinstance(shown, list):
        if not isinstance(real, list):
            return [f"{where}: shown an array, got {real!r:.80}"]
        cut = bool(shown) and shown[-1] == ELLIPSIS
        items = shown[:-1] if cut else shown
        if (len(real) < len(items)) if cut else (len(real) != len(items)):
            return [f"{where}: shown {len(items)} items{' and more' if cut else ''}, got {len(real)}"]
        return [p for n, item in enumerate(items) for p in mismatches(item, real[n], f"{where}[{n}]")]
    if isinstance(shown, float) and isinstance(real, (int, float)) and not isinstance(real, bool):
        return [] if abs(shown - real) <= FLOAT_TOLERANCE else [f"{where}: shown {shown}, got {real}"]
    if type(shown) is not type(real) or shown != real:
        return [f"{where}: shown {shown!r:.120}, got {real!r:.120}"]
    return []


def check_answer(block: Block, output: str) -> None:
    """The answer block against what curl printed: a status line and headers (with `curl -i`), then the body."""
    status, headers, body = None, {}, output
    if output.startswith("HTTP/"):
        head, _, body = output.replace("\r\n", "\n").partition("\n\n")
        status_line, *header_lines = head.split("\n")
        status = status_line
        headers = {name.lower(): value.strip() for name, _, value in (h.partition(":") for h in header_lines)}
    shown_lines = block.answer.strip().splitlines() if block.answer else []
    while shown_lines and not shown_lines[0].lstrip().startswith(("{", "[")):
        line = shown_lines.pop(0)
        if line.startswith("HTTP/"):
            assert status is not None and status.split()[1] == line.split()[1], f"{block.id}: {status!r} vs {line!r}"
        else:
            name, _, value = line.partition(":")
            assert name.lower() in headers, f"{block.id}: header {name!r} shown, not sent ({sorted(headers)})"
            assert headers[name.lower()] == value.strip(), f"{block.id}: {line!r} shown, got {headers[name.lower()]!r}"
    shown = parse_shown_json("\n".join(shown_lines))
    problems = mismatches(shown, json.loads(body))
    assert not problems, f"{block.id}: the answer shown is not the real one:\n" + "\n".join(problems[:10])


# --- one check per kind of block --------------------------------------------------------------------------------


@functools.cache
def _plugins() -> Any:
    from gateway.runtime.plugins import load_plugins

    return load_plugins()


@functools.cache
def _make_targets() -> frozenset[str]:
    makefile = (ROOT / "Makefile").read_text()
    return frozenset(re.findall(r"^([A-Za-z][\w.-]*)\s*:(?!=)", makefile, re.MULTILINE))


def _cli_parser() -> Any:
    from gateway.cli import build_parser

    return build_parser(_plugins().converters())


def check_config(block: Block, tmp_path: Path) -> None:
    if block.source.lstrip().startswith("# the plugin's pyproject.toml"):
        group = next(iter(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]))
        entry_points = tomllib.loads(block.source)["project"]["entry-points"]
        assert group in entry_points, f"{block.id}: plugins register in {group!r}, the example in {list(entry_points)}"
        return
    from gateway.base.config import load_config
    from gateway.runtime.registry import build_specs

    path = tmp_path / "gateway.toml"
    path.write_text(block.source)
    config = load_config(path)
    plugins = _plugins()
    build_specs(config, plugins.backends(), block.id, plugins.broken, plugins.placements())


def _commands(source: str) -> list[str]:
    """Shell lines, continuations joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", source)
    return [line.split(" #", 1)[0].strip() for line in joined.splitlines() if line.strip() and not line.startswith("#")]


def check_command(block: Block) -> None:
    for command in _commands(block.source):
        argv = shlex.split(command)
        if argv[0] == "make":
            missing = [t for t in argv[1:] if "=" not in t and t not in _make_targets()]
            assert not missing, f"{block.id}: `{command}`: no such Makefile target {missing}"
        elif argv[0].endswith("gateway") or argv[:3] == ["python", "-m", "gateway"]:
            args = argv[3:] if argv[0] == "python" else argv[1:]
            try:
                _cli_parser().parse_args(args)
            except SystemExit as exc:
                raise AssertionError(f"{block.id}: `{command}` does not parse") from exc
        else:
            raise AssertionError(f"{block.id}: `{command}`: not a command this test knows how to check; skip it")


def run_request(block: Block, server: Server) -> None:
    script = block.source.replace(SHOWN_ADDRESS, server.url)
    proc = subprocess.run(
        ["bash", "-c", "set -euo pipefail\n" + script],
        capture_output=True,
        text=True,
        env={**os.environ, "KEY": server.key},
        timeout=120,
    )
    assert proc.returncode == 0, f"{block.id}: exit {proc.returncode}: {proc.stderr[-2000:]}"
    if block.answer is not None:
        check_answer(block, proc.stdout)
    else:
        assert not proc.stdout.lstrip().startswith('{"error"'), f"{block.id}: {proc.stdout[:500]}"


def check_plugin(block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Imported as the package its first line names, registered, and serving one model through HTTP."""
    from gateway import Backend

    from .conftest import serve

    first = block.source.splitlines()[0]
    match = re.match(r"#\s*(\w+)/__init__\.py", first)
    package = match.group(1) if match else "docs_plugin_example"
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text(block.source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, package, raising=False)
    module = importlib.import_module(package)
    backends = [v for v in vars(module).values() if isinstance(v, type) and issubclass(v, Backend) and v is not Backend]
    assert backends, f"{block.id}: the plugin defines no Backend"
    for cls in backends:
        path = 'path = "."\n' if cls.uses_path else ""
        if cls.embed is Backend.embed:  # a reranker only: it serves a rerank model
            _check_reranker(block, module, cls.name, path)
            continue
        with serve(f'[models.example]\nbackend = "{cls.name}"\n{path}', plugins=(module,)) as client:
            r = client.post("/v1/embeddings", json={"model": "example", "input": ["the food was good", "good food"]})
            assert r.status_code == 200, f"{block.id}: {r.text}"
            card = client.get("/v1/models").json()["data"][0]
            assert card["backend"] == cls.name and card["state"] == "ready", card
            assert all(len(d["embedding"]) == card["dimension"] for d in r.json()["data"])
    monkeypatch.delitem(sys.modules, package)


def _check_reranker(block: Block, module: Any, name: str, path: str) -> None:
    from .conftest import serve

    toml = f'[models.example]\nbackend = "{name}"\n{path}task = "rerank"\n'
    with serve(toml, plugins=(module,)) as client:
        body = {"model": "example", "query": "good food", "documents": ["the food was good", "bad weather"]}
        r = client.post("/v2/rerank", json=body)
        assert r.status_code == 200, f"{block.id}: {r.text}"
        results = r.json()["results"]
        assert len(results) == 2 and results[0]["relevance_score"] >= results[1]["relevance_score"], results


def run_python(block: Block, server: Server) -> None:
    source = block.source.replace(SHOWN_ADDRESS, server.url)
    exec(compile(source, block.id, "exec"), {"KEY": server.key, "__name__": "docs_example"})


def check_text(block: Block) -> None:
    """Output shown as is; a `gateway X` line must still name a subcommand."""
    subcommands = set(_cli_parser()._subparsers._group_actions[0].choices)
    for line in block.source.splitlines():
        if line.startswith("gateway "):
            assert line.split()[1] in subcommands, f"{block.id}: `{line.split()[1]}` is not a gateway subcommand"


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.skip is None], ids=lambda b: b.id)
def test_doc_example(block: Block, request: pytest.FixtureRequest) -> None:
    tmp_path: Path = request.getfixturevalue("tmp_path")
    if block.language == "toml":
        check_config(block, tmp_path)
    elif block.language == "sh" and "curl " in block.source:
        run_request(block, request.getfixturevalue("docs_server"))
    elif block.language == "sh":
        check_command(block)
    elif block.language == "python" and "@hookimpl" in block.source:
        check_plugin(block, tmp_path, request.getfixturevalue("monkeypatch"))
    elif block.language == "python":
        run_python(block, request.getfixturevalue("docs_server"))
    elif block.language == "json":
        parse_shown_json(block.source)
    elif block.language == "text":
        check_text(block)
    else:
        pytest.fail(f"{block.id}: a ```{block.language or '(no language)'} block: give it a language this test runs")


def test_few_examples_are_skipped_and_each_says_why() -> None:
    skipped = [b for b in BLOCKS if b.skip is not None]
    assert all(b.skip.strip('" ') for b in skipped), [b.id for b in skipped if not b.skip.strip('" ')]
    assert len(skipped) <= MAX_SKIPPED, [b.id for b in skipped]


def test_every_page_of_the_docs_is_read() -> None:
    """The collector finds the blocks: a README without any would mean the lexer, not the docs, changed."""
    found = {b.path for b in BLOCKS}
    assert ROOT / "README.md" in found and ROOT / "docs" / "api.md" in found


def _hooks() -> Any:
    """docs/hooks.py (the mkdocs hook), for the anchors GitHub gives headings."""
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_reach_a_file_and_a_heading(path: Path) -> None:
    """As GitHub reads the pages (mkdocs checks the site's own links; this covers README.md and ../ links too)."""
    hooks = _hooks()
    text = hooks.FENCE.sub("", path.read_text())
    broken = []
    for target, anchor in re.findall(r"\]\((?![a-z]+:)([^)\s#]*)(?:#([^)\s]*))?\)", text):
        file = (path.parent / target).resolve() if target else path
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in hooks.anchors(file.read_text()):
            broken.append(f"{target}#{anchor}: no such heading")
    assert not broken, broken


@pytest.mark.parametrize(
    ("shown", "real", "ok"),
    [
        ('{"a": [0.1234561, 0.2, ...], "id": "x"}', {"a": [0.12345, 0.2, 0.3], "id": "y"}, True),
        ('{"a": [0.1, 0.2, ...]}', {"a": [0.1, 0.3, 0.3]}, False),  # a value differs
        ('{"a": [0.1, 0.2]}', {"a": [0.1, 0.2, 0.3]}, False),  # more values than shown, no ellipsis
        ('{..., "usage": {"total_tokens": 7}}', {"id": "x", "usage": {"total_tokens": 7}}, True),
        ('{"usage": {"total_tokens": 7}}', {"id": "x", "usage": {"total_tokens": 7}}, False),  # a field not shown
        ('{"usage": {"total_tokens": 7}}', {"usage": {"total_tokens": 8}}, False),  # counts are exact
        ('{"m": "a ... b"}', {"m": "a ... b"}, True),  # an ellipsis inside a string is text
    ],
)
def test_the_comparison_tells_a_drifted_answer(shown: str, real: Any, ok: bool) -> None:
    assert (not mismatches(parse_shown_json(shown), real)) is ok
