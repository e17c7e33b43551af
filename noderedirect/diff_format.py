"""Print a :class:`noderedirect.diff.Diff` as terminal text, markdown or JSON.

- text: two aligned columns, one row per object, at most ``width`` (160) characters per line;
  longer object text is cut with an ellipsis. Rule differences between two inputs of one design
  are printed as unified-diff hunks per chain.
- markdown: one table per netns pair, ``diff`` code blocks for rule hunks, and the mapping table.
- JSON: every key is always present (see :func:`to_json`), so scripts can rely on the shape.

Pure: strings in, strings out.
"""

from __future__ import annotations

import textwrap
from itertools import zip_longest
from typing import Any, Iterable

from .diff import Diff, KindDiff, Located, MappedRow, NetnsDiff
from .inventory import KINDS, LABELS

WIDTH = 160
KIND_W = 22
SEP = " │ "


def clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


def _singular(label: str) -> str:
    return label[:-3] + "y" if label.endswith("ies") else label.removesuffix("s")


def count_phrase(n: int, kind: str) -> str:
    label = LABELS[kind]
    return f"{n} {label if n != 1 else _singular(label)}"


def objects_phrase(located: Iterable[Located]) -> str:
    """``node: 1 ipset, 2 ipset entries; pod: 3 iptables rules`` (netns in first-seen order)."""
    per: dict[str, dict[str, int]] = {}
    for lo in located:
        where = lo.netns.split(":", 1)[0]
        per.setdefault(where, {}).setdefault(lo.item.kind, 0)
        per[where][lo.item.kind] += 1
    parts = []
    for where, kinds in per.items():
        parts.append(f"{where}: " + ", ".join(count_phrase(kinds[k], k) for k in KINDS if k in kinds))
    return "; ".join(parts) if parts else "none with these values"


def _netns_title(d: NetnsDiff) -> str:
    def one(role, note):
        return f"{role} netns" if role else f"(none: {note})"

    left, right = one(d.left_role, d.left_note), one(d.right_role, d.right_note)
    return left if d.left_role == d.right_role else f"{left}  ↔  {right}"


def _label(k: KindDiff) -> str:
    return f"{LABELS[k.kind]} ({len(k.left)}|{len(k.right)})"


# ---------------------------------------------------------------- text


class _Text:
    def __init__(self, width: int):
        self.width = width
        self.col = (width - KIND_W - len(SEP)) // 2
        self.lines: list[str] = []

    def add(self, line: str = "") -> None:
        self.lines.append(clip(line, self.width).rstrip())

    def row(self, kind: str, left: str, right: str) -> None:
        self.add(f"{clip(kind, KIND_W - 1):<{KIND_W}}{clip(left, self.col):<{self.col}}{SEP}"
                 f"{clip(right, self.col)}")

    def columns(self, kind: str, left: list[str], right: list[str]) -> None:
        for i, (a, b) in enumerate(zip_longest(left, right, fillvalue="")):
            self.row(kind if i == 0 else "", a, b)


def _text_netns(t: _Text, diff: Diff, d: NetnsDiff) -> None:
    if d.same:
        total = sum(len(k.left) for k in d.kinds)
        t.add(f"== {_netns_title(d)}: identical ({total} objects) ==")
        return
    if d.same_as:
        t.add(f"== {_netns_title(d)}: the same differences as {d.same_as} ==")
        return
    t.add(f"== {_netns_title(d)} ==")
    for note in d.notes:
        t.add(f"  · {note}")
    suffix = "" if diff.cross_mode else " (only here)"
    t.row("kind", diff.left.name + suffix, diff.right.name + suffix)
    same, empty = [], []
    for k in d.kinds:
        if not k.left and not k.right:
            empty.append(LABELS[k.kind])
            continue
        if k.same and not diff.cross_mode:
            same.append(f"{LABELS[k.kind]} ({len(k.left)})")
            continue
        if k.hunks:
            t.add(_label(k))
            for h in k.hunks:
                t.add(" " * KIND_W + h.chain)
                for ln in h.lines:
                    # "- -A CHAIN …" reads better than "--A CHAIN …"
                    t.add(" " * (KIND_W + 2) + (ln if ln.startswith("@@") else f"{ln[0]} {ln[1:]}"))
            continue
        # objects on both sides first, on one row each ("="), then each side's own
        same_rows = [f"= {it.text}" for it in k.common_items] if diff.cross_mode else []
        left = same_rows + ([it.text for it in k.only_left] or (["(none)"] if not k.left else []))
        right = same_rows + ([it.text for it in k.only_right] or (["(none)"] if not k.right else []))
        t.columns(_label(k), left, right)
    if same:
        t.add("identical: " + ", ".join(same))
    if empty:
        t.add("none on either side: " + ", ".join(empty))


def _wrap(text: str, width: int) -> list[str]:
    return textwrap.wrap(text, width) or [""]


def _text_mapping(t: _Text, diff: Diff) -> None:
    m = diff.mapping
    assert m is not None
    half = (t.width - len(SEP)) // 2
    t.add("== where each legacy piece went in in-pod mode ==")
    t.add(f"{'legacy piece':<{half}}{SEP}in in-pod mode")

    def block(title: str, left: str, right: str, lobj: str, robj: str) -> None:
        t.add(f"[{title}]")
        lw, rw = _wrap(left, half), _wrap(right, half)
        lw.append(f"  objects: {lobj}")
        rw.append(f"  objects: {robj}")
        for a, b in zip_longest(lw, rw, fillvalue=""):
            t.add(f"{clip(a, half):<{half}}{SEP}{clip(b, half)}")

    for r in m.rows:
        block(r.row.topic, r.row.legacy_text, r.row.inpod_text, objects_phrase(r.legacy),
              objects_phrase(r.inpod) if r.row.inpod else "no counterpart")
    for r in m.new_in_inpod:
        block(f"new in in-pod: {r.row.topic}", "(no counterpart in legacy)", r.row.inpod_text, "none",
              objects_phrase(r.inpod) if r.row.inpod else "not kernel objects")
    if not m.unmapped_legacy and not m.unmapped_inpod:
        t.add("every rendered object of both designs is covered by a row above")
    for what, located in (("legacy", m.unmapped_legacy), ("in-pod", m.unmapped_inpod)):
        for lo in located:
            t.add(f"not in the mapping ({what}, {lo.netns}): {lo.item.text}")


def _header(diff: Diff) -> list[str]:
    l, r = diff.left, diff.right
    if l.source == r.source:
        return [f"noderedirect diff: {l.name}  ↔  {r.name}", f"values: {l.source}"]
    return [f"noderedirect diff: {l.name}  ↔  {r.name}", f"{l.name}: {l.source}", f"{r.name}: {r.source}"]


def to_text(diff: Diff, width: int = WIDTH) -> str:
    t = _Text(width)
    for line in _header(diff):
        t.add(line)
    if diff.same:
        t.add("no differences")
    for d in diff.netns:
        t.add()
        _text_netns(t, diff, d)
    if diff.mapping is not None:
        t.add()
        _text_mapping(t, diff)
    return "\n".join(t.lines) + "\n"


# ---------------------------------------------------------------- markdown


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def _code_cell(texts: list[str]) -> str:
    return "<br>".join(f"`{_md(x)}`" for x in texts) if texts else "—"


def _md_netns(out: list[str], diff: Diff, d: NetnsDiff) -> None:
    out.append(f"## {_netns_title(d)}")
    out.append("")
    if d.same:
        out.append(f"Identical ({sum(len(k.left) for k in d.kinds)} objects).")
        out.append("")
        return
    if d.same_as:
        out += [f"The same differences as `{d.same_as}`.", ""]
        return
    out += [f"- {_md(n)}" for n in d.notes]
    if d.notes:
        out.append("")
    suffix = "" if diff.cross_mode else " only"
    out.append(f"| kind | {_md(diff.left.name)}{suffix} | {_md(diff.right.name)}{suffix} |")
    out.append("|---|---|---|")
    same, empty, hunks = [], [], []
    for k in d.kinds:
        if not k.left and not k.right:
            empty.append(LABELS[k.kind])
        elif k.same and not diff.cross_mode:
            same.append(f"{LABELS[k.kind]} ({len(k.left)})")
        elif k.hunks:
            hunks += k.hunks
            out.append(f"| {_md(_label(k))} | see the rule diff below | |")
        else:
            same_rows = [f"= {it.text}" for it in k.common_items] if diff.cross_mode else []
            left = _code_cell(same_rows + [it.text for it in k.only_left]) if k.left else "(none)"
            right = _code_cell(same_rows + [it.text for it in k.only_right]) if k.right else "(none)"
            out.append(f"| {_md(_label(k))} | {left} | {right} |")
    out.append("")
    if same:
        out.append("Identical: " + ", ".join(same) + ".")
    if empty:
        out.append("None on either side: " + ", ".join(empty) + ".")
    if same or empty:
        out.append("")
    for h in hunks:
        out += [f"Rules of `{h.chain}`:", "", "```diff", *h.lines, "```", ""]


def _md_mapping(out: list[str], diff: Diff) -> None:
    m = diff.mapping
    assert m is not None
    out += ["## Where each legacy piece went in in-pod mode", "",
            "| Legacy piece | Legacy objects | In in-pod mode | In-pod objects |", "|---|---|---|---|"]

    def row(r: MappedRow, topic: str, legacy_text: str, nothing: str = "no counterpart") -> str:
        inp = objects_phrase(r.inpod) if r.row.inpod else nothing
        return (f"| **{_md(topic)}**: {_md(legacy_text)} | {_md(objects_phrase(r.legacy))} | "
                f"{_md(r.row.inpod_text)} | {_md(inp)} |")

    out += [row(r, r.row.topic, r.row.legacy_text) for r in m.rows]
    out += [row(r, f"new in in-pod: {r.row.topic}", "no counterpart in legacy", "not kernel objects")
            for r in m.new_in_inpod]
    out.append("")
    if not m.unmapped_legacy and not m.unmapped_inpod:
        out.append("Every rendered object of both designs is covered by a row above.")
    for what, located in (("legacy", m.unmapped_legacy), ("in-pod", m.unmapped_inpod)):
        out += [f"- not in the mapping ({what}, {lo.netns}): `{_md(lo.item.text)}`" for lo in located]
    out.append("")


def to_markdown(diff: Diff) -> str:
    head = _header(diff)
    out = [f"# {head[0].removeprefix('noderedirect diff: ')}", ""]
    out += [f"- {_md(line)}" for line in head[1:]]
    out.append("")
    if diff.same:
        out += ["No differences.", ""]
    for d in diff.netns:
        _md_netns(out, diff, d)
    if diff.mapping is not None:
        _md_mapping(out, diff)
    return "\n".join(out).rstrip("\n") + "\n"


# ---------------------------------------------------------------- JSON


def _loc_json(located: Iterable[Located]) -> list[dict[str, str]]:
    return [{"netns": lo.netns, "kind": lo.item.kind, "text": lo.item.text} for lo in located]


def to_json(diff: Diff) -> dict[str, Any]:
    """Keys, always all present::

        left, right: {name, mode, version, values}
        cross_mode: bool          identical: bool
        netns: [{left, right (role or null), left_note, right_note, notes, identical, same_as,
                 kinds: {KIND: {left, right, common (counts), only_left, only_right (texts),
                                hunks: [{chain, lines}]}}}]
        mapping: [{topic, legacy, inpod, new_in_inpod, legacy_objects, inpod_objects}]
        unmapped: {legacy: [...], inpod: [...]}   (objects: {netns, kind, text})

    KIND is each of noderedirect.inventory.KINDS; mapping and unmapped are empty lists when
    both sides are the same design."""
    def side(s):
        return {"name": s.name, "mode": s.mode, "version": s.version, "values": s.source}

    def kind(k: KindDiff):
        return {"left": len(k.left), "right": len(k.right), "common": k.common,
                "only_left": [it.text for it in k.only_left],
                "only_right": [it.text for it in k.only_right],
                "hunks": [{"chain": h.chain, "lines": list(h.lines)} for h in k.hunks]}

    def netns(d: NetnsDiff):
        return {"left": d.left_role, "right": d.right_role, "left_note": d.left_note,
                "right_note": d.right_note, "notes": list(d.notes), "identical": d.same,
                "same_as": d.same_as,
                "kinds": {k.kind: kind(k) for k in d.kinds}}

    def mrow(r: MappedRow, new: bool):
        return {"topic": r.row.topic, "legacy": r.row.legacy_text, "inpod": r.row.inpod_text,
                "new_in_inpod": new, "legacy_objects": _loc_json(r.legacy),
                "inpod_objects": _loc_json(r.inpod)}

    m = diff.mapping
    return {
        "left": side(diff.left), "right": side(diff.right),
        "cross_mode": diff.cross_mode, "identical": diff.same,
        "netns": [netns(d) for d in diff.netns],
        "mapping": ([mrow(r, False) for r in m.rows] + [mrow(r, True) for r in m.new_in_inpod]) if m else [],
        "unmapped": {"legacy": _loc_json(m.unmapped_legacy) if m else [],
                     "inpod": _loc_json(m.unmapped_inpod) if m else []},
    }
