"""Pictures drawn from the trace: SVG content and layout, Mermaid, PNG rendering, the CLI, and
the committed pictures under docs/img/ being exactly what the command draws today."""

from __future__ import annotations

import re
import struct
import subprocess
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path

import pytest

from helpers import ROOT
from noderedirect import diagram
from noderedirect.topology_model import lab_values
from noderedirect.trace import trace_scenario

SVG_NS = "{http://www.w3.org/2000/svg}"


@pytest.fixture(scope="module")
def s1_first():
    return trace_scenario(lab_values(), "legacy", "sleep-httpbin").select(["first"])


@pytest.fixture(scope="module")
def s1_first_inpod():
    return trace_scenario(lab_values(), "inpod", "sleep-httpbin").select(["first"])


def texts(svg_text: str) -> list[tuple[float, float, str, int]]:
    root = ET.fromstring(svg_text)
    return [(float(t.get("x")), float(t.get("y")), t.text or "", int(t.get("font-size")))
            for t in root.iter(f"{SVG_NS}text")]


def rects(svg_text: str) -> list[tuple[float, float, float, float, str]]:
    root = ET.fromstring(svg_text)
    return [(float(r.get("x")), float(r.get("y")), float(r.get("width")), float(r.get("height")), r.get("fill"))
            for r in root.iter(f"{SVG_NS}rect")]


def test_svg_shows_what_the_blog_shows(s1_first):
    doc = diagram.svg(s1_first)
    words = " | ".join(t[2] for t in texts(doc))
    for needed in ("sleep", "node", "ztunnel", "httpbin",                 # the netns columns
                   "ztunnel pod 10.244.1.2", "pod 10.244.1.5 (ambient)",
                   "istioout 192.168.127.1 VNI 1001 → 10.244.1.2",        # tunnel ends, VNIs
                   "pistioout 192.168.127.2 VNI 1001 → 10.244.1.1",
                   "ipset ztunnel-pods-ips:",                              # the ipset and its check
                   "mangle: tcp, src ∈ ztunnel-pods-ips",
                   "P15 mark 0x0→0x100",                                   # marks
                   "rule 101: 0x100/0x100 → table 101",                    # rules and tables
                   "rule 101 → table 101 → dev istioout",
                   "istioout VNI 1001", "outer 10.244.1.1 → 10.244.1.2:6081",
                   "decap → pistioout",
                   "Z2 TPROXY :15001, mark 0x400",
                   "rule 20000 → table 100 → local",
                   "veth-zt → eth0 outer UDP (mark 0x100 → 0)",
                   "0x100 outbound"):
        assert needed in words, needed
    # every hop has its number in a circle, 1..N in order
    root = ET.fromstring(doc)
    circles = list(root.iter(f"{SVG_NS}circle"))
    assert len(circles) == len(s1_first.hops())
    numbers = [t[2] for t in texts(doc) if t[2].isdigit() and t[3] <= diagram.FS_SMALL]
    assert numbers == [str(h.n) for h in s1_first.hops()]
    # the GENEVE outer packet is the one dashed purple arrow
    dashed = [l for l in root.iter(f"{SVG_NS}line") if l.get("stroke") == diagram.TUNNEL_COLOR]
    assert len(dashed) == 1 and dashed[0].get("stroke-dasharray")


def test_columns_read_left_to_right_client_node_ztunnel_server(s1_first):
    titles = {t[2]: t[0] for t in texts(diagram.svg(s1_first)) if t[3] == 15}
    assert titles["sleep"] < titles["node"] < titles["ztunnel"] < titles["httpbin"]
    # the same order whatever packets are drawn
    t = trace_scenario(lab_values(), "legacy", "sleep-httpbin").select(["reply"])
    titles = {x[2]: x[0] for x in texts(diagram.svg(t)) if x[3] == 15}
    assert titles["sleep"] < titles["node"] < titles["ztunnel"] < titles["httpbin"]


def test_every_text_fits_its_box(s1_first):
    """Monospace layout: no label runs over the edge of the box it starts in."""
    doc = diagram.svg(trace_scenario(lab_values(), "legacy", "sleep-httpbin-cross-node"))
    boxes = [r for r in rects(doc) if r[4] not in ("#ffffff", "#f0f0f0")]
    width = float(ET.fromstring(doc).get("width"))
    for x, y, s, size in texts(doc):
        end = x + len(s) * size * diagram.CHAR
        inside = [b for b in boxes if b[0] <= x <= b[0] + b[2] and b[1] <= y <= b[1] + b[3]]
        if inside:
            box = min(inside, key=lambda b: b[2] * b[3])
            assert end <= box[0] + box[2] + 1, f"{s!r} overflows its box"
        assert end <= width, f"{s!r} runs off the picture"


def test_side_by_side_legacy_and_inpod(s1_first, s1_first_inpod):
    single = diagram.svg(s1_first)
    both = diagram.svg_side_by_side([("scenario 1", s1_first), ("scenario 1", s1_first_inpod)])
    words = " | ".join(t[2] for t in texts(both))
    assert "scenario 1 — legacy mode, Istio 1.20" in words and "scenario 1 — inpod mode, Istio 1.29" in words
    for needed in ("NOUT4 REDIRECT :15001", "rule 32764: 0x111/0xfff → table 100",
                   "ipset istio-inpod-probes-v4:", "ztunnel :15001 :15006 :15008 (in this pod's",
                   "P15 mark 0x0→0x100"):
        assert needed in words, needed
    assert float(ET.fromstring(both).get("width")) > 1.5 * float(ET.fromstring(single).get("width"))


def test_a_dropped_packet_is_drawn_red():
    from helpers import values_with
    t = trace_scenario(values_with(**{"ztunnel.tunnelHostIP": "172.18.0.2"}), "legacy", "sleep-httpbin")
    doc = diagram.svg(t)
    fill = diagram.STYLE["drop"][0]
    assert [r for r in rects(doc) if r[4] == fill]
    words = " ".join(" ".join(x[2] for x in texts(doc)).split())   # wrapped lines joined again
    assert "GENEVE decap refused: outer source 10.244.1.1 ≠ remote 172.18.0.2 of pistioout" in words
    assert "verdict: fails: leg 1 first packet dropped in ztunnel" in words


def test_mermaid_flowchart(s1_first):
    text = diagram.mermaid(s1_first)
    lines = text.splitlines()
    assert lines[0] == "flowchart TB"
    subgraphs = [l for l in lines if l.strip().startswith("subgraph ")]
    assert [re.search(r'\["(\S+) —', l).group(1) for l in subgraphs] == ["sleep", "node", "ztunnel", "httpbin"]
    boxes = [h for h in s1_first.hops() if h.stage not in ("veth", "segment", "lo")]
    ids = re.findall(r"^\s+(h\d+)[\[\(\{]", text, flags=re.M)
    assert ids == [f"h{h.n}" for h in sorted(boxes, key=lambda h: (["sleep", "node", "ztunnel", "httpbin"].index(h.netns), h.n))]
    assert '  h1 -->|"2 · eth0 → veth-sleep"| h3' in lines
    assert '  h10 -.->|"11 · veth-zt → eth0 (GENEVE outer)"| h12' in lines
    assert 'h3["3 · P15 mark 0x0→0x100<br/>mangle: tcp, src ∈ ztunnel-pods-ips"]' in text
    for line in lines:   # quotes balanced: labels never break out of their quotes
        assert line.count('"') % 2 == 0, line


def test_markdown_has_one_block_per_walk(s1_first, s1_first_inpod):
    md = diagram.markdown([("scenario 1", s1_first), ("scenario 1", s1_first_inpod)])
    assert md.count("```mermaid") == 2 and md.count("```\n") == 2
    assert "## scenario 1 — legacy mode (Istio 1.20)" in md and "## scenario 1 — inpod mode (Istio 1.29)" in md


# ---------------------------------------------------------------- PNG


def png_pixels(path: Path) -> tuple[int, int, list[bytes]]:
    """Decode an 8-bit RGBA PNG (what cairo writes) into rows of bytes, in pure Python."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, ihdr = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    w, h, depth, ctype = ihdr[:4]
    assert (depth, ctype) == (8, 6)
    raw = zlib.decompress(idat)
    bpp, stride = 4, 4 * w
    rows, prev = [], bytearray(stride)
    for y in range(h):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 0xFF
            elif f == 2:
                line[i] = (line[i] + b) & 0xFF
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        rows.append(bytes(line))
        prev = line
    return w, h, rows


def test_png_is_rendered_with_the_boxes_in_it(tmp_path, s1_first):
    out = tmp_path / "s1.png"
    doc = diagram.svg(s1_first)
    zoom = 0.4   # small enough to decode in pure Python quickly
    try:
        w, h = diagram.render_png(doc, str(out), zoom=zoom)
    except diagram.DiagramError as e:
        pytest.skip(f"no PNG renderer here: {e}")
    root = ET.fromstring(doc)
    assert (w, h) == (int(int(root.get("width")) * zoom + 0.5), int(int(root.get("height")) * zoom + 0.5))
    pw, ph, rows = png_pixels(out)
    assert (pw, ph) == (w, h)

    def count(hex_color: str) -> int:
        rgba = bytes.fromhex(hex_color[1:]) + b"\xff"
        return sum(1 for row in rows for i in range(0, len(row), 4) if row[i:i + 4] == rgba)
    counts = {k: count(diagram.STYLE[k][0]) for k in ("mark", "routing", "socket", "tunnel")}
    # each kind of box is really painted: hundreds of pixels of its fill colour
    assert all(n > 400 for n in counts.values()), counts
    assert count("#ffffff") > 0.5 * w * h       # and the background is white, not transparent


def test_png_zoom_scales_the_image(tmp_path, s1_first):
    try:
        w, h = diagram.render_png(diagram.svg(s1_first), str(tmp_path / "z.png"), zoom=0.5)
    except diagram.DiagramError as e:
        pytest.skip(f"no PNG renderer here: {e}")
    root = ET.fromstring(diagram.svg(s1_first))
    assert (w, h) == (int(int(root.get("width")) * 0.5 + 0.5), int(int(root.get("height")) * 0.5 + 0.5))


# ---------------------------------------------------------------- the command and the committed pictures


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The CLI in this process (the command line's imports are paid once), run from ``cwd``."""
    import contextlib
    import io
    import os

    from noderedirect.cli import main

    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(list(args))
    finally:
        os.chdir(old)
    return subprocess.CompletedProcess(list(args), rc, out.getvalue(), err.getvalue())


def test_diagram_command_writes_each_format(tmp_path):
    res = run_cli("diagram", "--scenario", "7", "--packet", "first", "--out", "p.svg", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "p.svg: svg, 1 walk(s), 6 hops\n"
    assert "plain-b" in (tmp_path / "p.svg").read_text()
    res = run_cli("diagram", "--scenario", "1", "--mode", "both", "--out", "p.md", cwd=tmp_path)
    assert res.returncode == 0 and (tmp_path / "p.md").read_text().count("```mermaid") == 2
    res = run_cli("diagram", "--out", "p.txt", cwd=tmp_path)
    assert res.returncode == 2 and "unknown picture type .txt" in res.stderr


# docs/img/<file> -> the arguments that drew it (docs/tutorial.md shows the same commands)
DOC_IMAGES = {
    "sleep-httpbin-first.svg": ["--scenario", "sleep-httpbin", "--packet", "first"],
    "sleep-httpbin-reply.svg": ["--scenario", "sleep-httpbin", "--packet", "reply"],
    "sleep-httpbin-next.svg": ["--scenario", "sleep-httpbin", "--packet", "next"],
    "external-httpbin-first.svg": ["--scenario", "external-httpbin", "--packet", "first"],
    "node-httpbin.svg": ["--scenario", "node-httpbin", "--packet", "first"],
    "cross-node-first.svg": ["--scenario", "sleep-httpbin-cross-node", "--packet", "first"],
    "legacy-vs-inpod.svg": ["--scenario", "sleep-httpbin", "--packet", "first", "--mode", "both"],
    "legacy-vs-inpod.md": ["--scenario", "sleep-httpbin", "--packet", "first", "--mode", "both"],
}


@pytest.mark.parametrize("name", sorted(DOC_IMAGES))
def test_committed_pictures_are_what_the_command_draws(tmp_path, name):
    committed = ROOT / "docs" / "img" / name
    assert committed.exists(), f"missing {committed}"
    res = run_cli("diagram", *DOC_IMAGES[name], "--out", str(tmp_path / name), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / name).read_text() == committed.read_text(), (
        f"docs/img/{name} is out of date; redraw it with: noderedirect diagram "
        f"{' '.join(DOC_IMAGES[name])} --out docs/img/{name}")
