"""Keeps the Bazel BUILD file true to the tree without Bazel (which cannot run here).

The BUILD file uses a small Starlark subset that is also valid Python (calls, lists,
a list comprehension, glob), so it is evaluated with stand-ins for load, package, glob
and the rules, and the resulting targets are checked against the files in the tree.
"""

import os
import pathlib
import shutil

from conftest import REPO_ROOT

RULES = ("py_library", "py_binary", "py_test")


def read_build(root):
    """{target name: {"rule": ..., "srcs": [...], "deps": [...], "data": [...]}}."""
    root = pathlib.Path(root)
    targets = {}

    def glob(patterns, exclude=()):
        found = set()
        for pattern in patterns:
            found.update(str(p.relative_to(root)) for p in root.glob(pattern) if p.is_file())
        for pattern in exclude:
            found.difference_update(str(p.relative_to(root)) for p in root.glob(pattern))
        return sorted(found)

    def rule(kind):
        def define(name, srcs=(), deps=(), data=(), main=None, **_):
            if name in targets:
                raise ValueError(f"BUILD: target {name!r} is defined twice")
            targets[name] = {"rule": kind, "srcs": list(srcs), "deps": list(deps),
                             "data": list(data), "main": main}
        return define

    namespace = {"load": lambda *args: None, "package": lambda **kw: None, "glob": glob}
    namespace.update({kind: rule(kind) for kind in RULES})
    exec(compile((root / "BUILD").read_text(), "BUILD", "exec"), namespace)  # noqa: S102
    return targets


def build_problems(root):
    """Every way the BUILD file disagrees with the tree under `root` (empty if none)."""
    root = pathlib.Path(root)
    targets = read_build(root)
    problems = []
    for name, target in targets.items():
        for path in target["srcs"] + target["data"] + [target["main"]] * bool(target["main"]):
            if not (root / path).exists():
                problems.append(f"{name}: {path} does not exist")
        for dep in target["deps"]:
            if not (dep.startswith(":") and dep[1:] in targets):
                problems.append(f"{name}: dep {dep} names no target of this BUILD")
    covered = {path for t in targets.values() for path in t["srcs"]}
    library = {path for t in targets.values() if t["rule"] == "py_library"
               for path in t["srcs"]}
    binaries = {path for t in targets.values() if t["rule"] == "py_binary"
                for path in t["srcs"]}
    tests = {path for t in targets.values() if t["rule"] == "py_test" for path in t["srcs"]}
    for path in sorted(root.glob("efficientnet_advprop/**/*.py")):
        if str(path.relative_to(root)) not in library:
            problems.append(f"{path.relative_to(root)} is in no py_library")
    for path in sorted(root.glob("tests/test_*.py")):
        if str(path.relative_to(root)) not in tests:
            problems.append(f"{path.relative_to(root)} has no py_test")
    for path in sorted(root.glob("scripts/*.py")) + [root / "main.py"]:
        if str(path.relative_to(root)) not in binaries:
            problems.append(f"{path.relative_to(root)} has no py_binary")
    for path in sorted(root.glob("tests/*.py")):
        rel = str(path.relative_to(root))
        if rel not in covered and not path.name.startswith("test_"):
            problems.append(f"{rel} (a test helper) is in no target")
    return problems


def test_build_file_matches_the_tree():
    assert build_problems(REPO_ROOT) == []
    targets = read_build(REPO_ROOT)
    assert targets["main"]["rule"] == "py_binary"
    assert targets["efficientnet_advprop"]["rule"] == "py_library"


def test_build_check_catches_a_file_without_a_target(tmp_path):
    shutil.copy(os.path.join(REPO_ROOT, "BUILD"), tmp_path / "BUILD")
    for name in ("efficientnet_advprop", "scripts", "tests"):
        shutil.copytree(os.path.join(REPO_ROOT, name), tmp_path / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.tfrecord*"))
    for name in ("main.py", "pytest.ini", "results/claims/split.json"):
        os.makedirs(os.path.dirname(tmp_path / name), exist_ok=True)
        shutil.copy(os.path.join(REPO_ROOT, name), tmp_path / name)
    assert build_problems(tmp_path) == []
    (tmp_path / "scripts" / "new_tool.py").write_text("print('hi')\n")
    (tmp_path / "scripts" / "benchmark.py").unlink()
    problems = build_problems(tmp_path)
    assert "scripts/new_tool.py has no py_binary" in problems
    assert "benchmark: scripts/benchmark.py does not exist" in problems
    (tmp_path / "BUILD").write_text((tmp_path / "BUILD").read_text().replace(
        'deps = [":efficientnet_advprop"],\n)\n\npy_binary(\n    name = "benchmark"',
        'deps = [":efficientnet_advprop_typo"],\n)\n\npy_binary(\n    name = "benchmark"'))
    assert any("dep :efficientnet_advprop_typo names no target" in p
               for p in build_problems(tmp_path))
