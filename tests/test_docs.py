"""The docs cite only files of the repository: every path under a top-level folder (or a root file)
that README.md, CONTRIBUTING.md or docs/*.md names exists. `<...>` placeholders end a path (its
folder must exist), `*` globs and `{a,b}` alternatives expand."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP = ("csrc", "python", "triton_kernels", "scripts", "tests", "benchmarks", "docs")
PATH = re.compile(r"(?<![\w./$-])((?:%s)/[\w./{},*-]*[\w*}]|(?:setup\.py|pyproject\.toml|LICENSE|README\.md|"
                  r"CONTRIBUTING\.md)(?![\w.]))" % "|".join(TOP))
PACKAGE = re.compile(r"(?<![\w./$-])(vtattn/[\w./-]*\w\.py)")  # python/vtattn/..., as the docs often shorten it


def _alternatives(path):
    m = re.search(r"\{([^{}]*)\}", path)
    if m is None:
        return [path]
    return [p for alt in m.group(1).split(",") for p in _alternatives(path[:m.start()] + alt + path[m.end():])]


def _exists(path):
    return any(ROOT.glob(path)) if "*" in path else (ROOT / path).exists()


def test_docs_cite_only_files_that_exist():
    docs = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
    missing = []
    for doc in docs:
        for i, line in enumerate(doc.read_text().splitlines(), 1):
            cited = PATH.findall(line) + [f"python/{p}" for p in PACKAGE.findall(line)]
            for m in PATH.finditer(line):  # a path cut by a placeholder: something must start so
                if line[m.end():m.end() + 1] == "<":
                    cited.remove(m.group(1))
                    cited.append(m.group(1) + "*")
            missing += [f"{doc.relative_to(ROOT)}:{i}: {p}" for c in cited for p in _alternatives(c)
                        if not _exists(p)]
    assert not missing, "cited but not in the repository:\n" + "\n".join(missing)


def test_the_pattern_finds_paths():
    line = "see `csrc/cuda/{gather,merge}_tokens.cu`, tests/test_x.py, setup.py and docs/<name>.md; x/docs/y.md"
    assert [p for c in PATH.findall(line) for p in _alternatives(c)] == [
        "csrc/cuda/gather_tokens.cu", "csrc/cuda/merge_tokens.cu", "tests/test_x.py", "setup.py"]
