"""The README and docs/ tell the truth: their commands exist, their runnable blocks run, their links resolve.

* Every ``moeut`` command in a shell block or an inline code span of the README and docs/ (also ``-m moeut.cli``
  under python or torchrun) names a verb and flags that ``moeut``'s parser has, so a renamed flag fails here
  instead of in a reader's terminal.
* A fenced block right after ``<!-- runnable -->`` is executed: the README's blocks first, in a temporary
  directory, then each docs/ page in a copy of what they left (``data/``, ``runs/tiny``, ``hf/tiny``). A marker may
  scale a block down explicitly, ``<!-- runnable: --steps 500 => --steps 3; A => B -->``: each left side must occur
  in the block and is replaced by its right side; ``{free_port}`` on a right side becomes a free TCP port. A block
  identical to one that already ran (same text, same replacements) is not run again.
* The pages in docs/ are the pages of mkdocs.yml's nav, and the README's relative links point at files that exist.
  (``mkdocs build --strict`` itself runs in the README's test command, which CI runs.)
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from moeut.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"

FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```\s*$", re.S | re.M)
MARKER = re.compile(r"<!--\s*runnable(?::(.*?))?\s*-->\s*$", re.S)
SHELL = {"bash", "sh", "shell", "console"}
BLOCK_TIMEOUT_S = 300


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    runnable: bool
    replacements: tuple[tuple[str, str], ...] = ()

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"

    def script(self, free_port: int) -> str:
        text = self.text
        for old, new in self.replacements:
            assert old in text, f"{self.where}: the marker replaces {old!r}, which the block does not contain"
            text = text.replace(old, new.replace("{free_port}", str(free_port)))
        return text


def _replacements(spec: str | None, where: str) -> tuple[tuple[str, str], ...]:
    if not spec or not spec.strip():
        return ()
    pairs = []
    for part in spec.split(";"):
        if "=>" not in part:
            raise AssertionError(f"{where}: a runnable marker's replacement needs 'OLD => NEW', got {part.strip()!r}")
        old, new = (s.strip() for s in part.split("=>", 1))
        pairs.append((old, new))
    return tuple(pairs)


def blocks_of(path: Path) -> list[Block]:
    source = path.read_text()
    blocks = []
    for m in FENCE.finditer(source):
        line = source.count("\n", 0, m.start()) + 1
        before = source[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = MARKER.search(before)
        where = f"{path.relative_to(REPO)}:{line}"
        blocks.append(Block(path, line, m.group(1).lower(), m.group(2), marker is not None,
                            _replacements(marker.group(1), where) if marker else ()))
    return blocks


def nav_pages() -> list[str]:
    """The docs/ pages listed in mkdocs.yml's nav, in order (read without yaml: one `- Title: page.md` a line)."""
    return re.findall(r"^\s*-\s*[^:\n]+:\s*(\S+\.md)\s*$", (REPO / "mkdocs.yml").read_text(), re.M)


def doc_files() -> list[Path]:
    """The README, then docs/ in nav order (pages outside the nav after them)."""
    pages = [DOCS / p for p in nav_pages()]
    rest = sorted(p for p in DOCS.rglob("*.md") if p not in pages)
    return [README, *pages, *rest]


# ---- every moeut command names a verb and flags that exist ---------------------------------------------------


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _commands(text: str) -> list[list[str]]:
    """Shell words of each simple command in ``text`` (continuation lines joined, comments and quotes handled)."""
    text = text.replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        try:
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            lexer.commenters = "#"
            words = list(lexer)
        except ValueError:  # an unbalanced quote in prose-like text: not a command line
            continue
        current: list[str] = []
        for w in words:
            if w and set(w) <= set("|&;()<>"):
                commands.append(current)
                current = []
            else:
                current.append(w)
        commands.append(current)
    return [c for c in commands if c]


def moeut_invocations(words: list[str]) -> list[list[str]]:
    """The argument lists after ``moeut`` / ``-m moeut.cli`` in one command's words."""
    found = []
    for i, w in enumerate(words):
        if w.rsplit("/", 1)[-1] == "moeut" or (w == "moeut.cli" and i and words[i - 1] == "-m"):
            found.append(words[i + 1:])
    return found


def flag_problems(args: list[str], parser: argparse.ArgumentParser) -> list[str]:
    verbs = _subparsers(parser)
    if not args or args[0] not in verbs:
        return [f"no such verb {args[0] if args else '(none)'!r} (verbs: {', '.join(verbs)})"]
    sub, rest = verbs[args[0]], args[1:]
    nested = _subparsers(sub)
    if nested:  # moeut analyze ANALYSIS ...
        if not rest or rest[0] not in nested:
            return [f"moeut {args[0]}: no such {args[0]} command {rest[0] if rest else '(none)'!r}"]
        sub, rest = nested[rest[0]], rest[1:]
    known = {s for action in sub._actions for s in action.option_strings}
    return [f"{sub.prog}: no flag {w.split('=', 1)[0]}" for w in rest
            if w.startswith("--") and w.split("=", 1)[0] not in known]


INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")


def test_every_moeut_command_in_the_docs_uses_a_real_verb_and_real_flags():
    parser = build_parser()
    problems, checked = [], 0
    for path in doc_files():
        texts = [(b.where, b.text) for b in blocks_of(path) if b.lang in SHELL | {""}]
        prose = FENCE.sub("", path.read_text())
        texts += [(f"{path.relative_to(REPO)} (inline)", m.group(1)) for m in INLINE.finditer(prose)
                  if re.match(r"(\S*/)?moeut \w", m.group(1)) and " --" in m.group(1)]  # a command, not a name
        for where, text in texts:
            for words in _commands(text):
                for args in moeut_invocations(words):
                    if args and args[0] in ("...", "…", "VERB"):  # `moeut VERB: interrupted`, `moeut …`
                        continue
                    checked += 1
                    problems += [f"{where}: {p}  [moeut {' '.join(args)}]" for p in flag_problems(args, parser)]
    assert checked > 50, f"only {checked} moeut commands found: is the extraction broken?"
    assert not problems, "\n".join(problems)


def test_the_flag_check_catches_a_renamed_flag_and_a_wrong_verb():
    parser = build_parser()
    assert flag_problems(["train", "--data", "d", "--steps", "5"], parser) == []
    assert flag_problems(["train", "--stepz", "5"], parser) == ["moeut train: no flag --stepz"]
    assert flag_problems(["analyze", "depth", "--max-repeats", "3", "--out", "x"], parser) == []
    assert flag_problems(["analyze", "nope"], parser)
    assert flag_problems(["trian"], parser)
    words = _commands("torchrun --nnodes 2 -m moeut.cli train --data d \\\n  --stepz 3 & # comment --nope\n")
    assert [flag_problems(a, parser) for w in words for a in moeut_invocations(w)] == [["moeut train: no flag --stepz"]]


# ---- the documentation's structure ------------------------------------------------------------------------------


def test_every_docs_page_is_in_the_nav_and_every_nav_page_exists():
    pages = nav_pages()
    on_disk = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
    assert sorted(pages) == on_disk


def test_the_readmes_relative_links_point_at_files_that_exist():
    links = re.findall(r"\]\(([^)\s]+)\)", README.read_text())
    local = [link.split("#", 1)[0] for link in links if not re.match(r"[a-z]+:|#", link)]
    assert local, "the README links to no page of the documentation"
    missing = [link for link in local if not (REPO / link).exists()]
    assert not missing, f"README links to missing files: {missing}"


def test_ci_runs_the_readmes_test_command_verbatim():
    """The README's second shell block is the test command; .ci/run must execute exactly that line."""
    shell = [b for b in blocks_of(README) if b.lang in SHELL]
    command = shell[1].text.strip()
    assert "pytest" in command and "\n" not in command
    assert command in (REPO / ".ci" / "run").read_text().splitlines()


# ---- runnable blocks ----------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="offline",
               PYTHONUNBUFFERED="1")
    return env


def run_block(block: Block, cwd: Path) -> None:
    script = block.script(_free_port())
    if block.lang in SHELL:
        argv = ["bash", "-e", "-o", "pipefail", "-c", script]
    elif block.lang == "python":
        argv = [sys.executable, "-c", script]
    else:
        raise AssertionError(f"{block.where}: a runnable block must be bash or python, not {block.lang!r}")
    try:
        res = subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"{block.where}: still running after {BLOCK_TIMEOUT_S} s\n{script}") from e
    if res.returncode:
        out = (res.stdout + res.stderr)[-6000:]
        raise AssertionError(f"{block.where}: exit status {res.returncode}\n--- block as run ---\n{script}"
                             f"--- output (tail) ---\n{out}")


def runnable(path: Path) -> list[Block]:
    return [b for b in blocks_of(path) if b.runnable]


def _key(block: Block) -> tuple:
    return block.lang, block.text, block.replacements


@pytest.fixture(scope="module")
def readme_workspace(tmp_path_factory):
    """The README's runnable blocks, run in order in a fresh directory: what they leave, and the blocks run."""
    from moeut.data import DataError, default_corpus_files

    try:
        default_corpus_files()
    except DataError as e:  # the quick start prepares the built-in corpus
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(str(e))
        pytest.skip(str(e))
    work = tmp_path_factory.mktemp("readme")
    blocks = runnable(README)
    for block in blocks:
        run_block(block, work)
    return work, {_key(b) for b in blocks}


def test_the_readme_has_a_runnable_quick_start():
    blocks = runnable(README)
    assert blocks and any("moeut train" in b.text for b in blocks)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_readmes_runnable_blocks_run(readme_workspace):
    work, _ = readme_workspace
    assert (work / "runs" / "tiny").is_dir() and (work / "data").is_dir()


PAGES = [p for p in doc_files()[1:] if runnable(p)]


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(DOCS)) for p in PAGES])
def test_a_docs_pages_runnable_blocks_run(page, readme_workspace, tmp_path):
    work, already_ran = readme_workspace
    shutil.copytree(work, tmp_path / "work", symlinks=True)
    for block in runnable(page):
        if _key(block) not in already_ran:
            run_block(block, tmp_path / "work")
