"""The docs say what the code does.

Every ```python block in README.md and docs/*.md runs, each in a process of its own
(tests/docs_harness.py), unless the line before it marks it as an excerpt and says why:

    <!-- docs-test: excerpt: REASON -->

A block that needs context says so the same way, ``<!-- docs-test: with FIXTURE, ... -->``
(the fixtures are listed in tests/docs_harness.py). The API reference builds from the
docstrings without a warning, and a few promises the pages make are checked directly.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import shardline as sl

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FIXTURES = {"node", "pipe", "counter", "myapp", "tiny-llama"}
MARKER = re.compile(r"<!--\s*docs-test:\s*(.*?)\s*-->")


@dataclass
class Snippet:
    page: Path
    line: int
    code: str
    marker: str | None

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def excerpt(self) -> str | None:
        """Why it is not run, for an excerpt."""
        if self.marker is None or not self.marker.startswith("excerpt"):
            return None
        return self.marker.removeprefix("excerpt").lstrip(":").strip()

    @property
    def fixtures(self) -> list[str]:
        if self.marker is None or not self.marker.startswith("with "):
            return []
        return [f.strip() for f in self.marker.removeprefix("with ").split(",")]


def snippets(page: Path) -> list[Snippet]:
    found = []
    lines = page.read_text().splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip().startswith("```python"):
            start = i
            i += 1
            while not lines[i].strip().startswith("```"):
                i += 1
            before = next((ln for ln in reversed(lines[:start]) if ln.strip()), "")
            match = MARKER.search(before)
            found.append(Snippet(page, start + 1, "\n".join(lines[start + 1:i]) + "\n",
                                 match.group(1) if match else None))
        i += 1
    return found


ALL = [s for page in PAGES for s in snippets(page)]


def test_every_snippet_is_run_or_says_why_not() -> None:
    assert len(ALL) >= 15
    for snippet in ALL:
        if snippet.marker is None:
            continue
        if snippet.excerpt is not None:
            assert len(snippet.excerpt.split()) >= 4, f"{snippet.id}: an excerpt says why"
        else:
            assert snippet.fixtures, f"{snippet.id}: unknown marker {snippet.marker!r}"
            assert set(snippet.fixtures) <= FIXTURES, f"{snippet.id}: {snippet.fixtures}"
    # Excerpts stay the exception.
    assert sum(s.excerpt is None for s in ALL) > sum(s.excerpt is not None for s in ALL)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("snippet", [s for s in ALL if s.excerpt is None],
                         ids=lambda s: s.id)
def test_snippet_runs(snippet: Snippet, tmp_path: Path) -> None:
    (tmp_path / "snippet.py").write_text(snippet.code)
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "docs_harness.py"),
                           "snippet.py", ",".join(snippet.fixtures)],
                          capture_output=True, text=True, timeout=220, cwd=tmp_path)
    assert proc.returncode == 0, f"{snippet.id}\n{proc.stdout}\n{proc.stderr}"


def test_excerpts_at_least_compile() -> None:
    """An excerpt is still Python (fragments with ``...`` for elided arguments aside)."""
    import ast

    for snippet in ALL:
        if snippet.excerpt is None or "..." in snippet.code:
            continue
        ast.parse(snippet.code, snippet.id, feature_version=(3, 10))


# -- command lines in the pages ---------------------------------------------------------

COMMAND = re.compile(r"shardline (node|run|demo|serve|keys generate)\b([^`|#\n]*)")


def test_documented_command_line_flags_exist() -> None:
    """Every ``--flag`` written after ``shardline node`` / ``run`` / ``demo`` / ``serve`` /
    ``keys generate`` in the pages and examples is one that command takes."""
    from shardline.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    options = {name: {o for a in p._actions for o in a.option_strings}
               for name, p in sub.choices.items()}
    keys = next(a for a in sub.choices["keys"]._actions
                if a.__class__.__name__ == "_SubParsersAction")
    options["keys generate"] = {o for a in keys.choices["generate"]._actions
                                for o in a.option_strings}
    checked = 0
    for page in [*PAGES, *sorted((ROOT / "examples").glob("*.md"))]:
        text = page.read_text().replace("\\\n", " ")
        for match in COMMAND.finditer(text):
            for token in match.group(2).split():
                if token.endswith(".py"):
                    break   # what follows is the script's
                flag = token.strip("[]().,;").split("=")[0]
                if flag.startswith("--"):
                    assert flag in options[match.group(1)], \
                        f"{page.name}: shardline {match.group(1)} has no {flag}"
                    checked += 1
    assert checked >= 20


# -- the API reference -------------------------------------------------------------------

@pytest.mark.timeout(180)
def test_api_reference_builds_from_the_docstrings(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "docs" / "build_api.py"),
                           str(tmp_path / "api")], capture_output=True, text=True,
                          timeout=160, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    top = (tmp_path / "api" / "shardline.html").read_text()
    for name in ("Node.connect", "LocalCluster.pids", "MethodNotFound", "ActorRef.ask"):
        assert f'id="{name}"' in top, name
    models = (tmp_path / "api" / "shardline" / "models.html").read_text()
    for name in ("Pipeline.start", "Batcher", "QueueFull", "StageActor",
                 "Pipeline.load_state_dict"):
        assert f'id="{name}"' in models, name
    assert "cache_idle_s" in models and "max_inflight" in models
    assert (tmp_path / "api" / "shardline" / "models" / "schedules.html").is_file()
    assert "docs/build_api.py" in (ROOT / "README.md").read_text()
    assert "docs/build_api.py" in (ROOT / ".ci" / "run").read_text()


# -- promises the pages make, checked directly ---------------------------------------------

class Secretive(sl.Actor):
    async def _hidden(self) -> int:
        return 1

    async def shown(self) -> int:
        return 2


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_private_and_unknown_methods_raise_method_not_found(anyio_backend: str) -> None:
    """docs/actors.md: "Unknown or private methods raise sl.MethodNotFound at the caller,
    before anything is enqueued"; by attribute and by name alike."""
    import copy

    async with sl.Node() as node:
        ref = await node.spawn(Secretive)
        with pytest.raises(sl.MethodNotFound, match="_hidden"):
            await ref._hidden()
        with pytest.raises(sl.MethodNotFound, match="_hidden"):
            await ref.ask("_hidden")
        with pytest.raises(sl.MethodNotFound, match="nothere"):
            await ref.nothere()
        assert await ref.shown() == 2
        # Python's own probes still see plain missing attributes.
        assert not hasattr(ref, "_hidden") and getattr(ref, "_x", None) is None
        assert not hasattr(ref, "__wrapped__")          # inspect and functools probe it
        with pytest.raises(AttributeError) as info:
            ref.__fspath__  # noqa: B018
        assert not isinstance(info.value, sl.MethodNotFound)
        assert copy.copy(ref) is ref and copy.deepcopy({"r": ref})["r"] is ref
        assert await copy.copy(ref).shown() == 2
        assert node.actors() == [ref]


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_metrics_text_is_text(anyio_backend: str) -> None:
    """docs/actors.md: ``node.metrics.text()`` is the text exposition."""
    pytest.importorskip("prometheus_client")
    async with sl.Node(metrics=True) as node:
        await node.spawn(Secretive, name="s")
        await node.ref("s").shown()
        assert node.metrics is not None
        text = node.metrics.text()
        assert isinstance(text, str)
        assert 'shardline_actor_messages_in_total{actor="s"} 1.0' in text
