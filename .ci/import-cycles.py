#!/usr/bin/env python3
"""Fails (exit 1) on an import circle between the files of src/runtime, src/retry or
src/dead_letter, or on a broken layering rule:

* src/outcome.rs imports nothing from the crate (it is the vocabulary every layer shares);
* nothing in src/retry imports from src/dead_letter (retry decides, dead_letter records).

A file depends on another when its non-test code names a path into it (`crate::…`, `super::…`,
`self::…`, or a child module of a `mod.rs` by name). A name re-exported by a `mod.rs` or
lib.rs (`pub use child::Name`) is followed to the file that defines it, so a child using its
parent's re-export is not counted as depending on the parent. Comments and `#[cfg(test)]`
code are ignored. Usage: `python3 .ci/import-cycles.py [-v]` from the repository root; `-v`
prints every file's dependencies.
"""
import os
import re
import sys

CHECKED = ["src/runtime", "src/retry", "src/dead_letter"]
PATH = re.compile(
    r"\b(super(?:::super)*|crate|self)::((?:[A-Za-z_][A-Za-z0-9_]*::)*)"
    r"(\{[^}]*\}|[A-Za-z_][A-Za-z0-9_]*)"
)
USE = re.compile(r"^\s*(?:pub(?:\([^)]*\))?\s+)?use\s+([^;]+);", re.M)


def code_of(path):
    """The file's code without comments and without its test module."""
    text = open(path).read()
    text = re.sub(r"//.*", "", text)
    return text.split("#[cfg(test)]")[0]


def modpath(path):
    rel = os.path.relpath(path, "src")[:-3].split("/")
    if rel == ["lib"]:
        return []
    if rel[-1] == "mod":
        rel = rel[:-1]
    return rel


def file_of_module(mp):
    base = "src/" + "/".join(mp)
    if not mp:
        return "src/lib.rs"
    if os.path.exists(base + ".rs"):
        return base + ".rs"
    if os.path.exists(base + "/mod.rs"):
        return base + "/mod.rs"
    return None


def resolve_head(me, head):
    if head == "crate":
        return []
    if head == "self":
        return me
    return me[: len(me) - head.count("super")]


def reexports(mp, _cache={}):
    """Names a module re-exports with `use child::…::Name`, mapped to the full module path
    of what they name."""
    if tuple(mp) in _cache:
        return _cache[tuple(mp)]
    out = {}
    _cache[tuple(mp)] = out
    f = file_of_module(mp)
    if not f:
        return out
    for m in USE.finditer(code_of(f)):
        body = re.sub(r"\s+", "", m.group(1))
        # one level of braces: a::b::{C, D as E, f::G}
        mb = re.match(r"^((?:[A-Za-z_][A-Za-z0-9_]*::)*)\{(.*)\}$", body)
        items = []
        if mb:
            prefix = mb.group(1)
            for part in mb.group(2).split(","):
                if part:
                    items.append(prefix + part)
        else:
            items.append(body)
        for item in items:
            alias = None
            if "as" in item:
                # whitespace was removed: `a::Bas C` cannot be told from a name; look for `as`
                # between two path segments written with spaces in the source
                spaced = re.search(r"(\w)\s+as\s+(\w+)\s*$", m.group(1))
                if spaced and item.endswith(spaced.group(2)):
                    alias = spaced.group(2)
                    item = item[: -len("as" + alias)]
            segs = [s for s in item.split("::") if s]
            if not segs:
                continue
            name = alias or segs[-1]
            if segs[-1] in ("self", "*"):
                continue
            head = segs[0]
            if head in ("crate", "self") or head.startswith("super"):
                start = resolve_head(mp, head)
                segs = segs[1:]
            elif file_of_module(mp + [head]):
                start = mp
            else:
                continue  # an external crate
            out[name] = start + segs
    return out


def target_file(mp):
    """The file that defines the item or module at module path `mp` (following re-exports)."""
    for _ in range(8):
        for n in range(len(mp), -1, -1):
            f = file_of_module(mp[:n])
            if f is None:
                continue
            if n == len(mp):
                return f
            # mp[n] is an item of module mp[:n]: re-exported from elsewhere?
            target = reexports(mp[:n]).get(mp[n])
            if target is not None and target[:n] != mp[:n] or (
                target is not None and len(target) > n + 1
            ):
                mp = target + mp[n + 1 :]
                break
            return f
        else:
            return None
    return None


def deps_of(path):
    me = modpath(path)
    code = code_of(path)
    deps = set()
    for m in PATH.finditer(code):
        head, mid, last = m.groups()
        base = resolve_head(me, head)
        segs = [x for x in mid.split("::") if x]
        if last.startswith("{"):
            names = [x.strip().split("::")[0] for x in last[1:-1].split(",") if x.strip()]
        else:
            names = [last]
        for n in names:
            if n == "self":
                f = target_file(base + segs)
            else:
                f = target_file(base + segs + [n])
            if f and f != path:
                deps.add(f)
    if path.endswith("mod.rs"):
        # children named by a plain path (`child::Item`) from their parent
        for m in re.finditer(r"^\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+(\w+);", code, re.M):
            child = m.group(1)
            for u in re.finditer(r"(?<![:\w])" + child + r"::(\{[^}]*\}|\w+)", code):
                target = u.group(1)
                names = (
                    [x.strip().split("::")[0] for x in target[1:-1].split(",") if x.strip()]
                    if target.startswith("{")
                    else [target]
                )
                for n in names:
                    f = target_file(me + [child, n])
                    if f and f != path:
                        deps.add(f)
    return deps


def sccs(edges):
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in edges:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(comp)

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return [sorted(c) for c in out if len(c) > 1]


def main():
    verbose = "-v" in sys.argv[1:]
    failures = []
    for root in CHECKED:
        edges = {}
        for dirpath, _, names in os.walk(root):
            for name in names:
                if name.endswith(".rs"):
                    p = os.path.join(dirpath, name)
                    edges[p] = {d for d in deps_of(p) if d.startswith(root + "/")}
        if verbose:
            for p in sorted(edges):
                print(p, "->", sorted(edges[p]))
        for comp in sccs(edges):
            failures.append(f"import circle in {root}: " + " <-> ".join(comp))
    crate_paths = [
        m.group(0) for m in PATH.finditer(code_of("src/outcome.rs"))
    ]
    if crate_paths:
        failures.append("src/outcome.rs imports from the crate: " + ", ".join(crate_paths))
    for dirpath, _, names in os.walk("src/retry"):
        for name in names:
            if name.endswith(".rs"):
                p = os.path.join(dirpath, name)
                bad = sorted(d for d in deps_of(p) if d.startswith("src/dead_letter/"))
                if bad:
                    failures.append(f"{p} imports from src/dead_letter: {', '.join(bad)}")
    for f in failures:
        print("!!", f)
    if failures:
        return 1
    print("no import circles in " + ", ".join(CHECKED) + "; layering rules hold")
    return 0


if __name__ == "__main__":
    sys.exit(main())
