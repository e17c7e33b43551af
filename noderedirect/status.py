"""``status``: every desired object with its observed state, derived from one plan (no writes)."""

from __future__ import annotations

from typing import Any

from . import names, nftapply
from .model import IpRule, IpsetEntry, IpsetSet, Link, Route, Sysctl
from .plan import ownership, plan_netns
from .render import declared_chains


def _state(change) -> tuple[str, str]:
    if change is None:
        return "ok", ""
    return ("missing" if change.reason == "missing" else "drifted"), change.reason


def status(engine) -> dict[str, Any]:
    rendered = engine.desired()
    n = engine.node_params().node
    out: dict[str, Any] = {
        "node": n.node_name,
        "host_ip": n.host_ip, "host_ip_source": n.host_ip_source,
        "tunnel_remote": n.tun_host_ip, "geneve_port": n.geneve_port,
        "istio_version": str(n.istio_version), "backend": engine.backend,
        "tunnel_driver": engine.driver.name,
        "ipset_comments": "on (UID per member, as the code intended)" if n.ipset_comments
                          else "off (as real 1.18-1.20 nodes showed)",
        "notes": list(engine.notes), "netns": [],
    }
    for want in rendered.netns:
        table = None
        if engine.variant == "native":
            # nft backend: our table replaces the ipset and the iptables rules
            table = nftapply.desired_table(want)
            p = engine.plan_nft_netns(want)
            want = nftapply.without_firewall(want)
        else:
            obs = engine.observe(want)
            p = plan_netns(want, obs, ownership(want.role))
        by_obj = {id(c.obj): c for c in p.changes if c.obj is not None}
        by_key = {(c.kind, c.obj): c for c in p.changes if c.obj is not None}
        objects: list[dict[str, str]] = []

        def add(kind: str, text: str, change) -> None:
            state, detail = _state(change)
            objects.append({"kind": kind, "object": text, "state": state, "detail": detail})

        if table is not None:
            for text, ch in nftapply.status_objects(table, p.changes):
                add("nft", text, ch)
        for s in want.ipsets:
            ch = next((c for c in p.changes if c.kind == "ipset" and c.action in ("create", "rebuild")), None)
            add("ipset", s.show(), ch)
        for e in want.ipset_entries:
            add("ipset", e.show(), by_key.get(("ipset", e)))
        for table in names.TABLE_ORDER:
            rules = [r for r in want.iptables if r.table == table]
            for chain in declared_chains(rules, table):
                ch = next((c for c in p.changes if c.kind == "iptables"
                           and c.desc.startswith(f"{table} chain {chain}")), None)
                add("iptables", f"{table} chain {chain} ({sum(1 for r in rules if r.chain == chain)} rules)", ch)
            for r in rules:
                if r.is_hook:
                    ch = next((c for c in p.changes if c.action == "hook" and c.desc.endswith(f"{r.chain} 1 {r.args}")
                               and c.desc.startswith(table)), None)
                    add("iptables", f"{table} {r.chain} {r.args}", ch)
            builtin_own = [r for r in rules if r.chain in names.BUILTIN_CHAINS[table] and not r.is_hook]
            if builtin_own:
                ch = next((c for c in p.changes if c.kind == "iptables" and c.desc.startswith(f"{table} PREROUTING")), None)
                add("iptables", f"{table} PREROUTING: {len(builtin_own)} rules of ours", ch)
        for r in want.ip_rules:
            add("ip_rule", r.show().replace(":\t", ": "), by_key.get(("ip_rule", r)))
        for r in want.routes:
            add("route", r.show_with_table(), by_key.get(("route", r)))
        for l in want.links:
            add("link", l.show(), by_key.get(("link", l)))
        for s in want.sysctls:
            add("sysctl", s.show(), by_key.get(("sysctl", s)))
        extra = [{"kind": c.kind, "object": c.desc, "state": "stale", "detail": c.reason}
                 for c in p.changes if c.action in ("delete", "destroy", "unhook")]
        out["netns"].append({"role": want.role, "objects": objects + extra,
                             "conflicts": list(p.conflicts), "warnings": list(p.warnings)})
    return out


def status_text(st: dict[str, Any]) -> str:
    lines = [f"node {st['node']}: Istio {st['istio_version']}, backend {st['backend']}, "
             f"tunnel {st['tunnel_driver']} (port {st['geneve_port']})",
             f"HostIP {st['host_ip']} ({st['host_ip_source']}); tunnel remote {st['tunnel_remote']}",
             f"ipset comments: {st['ipset_comments']}"]
    lines += [f"note: {n}" for n in st["notes"]]
    for ns in st["netns"]:
        counts: dict[str, int] = {}
        for o in ns["objects"]:
            counts[o["state"]] = counts.get(o["state"], 0) + 1
        summary = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
        lines.append(f"\n# netns {ns['role']}: {summary}")
        for o in ns["objects"]:
            detail = f"  ({o['detail']})" if o["detail"] else ""
            lines.append(f"  {o['state']:<8} {o['kind']:<8} {o['object']}{detail}")
        lines += [f"  CONFLICT {c}" for c in ns["conflicts"]]
        lines += [f"  warning  {w}" for w in ns["warnings"]]
    return "\n".join(lines) + "\n"
