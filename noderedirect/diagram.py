"""Pictures of a packet walk, drawn from a :class:`noderedirect.trace.Trace` — never by hand.

Owns three outputs:

- **SVG** (written directly, no dependency): one column per network namespace the walk touches
  (pods, node, ztunnel pod, external host, node 2 …), each headed by what matters in it — the
  ipset and its members, the ip rules with their marks, tables 100-102, the tunnel ends
  ``istioin/istioout`` ↔ ``pistioin/pistioout`` with their VNIs, ztunnel's listeners; in in-pod
  mode the pod's own rules, rule 32764 and table 100. Below, the numbered path, one row per
  hop: a box in the netns where it happens (rule id and its mark change, routing decision with
  rule → table → device, TPROXY/socket, drop), arrows between columns for veth and segment
  crossings, a dashed purple arrow for the GENEVE outer packet. A band separates packets
  (first / reply / next of each connection). :func:`svg_side_by_side` puts two walks (legacy
  and in-pod) next to each other.
- **Mermaid** ``flowchart`` for markdown: one subgraph per netns, one node per hop, the
  crossings as labelled edges.
- **PNG**: the SVG rendered by librsvg + cairo through ``ctypes`` (:func:`render_png`), the one
  function here that leaves Python; it raises :class:`DiagramError` when those libraries are not
  installed (Debian: ``librsvg2-2``, ``libcairo2``, fonts ``fonts-dejavu-core``).

Layout is fixed-pitch: text is set in DejaVu Sans Mono, whose advance width (0.6 em) makes
widths computable without font metrics, so nothing overlaps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import ipaddress
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional
from xml.sax.saxutils import escape

from . import names
from .topology_model import TABLE_NAMES, NetnsModel, Topology
from .trace import Hop, Trace

log = logging.getLogger(__name__)


class DiagramError(Exception):
    """A picture cannot be produced (unknown output type, missing renderer library …)."""


# ---------------------------------------------------------------- geometry and style

FONT = "DejaVu Sans Mono, Menlo, Consolas, monospace"
FS = 12                     # body font size (px)
FS_SMALL = 11
CHAR = 0.6                  # DejaVu Sans Mono advance width, in em
LANE_W = 330
LANE_GAP = 26
MARGIN = 20
HOP_H = 40                  # a box with two lines
CROSS_H = 30                # an arrow row
BAND_H = 30
BOX_PAD = 6
NUM_R = 10

STYLE = {   # stage kind -> (fill, stroke)
    "rule": ("#fff4c2", "#c9a227"),
    "mark": ("#ffe0b3", "#d9822b"),
    "routing": ("#dcebfb", "#4a7fb5"),
    "socket": ("#d8f0d8", "#3d8b3d"),
    "tunnel": ("#eadcf8", "#7b4bb3"),
    "drop": ("#f8d0d0", "#b33c3c"),
    "conntrack": ("#ececec", "#8a8a8a"),
}
PATH_COLOR = "#333333"
TUNNEL_COLOR = "#7b4bb3"
LANE_FILL = {"node": "#f4f7fb", "ztunnel": "#f7f2fc", "pod": "#f5fbf5", "external": "#fbf8f2"}


def text_width(s: str, size: int = FS) -> float:
    return len(s) * size * CHAR


def fit(s: str, width: float, size: int = FS) -> str:
    """Cut ``s`` to fit ``width`` pixels at ``size``, marking the cut with an ellipsis."""
    n = int(width // (size * CHAR))
    return s if len(s) <= n else s[: max(n - 1, 1)] + "…"


def wrap(s: str, width: float, size: int = FS, max_lines: int = 4) -> list[str]:
    """Break ``s`` into lines that fit ``width`` pixels, preferring ", " and " " as breaks."""
    n = max(int(width // (size * CHAR)), 8)
    lines: list[str] = []
    rest = s
    while rest and len(lines) < max_lines:
        if len(rest) <= n:
            lines.append(rest)
            rest = ""
            break
        cut = rest.rfind(", ", 0, n)
        cut = cut + 1 if cut > n // 3 else rest.rfind(" ", 0, n)
        if cut <= n // 3:
            cut = n
        lines.append(rest[:cut].rstrip())
        rest = "  " + rest[cut:].lstrip()
    if rest.strip():
        lines[-1] = fit(lines[-1] + "…", width, size)
    return lines


def _kind(h: Hop) -> str:
    if h.stage == "drop":
        return "drop"
    if h.rule:
        return "mark" if h.mark_before != h.mark_after or (h.verdict or "").startswith("CONNMARK") else "rule"
    if h.stage == "routing":
        return "routing"
    if h.stage == "socket":
        return "socket"
    if h.stage in ("tunnel", "decap"):
        return "tunnel"
    return "conntrack"


def _is_crossing(h: Hop) -> bool:
    return h.stage in ("veth", "segment", "lo")


# ---------------------------------------------------------------- what each column says


def lane_title(ns: NetnsModel) -> tuple[str, str]:
    """(title, subtitle) of a netns column."""
    if ns.kind == "node":
        return ns.name, "node network namespace"
    if ns.kind == "ztunnel":
        return ns.name, f"ztunnel pod {ns.ip}"
    if ns.kind == "pod":
        return ns.name, f"pod {ns.ip} " + ("(ambient)" if ns.mesh else "(not in the mesh)")
    return ns.name, f"off-node host {ns.ip}"


def _mark_rule(r) -> str:
    if r.fwmark is None:
        sel = "all"
    else:
        sel = names.hexmark(r.fwmark) + (f"/{names.hexmark(r.fwmask)}" if r.fwmask not in (None, names.MARK_WHOLE) else "")
    act = f"goto {r.goto}" if r.action == "goto" else f"→ table {TABLE_NAMES.get(r.table, r.table)}"
    return f"{r.priority}: {sel} {act}"


def lane_details(ns: NetnsModel, mode: str) -> list[str]:
    """The few facts of a netns the walk depends on, as short lines."""
    out: list[str] = []
    addrs = [f"{i.name} {a}" for i in ns.ifaces if i.kind in ("veth", "segment") for a in i.addrs]
    if ns.kind == "node":
        uniq: list[str] = []
        for a in addrs:
            dev, addr = a.split(" ", 1)
            if dev.startswith("veth") and addr.endswith("/32"):
                if f"veths {addr}" not in uniq:
                    uniq.append(f"veths {addr}")
            else:
                uniq.append(a)
        out += uniq
    else:
        out += addrs[:2]
    for i in ns.ifaces:
        if i.kind == "tunnel":
            out.append(f"{i.name} {i.addrs[0].split('/')[0]} VNI {i.link.vni} → {i.link.remote}")
    for set_name in ns.ipsets:
        members = [ip for s, ip in ns.ipset_members if s == set_name]
        out.append(f"ipset {set_name}:")
        out.append("  " + (" ".join(members) if members else "(empty)"))
    for r in sorted(ns.ip_rules):
        if r.family == 4:
            out.append("rule " + _mark_rule(r))
    tables = sorted({r.table for r in ns.routes if r.table not in TABLE_NAMES})
    for t in tables:
        routes = [r for r in ns.routes if r.table == t]
        shown = []
        for r in routes:
            dst = "default" if r.dst == "0.0.0.0/0" else str(ipaddress.ip_network(r.dst).network_address) \
                if r.dst.endswith("/32") else r.dst
            tail = "local" if r.type == "local" else (r.dev or "")
            shown.append(f"{dst}→{tail}")
        out.append(f"table {t}: " + ", ".join(shown))
    zt = [lst for lst in ns.listeners if lst.owner == "ztunnel"]
    if zt:
        where = "in this pod's netns" if ns.kind == "pod" else "transparent"
        out.append("ztunnel :" + " :".join(str(lst.port) for lst in zt) + f" ({where})")
    if ns.kind == "pod" and mode == "inpod" and ns.mesh:
        out.append(f"ztunnel socket mark {names.hexmark(names.INPOD_MARK)}")
    return out


def legend(mode: str) -> list[str]:
    if mode == "legacy":
        return ["node marks: 0x100 outbound (P15 → rule 101 → table 101 → istioout)   "
                "0x200 skip (rule 100 → main)",
                "0x210 ztunnel spoofed source (P10, saved as ctmark)   0x220 conn-skip   "
                "0x40 reply to ztunnel (P8 → rule 102 → table 102)",
                "ztunnel marks: 0x400 TPROXY (rule 20000 → local)   0x4d3 later packets (Z4 → rule 20003 → local)"]
    return ["pod marks: 0x539 ztunnel's own sockets (never redirected)   "
            "0x111 connmark of ztunnel-originated connections",
            "replies restored to 0x111 (mangle OUTPUT) → rule 32764 → table 100 → local (back to ztunnel)"]


# ---------------------------------------------------------------- SVG


@dataclass
class _Svg:
    parts: list[str]

    def add(self, s: str) -> None:
        self.parts.append(s)

    def text(self, x: float, y: float, s: str, size: int = FS, weight: str = "normal",
             fill: str = "#111", anchor: str = "start") -> None:
        self.add(f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" font-weight="{weight}" '
                 f'fill="{fill}" text-anchor="{anchor}">{escape(s)}</text>')

    def rect(self, x, y, w, h, fill, stroke, rx=5, dash: str = "", width: float = 1.2) -> None:
        d = f' stroke-dasharray="{dash}"' if dash else ""
        self.add(f'<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h:.1f}" rx="{rx}" '
                 f'fill="{fill}" stroke="{stroke}" stroke-width="{width}"{d}/>')

    def line(self, x1, y1, x2, y2, stroke, width=1.5, dash="", arrow: Optional[str] = None) -> None:
        d = f' stroke-dasharray="{dash}"' if dash else ""
        a = f' marker-end="url(#{arrow})"' if arrow else ""
        self.add(f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="{stroke}" '
                 f'stroke-width="{width}"{d}{a}/>')

    def number(self, x: float, y: float, n: int, stroke: str) -> None:
        self.add(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{NUM_R}" fill="#ffffff" stroke="{stroke}" stroke-width="1.5"/>')
        size = FS_SMALL if n < 100 else 9
        self.text(x, y + 4, str(n), size=size, weight="bold", anchor="middle")


def _defs() -> str:
    return ('<defs>'
            f'<marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="8" markerHeight="8" '
            f'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="{PATH_COLOR}"/></marker>'
            f'<marker id="tarrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="8" markerHeight="8" '
            f'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="{TUNNEL_COLOR}"/></marker>'
            '</defs>')


def lanes_of(trace: Trace) -> list[str]:
    """The columns, left to right: the client, then each node followed by its ztunnel pod, then
    every other netns the walk touches in order of first appearance (so the server ends up on
    the right and the picture does not change with the packets selected)."""
    seen: list[str] = []
    for h in trace.hops():
        for ns in (h.netns, h.to_netns, h.tunnel.peer_netns if h.tunnel else None):
            if ns and ns not in seen:
                seen.append(ns)
    order: list[str] = []
    if trace.legs and trace.legs[0].netns in seen:
        order.append(trace.legs[0].netns)
    topo = trace.topology
    if topo is not None:
        for node in topo.nodes:
            zt = topo.ztunnel_of(node)
            for ns in (node, zt.name if zt else None):
                if ns in seen and ns not in order:
                    order.append(ns)
    order += [ns for ns in seen if ns not in order]
    return order


def _secondary(h: Hop) -> str:
    """The grey second line of a hop box."""
    if h.rule:
        table = h.stage.split()[0]
        chain = h.chain if h.chain and not names.is_owned_chain(h.chain) else ""
        return f"{table}{' ' + chain if chain else ''}: {h.match}"
    if h.route is not None:
        r = h.route
        misses = "".join(t.split(":")[0] + " miss, " for t in r.tried if "no route" in t)
        return misses + r.route
    if h.socket is not None:
        s = h.socket
        return f"{s.local} ← {s.remote}"
    if h.tunnel is not None and h.stage == "tunnel":
        t = h.tunnel
        return f"outer {t.outer_src} → {t.outer_dst}:{t.port}"
    if h.tunnel is not None and h.stage == "decap":
        return f"outer source {h.tunnel.outer_src} = remote"
    if h.stage == "conntrack":
        return "known connection" + (" (reply direction)" if h.note.startswith("reply") else "")
    if h.stage == "NAT":
        return ""
    return h.note if h.stage != "drop" else ""


def _primary(h: Hop) -> str:
    if h.stage in ("drop", "NAT"):
        return h.note
    if h.rule:
        return h.short()
    if h.route is not None:
        r = h.route
        goto = next((t.split(":")[0] for t in r.tried if "goto" in t), None)
        lead = f"rule {goto} goto {r.priority}" if goto else f"rule {r.priority}"
        end = "local" if r.type == "local" else f"dev {r.dev}"
        tail = f" ({h.note.split(':')[0]})" if h.note.startswith("re-route") else ""
        return f"{lead} → table {r.table} → {end}{tail}"
    return h.short()


def svg_panel(trace: Trace, x0: float, y0: float, title: Optional[str] = None) -> tuple[list[str], float, float]:
    """One walk drawn at (x0, y0); returns (svg parts, width, height)."""
    topo: Optional[Topology] = trace.topology
    lanes = lanes_of(trace)
    col = {ns: x0 + i * (LANE_W + LANE_GAP) for i, ns in enumerate(lanes)}
    width = len(lanes) * LANE_W + (len(lanes) - 1) * LANE_GAP
    g = _Svg([])
    y = y0
    heading = title or (f"scenario {trace.scenario}" if trace.scenario else trace.request)
    g.text(x0, y + 18, f"{heading} — {trace.mode} mode, Istio {trace.version}", size=16, weight="bold")
    y += 26
    g.text(x0, y + 14, fit(trace.request, width, FS), size=FS, fill="#333")
    y += 18
    g.text(x0, y + 14, fit("verdict: " + trace.verdict(), width, FS), size=FS, fill="#333")
    y += 22
    for line in (w for entry in legend(trace.mode) for w in wrap(entry, width, FS_SMALL)):
        g.text(x0, y + 12, line, size=FS_SMALL, fill="#555")
        y += 15
    y += 10

    # column headers
    details = {}
    for ns in lanes:
        model = topo.get(ns) if topo else None
        details[ns] = lane_details(model, trace.mode) if model else []
    for ns in lanes:
        details[ns] = [w for line in details[ns] for w in wrap(line, LANE_W - 20, FS_SMALL, 6)]
    header_h = 44 + 15 * max((len(d) for d in details.values()), default=0) + 8
    for ns in lanes:
        model = topo.get(ns) if topo else None
        kind = model.kind if model else "pod"
        t, sub = lane_title(model) if model else (ns, "")
        x = col[ns]
        g.rect(x, y, LANE_W, header_h, LANE_FILL.get(kind, "#f8f8f8"), "#666", rx=8, width=1.5)
        g.text(x + 10, y + 20, fit(t, LANE_W - 20, 15), size=15, weight="bold")
        g.text(x + 10, y + 37, fit(sub, LANE_W - 20, FS), size=FS, fill="#333")
        for i, line in enumerate(details[ns]):
            g.text(x + 10, y + 56 + 15 * i, fit(line, LANE_W - 20, FS_SMALL), size=FS_SMALL, fill="#333")
    y += header_h + 8
    top_of_rows = y

    # rows
    prev_anchor: Optional[tuple[str, float]] = None
    for p in trace.packets():
        g.rect(x0 - 6, y + 3, width + 12, BAND_H - 6, "#f0f0f0", "#f0f0f0", rx=4)
        flags = f" ({p.flags})" if p.flags else ""
        g.text(x0 + 4, y + 20, fit(f"leg {p.leg} · {p.kind} packet{flags} · {p.tuple} → {p.outcome}",
                                   width, FS), size=FS, weight="bold", fill="#222")
        y += BAND_H
        prev_anchor = None
        for h in p.hops:
            cx = col[h.netns]
            if _is_crossing(h):
                outer = h.note.startswith("outer")
                color = TUNNEL_COLOR if outer else PATH_COLOR
                ty = y + CROSS_H / 2 + 4
                if h.stage == "lo":
                    label = f"{h.n}  loopback (lo)"
                    g.line(cx + 24, y + 4, cx + 24, y + CROSS_H - 2, color, width=1.5, dash="3,3", arrow="arrow")
                    g.number(cx + 12, y + CROSS_H / 2, h.n, color)
                    g.text(cx + 34, ty, label[len(str(h.n)) + 2:], size=FS_SMALL, fill=color)
                else:
                    tx = col[h.to_netns]
                    x1 = cx + LANE_W / 2
                    x2 = tx + LANE_W / 2
                    g.line(x1, ty, x2 + (-8 if x2 > x1 else 8), ty, color, width=2 if outer else 1.6,
                           dash="6,4" if outer else "", arrow="tarrow" if outer else "arrow")
                    left = min(x1, x2)
                    lab = f"{h.device} → {h.to_device}" + (" outer UDP" if outer else "")
                    if h.mark_before:
                        lab += f" (mark {h.mark_before:#x} → 0)"
                    g.number(left + 14, ty - 9, h.n, color)
                    g.text(left + 28, ty - 5, fit(lab, abs(x2 - x1) - 34, FS_SMALL), size=FS_SMALL, fill=color)
                prev_anchor = (h.to_netns or h.netns, y + CROSS_H)
                y += CROSS_H
                continue
            kind = _kind(h)
            fill, stroke = STYLE[kind]
            tx = cx + 4 + 2 * NUM_R + 10
            avail = LANE_W - 8 - (2 * NUM_R + 10) - 6
            first = wrap(_primary(h), avail, FS, 3)
            second = wrap(_secondary(h), avail, FS_SMALL, 3) if _secondary(h) else []
            box_h = max(HOP_H, 12 + 15 * len(first) + 14 * len(second))
            if prev_anchor is not None and prev_anchor[0] == h.netns:
                g.line(cx + LANE_W / 2, prev_anchor[1], cx + LANE_W / 2, y + 3, PATH_COLOR, width=1.2)
            g.rect(cx + 4, y + 3, LANE_W - 8, box_h - 6, fill, stroke, rx=6, width=1.5 if kind == "mark" else 1.1)
            g.number(cx + 4 + NUM_R + 4, y + box_h / 2, h.n, stroke)
            ty = y + 17
            for line in first:
                g.text(tx, ty, line, size=FS, weight="bold")
                ty += 15
            for line in second:
                g.text(tx, ty - 1, line, size=FS_SMALL, fill="#444")
                ty += 14
            prev_anchor = (h.netns, y + box_h - 3)
            y += box_h
        y += 6
    # lifelines behind everything
    lifelines = [f'<line x1="{col[ns] + LANE_W / 2:.1f}" y1="{top_of_rows:.1f}" x2="{col[ns] + LANE_W / 2:.1f}" '
                 f'y2="{y:.1f}" stroke="#cfcfcf" stroke-width="1" stroke-dasharray="2,4"/>' for ns in lanes]
    return lifelines + g.parts, width, y - y0


def _document(parts: list[str], width: float, height: float) -> str:
    w, h = int(width + 2 * MARGIN), int(height + 2 * MARGIN)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
            f'font-family="{FONT}" xml:space="preserve" style="white-space: pre">\n{_defs()}\n<rect x="0" y="0" width="{w}" height="{h}" fill="#ffffff"/>\n'
            + "\n".join(parts) + "\n</svg>\n")


def svg(trace: Trace, title: Optional[str] = None) -> str:
    """The walk as one SVG document."""
    parts, w, h = svg_panel(trace, MARGIN, MARGIN, title)
    return _document(parts, w, h)


def svg_side_by_side(panels: Iterable[tuple[str, Trace]]) -> str:
    """Several walks next to each other (legacy | in-pod), each with its title."""
    parts: list[str] = []
    x = MARGIN
    height = 0.0
    for title, t in panels:
        p, w, h = svg_panel(t, x, MARGIN, title)
        parts += p
        x += w + 3 * LANE_GAP
        height = max(height, h)
        parts.append(f'<line x1="{x - 1.5 * LANE_GAP:.1f}" y1="{MARGIN}" x2="{x - 1.5 * LANE_GAP:.1f}" '
                     f'y2="{MARGIN + h:.1f}" stroke="#999" stroke-width="1"/>')
    parts.pop()   # no separator after the last panel
    return _document(parts, x - 3 * LANE_GAP - MARGIN, height)


# ---------------------------------------------------------------- Mermaid


def _mtext(s: str) -> str:
    """Text for inside a Mermaid label: quotes and angle brackets as Mermaid entities."""
    return s.replace('"', "#quot;").replace("<", "#lt;").replace(">", "#gt;")


def _mq(*lines: str) -> str:
    """A quoted Mermaid label; several lines are joined with <br/>."""
    return '"' + "<br/>".join(_mtext(x) for x in lines) + '"'


def _mid(ns: str) -> str:
    return "ns_" + "".join(c if c.isalnum() else "_" for c in ns)


def mermaid(trace: Trace, title: Optional[str] = None) -> str:
    """A Mermaid ``flowchart`` of the walk: subgraphs per netns, numbered hop nodes, crossings
    as labelled edges (GENEVE outer packets dotted)."""
    topo = trace.topology
    lanes = lanes_of(trace)
    lines = ["flowchart TB"]
    heading = title or (f"scenario {trace.scenario}" if trace.scenario else trace.request)
    lines.append(f"  %% {heading} — {trace.mode} mode, Istio {trace.version}")
    members: dict[str, list[str]] = {ns: [] for ns in lanes}
    edges: list[str] = []
    prev: Optional[str] = None
    pending: list[str] = []     # labels of crossings since the previous box
    pending_dotted = False
    for p in trace.packets():
        prev = None
        pending, pending_dotted = [], False
        for h in p.hops:
            if _is_crossing(h):
                lab = f"{h.n} · {h.device} → {h.to_device}"
                if h.note.startswith("outer"):
                    lab += " (GENEVE outer)"
                    pending_dotted = True
                pending.append(lab)
                continue
            node = f"h{h.n}"
            sec = _secondary(h)
            label = _mq(f"{h.n} · {_primary(h)}", *([sec] if sec else []))
            shape = (f"{node}([{label}])" if h.stage == "socket"
                     else f"{node}{{{{{label}}}}}" if h.stage in ("tunnel", "decap")
                     else f"{node}[{label}]")
            members[h.netns].append(shape)
            if prev is not None:
                arrow = "-.->" if pending_dotted else "-->"
                if pending:
                    edges.append(f"  {prev} {arrow}|{_mq(' / '.join(pending))}| {node}")
                else:
                    edges.append(f"  {prev} {arrow} {node}")
            prev = node
            pending, pending_dotted = [], False
    for ns in lanes:
        model = topo.get(ns) if topo else None
        t, sub = lane_title(model) if model else (ns, "")
        lines.append(f"  subgraph {_mid(ns)}[{_mq(f'{t} — {sub}')}]")
        lines.append("    direction TB")
        lines += [f"    {m}" for m in members[ns]]
        lines.append("  end")
    lines += edges
    classes = {"mark": [], "routing": [], "socket": [], "tunnel": [], "drop": []}
    for h in trace.hops():
        k = _kind(h)
        if not _is_crossing(h) and k in classes:
            classes[k].append(f"h{h.n}")
    for k, ids in classes.items():
        fill, stroke = STYLE[k]
        lines.append(f"  classDef {k} fill:{fill},stroke:{stroke}")
        if ids:
            lines.append(f"  class {','.join(ids)} {k}")
    return "\n".join(lines) + "\n"


def markdown(panels: Iterable[tuple[str, Trace]]) -> str:
    """A markdown page with one Mermaid block per walk."""
    out: list[str] = []
    for title, t in panels:
        out.append(f"## {title} — {t.mode} mode (Istio {t.version})\n")
        out.append(f"`{t.request}`\n")
        out.append(f"Verdict: {t.verdict()}\n")
        out.append("```mermaid")
        out.append(mermaid(t, title).rstrip("\n"))
        out.append("```\n")
    return "\n".join(out)


# ---------------------------------------------------------------- PNG (librsvg + cairo via ctypes)


class _GError(ctypes.Structure):
    _fields_ = [("domain", ctypes.c_uint32), ("code", ctypes.c_int), ("message", ctypes.c_char_p)]


class _Rect(ctypes.Structure):
    _fields_ = [("x", ctypes.c_double), ("y", ctypes.c_double), ("width", ctypes.c_double),
                ("height", ctypes.c_double)]


def _load(name: str, soname: str) -> ctypes.CDLL:
    path = ctypes.util.find_library(name) or soname
    try:
        return ctypes.CDLL(path)
    except OSError:
        raise DiagramError(f"PNG output needs {soname} (Debian: librsvg2-2 and libcairo2); "
                           "write .svg or .md instead") from None


def render_png(svg_text: str, path: str, zoom: float = 1.0) -> tuple[int, int]:
    """Render SVG text to a PNG file with librsvg and cairo; returns (width, height) in pixels.

    The only place this package calls native code for pictures: librsvg parses and draws the
    SVG (fonts through fontconfig/pango), cairo writes the PNG.
    """
    rsvg = _load("rsvg-2", "librsvg-2.so.2")
    cairo = _load("cairo", "libcairo.so.2")
    gobject = _load("gobject-2.0", "libgobject-2.0.so.0")
    rsvg.rsvg_handle_new_from_data.restype = ctypes.c_void_p
    rsvg.rsvg_handle_new_from_data.argtypes = [ctypes.c_char_p, ctypes.c_size_t,
                                               ctypes.POINTER(ctypes.POINTER(_GError))]
    rsvg.rsvg_handle_get_intrinsic_size_in_pixels.restype = ctypes.c_int
    rsvg.rsvg_handle_get_intrinsic_size_in_pixels.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_double),
                                                              ctypes.POINTER(ctypes.c_double)]
    rsvg.rsvg_handle_render_document.restype = ctypes.c_int
    rsvg.rsvg_handle_render_document.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(_Rect),
                                                 ctypes.POINTER(ctypes.POINTER(_GError))]
    cairo.cairo_image_surface_create.restype = ctypes.c_void_p
    cairo.cairo_image_surface_create.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    cairo.cairo_create.restype = ctypes.c_void_p
    cairo.cairo_create.argtypes = [ctypes.c_void_p]
    cairo.cairo_scale.argtypes = [ctypes.c_void_p, ctypes.c_double, ctypes.c_double]
    cairo.cairo_surface_write_to_png.restype = ctypes.c_int
    cairo.cairo_surface_write_to_png.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    cairo.cairo_surface_status.restype = ctypes.c_int
    cairo.cairo_surface_status.argtypes = [ctypes.c_void_p]
    cairo.cairo_destroy.argtypes = [ctypes.c_void_p]
    cairo.cairo_surface_destroy.argtypes = [ctypes.c_void_p]
    gobject.g_object_unref.argtypes = [ctypes.c_void_p]

    data = svg_text.encode("utf-8")
    err = ctypes.POINTER(_GError)()
    handle = rsvg.rsvg_handle_new_from_data(data, len(data), ctypes.byref(err))
    if not handle:
        msg = err.contents.message.decode() if err else "unknown error"
        raise DiagramError(f"librsvg cannot read the SVG: {msg}")
    surface = cr = None
    try:
        w, h = ctypes.c_double(), ctypes.c_double()
        if not rsvg.rsvg_handle_get_intrinsic_size_in_pixels(handle, ctypes.byref(w), ctypes.byref(h)):
            raise DiagramError("the SVG has no size in pixels")
        pw, ph = int(w.value * zoom + 0.5), int(h.value * zoom + 0.5)
        if pw > 32000 or ph > 32000:
            raise DiagramError(f"{pw}x{ph} pixels is too large for a PNG; use --packet to draw fewer packets")
        surface = cairo.cairo_image_surface_create(0, pw, ph)   # CAIRO_FORMAT_ARGB32
        cr = cairo.cairo_create(surface)
        cairo.cairo_scale(cr, zoom, zoom)
        viewport = _Rect(0, 0, w.value, h.value)
        if not rsvg.rsvg_handle_render_document(handle, cr, ctypes.byref(viewport), ctypes.byref(err)):
            msg = err.contents.message.decode() if err else "unknown error"
            raise DiagramError(f"librsvg cannot draw the SVG: {msg}")
        status = cairo.cairo_surface_write_to_png(surface, str(path).encode())
        if status != 0:
            raise DiagramError(f"cairo could not write {path} (status {status})")
        return pw, ph
    finally:
        if cr:
            cairo.cairo_destroy(cr)
        if surface:
            cairo.cairo_surface_destroy(surface)
        gobject.g_object_unref(handle)


# ---------------------------------------------------------------- files


def write(path: str, panels: list[tuple[str, Trace]], zoom: float = 1.0) -> str:
    """Write ``panels`` (one walk, or several side by side) to ``path``; the suffix picks the
    format: .svg, .png or .md (Mermaid). Returns the format written."""
    suffix = Path(path).suffix.lower()
    if suffix not in (".svg", ".png", ".md"):
        raise DiagramError(f"{path}: unknown picture type {suffix or '(none)'}; use .svg, .png or .md")
    if suffix == ".md":
        Path(path).write_text(markdown(panels), encoding="utf-8")
        return "md"
    log.debug("diagram path=%s format=%s walks=%d", path, suffix, len(panels))
    doc = svg(panels[0][1], panels[0][0]) if len(panels) == 1 else svg_side_by_side(panels)
    if suffix == ".svg":
        Path(path).write_text(doc, encoding="utf-8")
        return "svg"
    render_png(doc, path, zoom)
    return "png"
