#!/usr/bin/env bash
# Checks the relative links and images of Tandem's documentation: every
# `[text](path)`, `![alt](path)` and `[ref]: path` in README.md, DESIGN.md
# and docs/**/*.md (the book included) must name a file or directory that
# exists, and a `#fragment` into a markdown file (or into the same file)
# must match one of its headings, slugged as GitHub and mdBook slug them
# ("Running `tandem serve`" -> running-tandem-serve; a repeated heading
# gets -1, -2, ...). Links with a scheme (https:, mailto:) are not
# fetched. A book chapter with Rust code blocks must be included by
# tests/src/lib.rs (so its blocks compile as doctests). Exits 1 and lists
# every problem, 0 when there is none.
# Needs only python3.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 - "$@" <<'PY'
import os
import re
import sys
import unicodedata
from urllib.parse import unquote

ROOT = os.getcwd()


def doc_files():
    files = [f for f in ("README.md", "DESIGN.md") if os.path.isfile(f)]
    for base, dirs, names in os.walk("docs"):
        dirs[:] = sorted(d for d in dirs if d not in ("book-out", "target"))
        for n in sorted(names):
            if n.endswith(".md"):
                files.append(os.path.join(base, n))
    return files


FENCE = re.compile(r"^\s*(```+|~~~+)")


def prose_lines(text):
    """(line number, line) outside fenced code blocks."""
    fence = None
    for i, line in enumerate(text.split("\n"), 1):
        m = FENCE.match(line)
        if m:
            mark = m.group(1)
            if fence is None:
                fence = mark[0] * 3
                continue
            if mark.startswith(fence):
                fence = None
                continue
        if fence is None:
            yield i, line


def strip_code_spans(line):
    return re.sub(r"(`+)(.+?)\1", lambda m: " " * len(m.group(0)), line)


def slug(heading):
    """GitHub's (and mdBook's) anchor for a heading's text."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links -> their text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.replace("`", "")
    text = re.sub(r"(\*\*|__|\*)", "", text)
    text = text.strip().lower()
    out = []
    for ch in text:
        if ch in "-_" or ch.isalnum():
            out.append(ch)
        elif ch.isspace():
            out.append("-")
        elif unicodedata.category(ch).startswith(("L", "N")):
            out.append(ch)
    return "".join(out)


_anchors = {}


def anchors(path):
    if path not in _anchors:
        seen = {}
        found = set()
        with open(path, encoding="utf-8") as f:
            text = f.read()
        for _, line in prose_lines(text):
            m = re.match(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$", line)
            if m:
                s = slug(m.group(2))
                n = seen.get(s, 0)
                seen[s] = n + 1
                found.add(s if n == 0 else f"{s}-{n}")
            for m in re.finditer(r"""<a\s+[^>]*(?:id|name)=["']([^"']+)["']""", line):
                found.add(m.group(1))
        _anchors[path] = found
    return _anchors[path]


LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFDEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
HTML = re.compile(r"""<(?:img|a)\s[^>]*(?:src|href)=["']([^"']+)["']""")


def targets(line):
    plain = strip_code_spans(line)
    for m in LINK.finditer(plain):
        yield m.group(1)
    m = REFDEF.match(plain)
    if m:
        yield m.group(1)
    for m in HTML.finditer(plain):
        yield m.group(1)


def check(path):
    broken = []
    with open(path, encoding="utf-8") as f:
        text = f.read()
    base = os.path.dirname(path)
    for n, line in prose_lines(text):
        for target in targets(line):
            if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("//"):
                continue  # https:, mailto:, …: not fetched
            file_part, _, fragment = target.partition("#")
            file_part = unquote(file_part.split("?", 1)[0])
            if file_part:
                if file_part.startswith("/"):
                    resolved = os.path.normpath(os.path.join(ROOT, file_part.lstrip("/")))
                else:
                    resolved = os.path.normpath(os.path.join(base, file_part))
                if not os.path.exists(resolved):
                    broken.append((n, target, "no such file"))
                    continue
            else:
                resolved = path
            if fragment and resolved.endswith(".md") and os.path.isfile(resolved):
                if unquote(fragment) not in anchors(resolved):
                    broken.append((n, target, f"no heading #{fragment} in {os.path.relpath(resolved)}"))
    return broken


files = doc_files()
failures = 0
for path in files:
    for n, target, why in check(path):
        print(f"{path}:{n}: {target}: {why}")
        failures += 1

# The book's Rust blocks are compiled as doctests only when tests/src/lib.rs
# includes their chapter: a chapter with Rust code must be included.
lib = "tests/src/lib.rs"
if os.path.isfile(lib):
    with open(lib, encoding="utf-8") as f:
        included = f.read()
    for path in files:
        if not path.startswith(os.path.join("docs", "book", "src") + os.sep):
            continue
        with open(path, encoding="utf-8") as f:
            has_rust = re.search(r"^\s*```rust", f.read(), re.M)
        if has_rust and f'include_str!("../../{path}")' not in included:
            print(f"{path}: has Rust code blocks but {lib} does not include it"
                  " (#[doc = include_str!(...)]), so they are not compiled")
            failures += 1
if failures:
    print(f"check-links: {failures} broken link(s) in {len(files)} files", file=sys.stderr)
    sys.exit(1)
print(f"check-links: every relative link and image in {len(files)} files resolves")
PY
