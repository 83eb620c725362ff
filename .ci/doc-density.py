#!/usr/bin/env python3
"""Doc-comment density of src/: doc lines / code lines, as issue 18 asks.

A line is counted after stripping leading whitespace; blank lines are skipped.
- doc: starts with `///` or `//!` (outer and inner doc comments)
- comment: other `//` lines (not counted either way)
- code: everything else, including `#[cfg(test)]` modules (reported separately too)
Markdown included with include_str! is not counted.
"""
import pathlib, re, sys

args = [a for a in sys.argv[1:] if not a.startswith("--min=")]
minimum = next((float(a.split("=", 1)[1]) for a in sys.argv[1:] if a.startswith("--min=")), None)
root = pathlib.Path(args[0] if args else "src")
tot = {"doc": 0, "comment": 0, "code": 0, "test_code": 0}
for path in sorted(root.rglob("*.rs")):
    depth_in_test = None
    depth = 0
    pending_cfg_test = False
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("///") or line.startswith("//!"):
            tot["doc"] += 1
            continue
        if line.startswith("//"):
            tot["comment"] += 1
            continue
        tot["code"] += 1
        if depth_in_test is not None:
            tot["test_code"] += 1
        if line.startswith("#[cfg(test)]"):
            pending_cfg_test = True
        elif pending_cfg_test and re.match(r"(pub(\(crate\))? )?mod \w+ \{", line):
            depth_in_test = depth
            pending_cfg_test = False
            tot["test_code"] += 1
        elif pending_cfg_test and not line.startswith("#["):
            pending_cfg_test = False
        depth += line.count("{") - line.count("}")
        if depth_in_test is not None and depth <= depth_in_test:
            depth_in_test = None
print(f"files under {root}: doc lines {tot['doc']}, other comment lines {tot['comment']}, "
      f"code lines {tot['code']} (of which in #[cfg(test)] modules {tot['test_code']})")
print(f"density doc/code = {tot['doc'] / tot['code']:.3f}; "
      f"excluding test modules = {tot['doc'] / (tot['code'] - tot['test_code']):.3f}")
if minimum is not None and tot["doc"] / tot["code"] < minimum:
    sys.exit(f"doc-comment density below {minimum}")
