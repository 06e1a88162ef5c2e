"""The README and the docs/ pages cannot rot: their code runs, their links resolve.

What is checked, in README.md and every docs/*.md:

- Every ```python block runs here, or the line just before its fence (the last
  non-blank one) is a marker that says why not:

      <!-- not run: needs ImageNet -->

  A `not run` marker without a reason fails, and so does a block with no marker that
  does not run.
- A block that trains runs at a reduced size. Its marker names each substitution as
  `OLD -> NEW`, separated by `;`, and the test fails when OLD is not in the block:

      <!-- test: steps_per_epoch=200 -> steps_per_epoch=2; epochs=10 -> epochs=1 -->

- Each runnable block runs as its own program (`python -c`, a fresh process) in a
  temporary directory, with the repository on PYTHONPATH, KERAS_BACKEND=tensorflow, and
  every `/tmp/` path in it rewritten to that directory. It passes when it exits with
  status 0 and writes every file the block names under /tmp (after the rewrite).
- In ```bash blocks, every `python main.py ...` or `python scripts/NAME.py ...` command
  names a program that exists and only flags that program defines (its absl flags, read
  by importing it; `--noFLAG` for a boolean flag).
- Every relative link points at a file or folder that exists, and every `#anchor` at a
  heading of the page it names (GitHub's heading slugs).
- The README is a front page: under 250 lines, keeps the install and test commands
  that .ci/run runs, links to every docs page, and its claims block (between the
  CLAIMS markers) is what `scripts/reproduce_claims.py --report_only` writes there.
"""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md"] + sorted((REPO / "docs").glob("*.md"))
INSTALL = 'pip install -e ".[test]"'
TEST = ('python -m pytest -m "not slow" -n 2 --dist loadgroup -q && '
        "KERAS_BACKEND=jax python -m pytest -q tests/test_core_on_jax.py")
MAX_README_LINES = 250

FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w-]*)\s*$")
MARKER = re.compile(r"^\s*<!--\s*(?P<kind>not run|test)\b(?P<rest>.*?)-->\s*$")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\((?P<target>[^)\s]+)\)|!\[[^\]]*\]\((?P<image>[^)\s]+)\)")


class Block:
    """One fenced code block: its page, the line of its fence, language, code, and the
    marker line before it (None when there is none)."""

    def __init__(self, page, line, lang, code, marker):
        self.page, self.line, self.lang, self.code, self.marker = (
            page, line, lang, code, marker)

    @property
    def name(self):
        page = self.page.relative_to(REPO) if self.page.is_relative_to(REPO) else self.page
        return f"{page}:{self.line}"


def code_blocks(page, text=None):
    """The fenced blocks of a Markdown page, in order."""
    lines = (page.read_text(encoding="utf-8") if text is None else text).splitlines()
    blocks, i = [], 0
    while i < len(lines):
        start = FENCE.match(lines[i])
        if not start:
            i += 1
            continue
        indent = len(start["indent"])
        end = i + 1
        while end < len(lines) and not re.match(r"^\s*```\s*$", lines[end]):
            end += 1
        if end == len(lines):
            raise AssertionError(f"{page}:{i + 1}: a code fence that is never closed")
        before = [line for line in lines[:i] if line.strip()]
        marker = before[-1] if before and MARKER.match(before[-1]) else None
        code = "\n".join(line[indent:] for line in lines[i + 1:end]) + "\n"
        blocks.append(Block(page, i + 1, start["lang"], code, marker))
        i = end + 1
    return blocks


def parse_marker(marker):
    """("not run", reason) or ("test", [(old, new), ...]) for a marker line; raises
    ValueError for a marker that says too little."""
    match = MARKER.match(marker)
    kind, rest = match["kind"], match["rest"].strip()
    if not rest.startswith(":") or not rest[1:].strip():
        raise ValueError(f"marker {marker.strip()!r} gives no "
                         f"{'reason' if kind == 'not run' else 'substitution'} after ':'")
    rest = rest[1:].strip()
    if kind == "not run":
        return kind, rest
    pairs = []
    for part in rest.split(";"):
        old, arrow, new = part.partition(" -> ")
        if not arrow or not old.strip():
            raise ValueError(f"marker {marker.strip()!r}: {part.strip()!r} is not OLD -> NEW")
        pairs.append((old.strip(), new.strip()))
    return kind, pairs


def runnable_code(block, tmp_dir):
    """The block's code as the test runs it: its marker's substitutions applied (each
    OLD must be found) and /tmp/ rewritten to `tmp_dir`."""
    code = block.code
    if block.marker:
        kind, pairs = parse_marker(block.marker)
        assert kind == "test", f"{block.name} is marked not run"
        for old, new in pairs:
            if old not in code:
                raise ValueError(f"{block.name}: the marker replaces {old!r}, which is "
                                 f"not in the block")
            code = code.replace(old, new)
    return code.replace("/tmp/", f"{tmp_dir}/")


def python_blocks():
    return [b for page in PAGES for b in code_blocks(page) if b.lang == "python"]


def runnable_blocks():
    return [b for b in python_blocks()
            if not (b.marker and MARKER.match(b.marker)["kind"] == "not run")]


# The helpers themselves, on made-up pages: the rules above fail where they should.

def test_a_marker_needs_a_reason_and_a_substitution_needs_its_text(tmp_path):
    page = tmp_path / "page.md"
    text = ("Intro.\n\n<!-- not run: needs a TPU -->\n```python\ntpu()\n```\n\n"
            "<!-- not run -->\n```python\nx = 1\n```\n\n"
            "<!-- test: epochs=10 -> epochs=1; /tmp/a -> /tmp/b -->\n"
            "```python\nfit(epochs=10, path='/tmp/a/x')\n```\n\n"
            "  ```bash\n  python main.py --advprop\n  ```\n")
    blocks = code_blocks(page, text)
    assert [(b.lang, b.line) for b in blocks] == [
        ("python", 4), ("python", 9), ("python", 14), ("bash", 18)]
    assert parse_marker(blocks[0].marker) == ("not run", "needs a TPU")
    with pytest.raises(ValueError, match="gives no reason"):
        parse_marker(blocks[1].marker)
    assert runnable_code(blocks[2], "/work/t") == "fit(epochs=1, path='/work/t/b/x')\n"
    assert blocks[3].code == "python main.py --advprop\n" and blocks[3].marker is None
    blocks[2].code = "fit(epochs=5)\n"
    with pytest.raises(ValueError, match="replaces 'epochs=10', which is not in"):
        runnable_code(blocks[2], "/work/t")
    with pytest.raises(ValueError, match="is not OLD -> NEW"):
        parse_marker("<!-- test: epochs=10 => 1 -->")


def test_slugs_follow_githubs_rule():
    assert slugs("# Does it reproduce the papers?\n## Training with Keras fit()\n"
                 "## `--flag` and more\n## Notes\n## Notes\n") == {
        "does-it-reproduce-the-papers", "training-with-keras-fit", "--flag-and-more",
        "notes", "notes-1"}


# The pages.

def test_every_python_block_runs_or_says_why_not():
    blocks = python_blocks()
    assert blocks, "no python blocks found"
    for block in blocks:
        if block.marker:
            parse_marker(block.marker)  # raises on a marker without a reason
    not_run = [b for b in blocks if b.marker and MARKER.match(b.marker)["kind"] == "not run"]
    assert len(runnable_blocks()) + len(not_run) == len(blocks)


@pytest.mark.parametrize("block", runnable_blocks(), ids=lambda b: b.name)
def test_python_block_runs(block, tmp_path):
    code = runnable_code(block, tmp_path)
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO),
                                                        os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (f"{block.name} failed (exit {proc.returncode}):\n"
                                  f"{proc.stderr[-4000:]}")
    written = re.findall(re.escape(str(tmp_path)) + r"/[\w./-]*\w", code)
    missing = [path for path in written if not os.path.exists(path)
               and not path.endswith("/backup")]  # BackupAndRestore deletes its folder
    assert not missing, f"{block.name} did not write {missing}"


def slugs(text):
    """GitHub's anchors for the headings of a Markdown text (outside code blocks)."""
    found, seen = set(), {}
    in_code = False
    for line in text.splitlines():
        if FENCE.match(line) or re.match(r"^\s*```", line):
            in_code = not in_code
            continue
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if in_code or not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading[1].lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def strip_code(text):
    """The text without fenced blocks and inline code spans (links there are not links)."""
    text = re.sub(r"^\s*```.*?^\s*```\s*$", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_and_anchors_resolve(page):
    problems = []
    for match in LINK.finditer(strip_code(page.read_text(encoding="utf-8"))):
        target = match["target"] or match["image"]
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            problems.append(f"{target}: {resolved} does not exist")
        elif anchor:
            if resolved.suffix != ".md":
                problems.append(f"{target}: an anchor into a file that is not Markdown")
            elif anchor not in slugs(resolved.read_text(encoding="utf-8")):
                problems.append(f"{target}: no heading with the anchor #{anchor}")
    assert not problems, f"{page.relative_to(REPO)}:\n" + "\n".join(problems)


def program_commands():
    """(block name, program, [flag names]) for each `python[3] main.py` / `python[3]
    scripts/NAME.py` command in a bash block."""
    commands = []
    for page in PAGES:
        for block in code_blocks(page):
            if block.lang not in ("bash", "sh", "shell"):
                continue
            for line in block.code.replace("\\\n", " ").splitlines():
                line = line.split(" #", 1)[0]
                for match in re.finditer(r"\bpython3?\s+((?:scripts/)?[\w-]+\.py)\b(.*?)"
                                         r"(?=&&|\||;|$)", line):
                    names = [token[2:].split("=", 1)[0]
                             for token in match[2].split() if token.startswith("--")]
                    commands.append((block.name, match[1], names))
    return commands


def defined_flags(programs):
    """{program: set of flag names}, each program imported once in a child process
    (absl flags are global; each program's are removed before the next is imported)."""
    script = """
import importlib.util, json, sys
from absl import flags
result = {}
for program in sys.argv[1:]:
    before = set(flags.FLAGS)
    spec = importlib.util.spec_from_file_location("docs_check_" + str(len(result)), program)
    module = importlib.util.module_from_spec(spec)
    sys.argv[0] = program
    spec.loader.exec_module(module)
    names = set(flags.FLAGS) - before
    result[program] = sorted(names) + sorted(
        "no" + n for n in names if isinstance(flags.FLAGS[n], flags.BooleanFlag))
    for name in names:
        delattr(flags.FLAGS, name)
print("FLAGS_JSON " + json.dumps(result))
"""
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO),
                                                        os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", script, *programs], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("FLAGS_JSON ")][-1]
    return {p: set(names) for p, names in json.loads(line[len("FLAGS_JSON "):]).items()}


def test_bash_commands_name_real_programs_and_flags():
    commands = program_commands()
    assert any(program == "main.py" for _, program, _ in commands)
    programs = sorted({program for _, program, _ in commands})
    missing = [p for p in programs if not (REPO / p).exists()]
    assert not missing, f"the docs run programs that do not exist: {missing}"
    known = defined_flags(programs)
    assert {"advprop", "model", "noadvprop"} <= known["main.py"]  # aliases and --noX read
    assert "not_a_flag" not in known["main.py"]
    absl_builtin = {"help", "helpfull", "helpshort", "helpxml"}
    unknown = [f"{name}: python {program} --{flag}" for name, program, flags in commands
               for flag in flags if flag not in known[program] | absl_builtin]
    assert not unknown, "flags that the program does not define:\n" + "\n".join(unknown)


def test_readme_is_a_front_page():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) < MAX_README_LINES
    bash = [b.code for b in code_blocks(REPO / "README.md") if b.lang == "bash"]
    first = bash[0].splitlines()
    assert first[0].startswith(INSTALL + " ")  # .ci/run installs and tests as it says
    assert first[1].startswith("python main.py --advprop --model=efficientnet-b0")
    assert first[2] == TEST
    ci = (REPO / ".ci" / "run").read_text()
    assert TEST in ci and INSTALL.replace("pip", "python -m pip") in ci
    linked = {m["target"].partition("#")[0] for m in LINK.finditer(strip_code(text))
              if m["target"]}
    unlinked = [str(p.relative_to(REPO)) for p in PAGES[1:]
                if str(p.relative_to(REPO)) not in linked]
    assert not unlinked, f"docs pages the README does not link to: {unlinked}"


def test_readme_claims_block_is_what_the_report_writes():
    from efficientnet_advprop.claims import report

    text = (REPO / "README.md").read_text(encoding="utf-8")
    start, end = text.find(report.README_START), text.find(report.README_END)
    assert 0 <= start < end, "README.md lost its claims markers (reproduce_claims.py needs them)"
    block = text[start + len(report.README_START):end].strip()
    assert block == report.readme_block(str(REPO / "results" / "claims"))
