#!/usr/bin/env python3
"""Reports import cycles between the modules of a crate.

Usage: scripts/module-cycles.py <crate>/src [depth]

A module is a file's path under src/ cut to `depth` components (default 1: top-level
modules). An edge A -> B is any `crate::B...` path in A's non-test code (`super::` paths
are resolved to their absolute module). Prints each strongly connected component with more
than one module and exits 1 if there is any.
"""
import os
import re
import sys

root = sys.argv[1]
depth = int(sys.argv[2]) if len(sys.argv) > 2 else 1


def module_of(path):
    rel = os.path.relpath(path, root)[:-3].split(os.sep)
    if rel[-1] in ("mod", "lib", "main"):
        rel = rel[:-1]
    return rel


def strip_tests(text):
    i = text.find("#[cfg(test)]")
    return text if i < 0 else text[:i]


edges = {}
for dirpath, _, files in os.walk(root):
    for f in files:
        if not f.endswith(".rs"):
            continue
        path = os.path.join(dirpath, f)
        mod = module_of(path)
        if not mod:
            continue
        me = "::".join(mod[:depth])
        text = strip_tests(open(path).read())
        # Drop comments so doc links do not count as imports.
        text = re.sub(r"//[^\n]*", "", text)
        targets = set()
        for m in re.finditer(r"\bcrate::((?:[a-z_0-9]+::)*[a-z_0-9]+)", text):
            parts = m.group(1).split("::")
            targets.add("::".join(parts[:depth]))
        for m in re.finditer(r"\b((?:super::)+)((?:[a-z_0-9]+::)*[a-z_0-9]+)", text):
            ups = m.group(1).count("super::")
            base = mod[:-ups] if f not in ("mod.rs",) else mod[: len(mod) - ups]
            parts = base + m.group(2).split("::")
            targets.add("::".join(parts[:depth]))
        edges.setdefault(me, set()).update(t for t in targets if t and t != me)

# Tarjan's SCC.
index, low, stack, on, sccs, counter = {}, {}, [], set(), [], [0]
nodes = set(edges) | {t for ts in edges.values() for t in ts}


def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in edges.get(v, ()):
        if w not in nodes:
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
        if len(comp) > 1:
            sccs.append(sorted(comp))


sys.setrecursionlimit(10000)
for v in sorted(nodes):
    if v not in index:
        visit(v)
for c in sccs:
    inner = [f"{a} -> {b}" for a in c for b in sorted(edges.get(a, ())) if b in c]
    print("cycle:", ", ".join(c))
    for e in inner:
        print("   ", e)
if not sccs:
    print(f"{root}: no import cycles between modules (depth {depth})")
sys.exit(1 if sccs else 0)
