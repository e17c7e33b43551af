"""``apply``, ``plan``, ``status``, ``cleanup`` and ``pod add|remove``: the design in real netns."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from .. import values as values_mod
from ..model import Pod
from .common import add_values_args, load_values

EXIT_CHANGES = 3   # `plan`: changes are pending

NETNS_HELP = "a name under /var/run/netns, or a path such as /proc/PID/ns/net"


def _engine_args(p: argparse.ArgumentParser, *, values: bool = True, values_required: bool = True) -> None:
    if values:
        add_values_args(p, required=values_required)
    p.add_argument("--node-netns", metavar="NS", required=True, help=f"the node's netns: {NETNS_HELP}")
    p.add_argument("--ztunnel-netns", metavar="NS", required=True, help=f"the ztunnel pod's netns: {NETNS_HELP}")
    p.add_argument("--backend", choices=("iptables", "iptables-legacy", "nft"), default="iptables",
                   help="iptables (the nft-based iptables, default), iptables-legacy, or nft: native "
                        "nftables, one table per netns (ztunnel-node / ztunnel-tproxy) holding the set, "
                        "no ipset and no iptables rules (docs/nft.md)")
    p.add_argument("--tunnel", choices=("auto", "geneve", "usergeneve", "vxlan"), default="auto",
                   help="geneve (kernel), usergeneve (user-space GENEVE over TAP), vxlan (kernel stand-in); "
                        "auto = geneve when the kernel has it, else usergeneve")
    p.add_argument("--output", "-o", choices=("text", "json"), default="text")


def register(sub: argparse._SubParsersAction) -> None:
    a = sub.add_parser("apply", help="program the node and ztunnel netns; verify it converged",
                       description="Observe both netns, plan, refuse on conflicts, apply atomically "
                                   "where the kernel allows (one iptables-restore per table, one ipset "
                                   "restore, or with --backend nft one nft transaction per netns; batched "
                                   "routes), then observe and plan again: a non-empty "
                                   "second plan is an error (did not converge). A second apply makes "
                                   "zero changes.")
    _engine_args(a)
    a.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    a.set_defaults(func=run_apply)

    pl = sub.add_parser("plan", help="print what apply would change (exit 0: nothing, 3: changes)",
                        description="Print what apply would change and why (missing, drifted, stale, "
                                    "duplicate) without changing anything. Exit code 0 when the kernel "
                                    "already matches, 3 when there are changes, 1 on conflicts or errors.")
    _engine_args(pl)
    pl.set_defaults(func=run_plan)

    st = sub.add_parser("status", help="observed vs desired, per object",
                        description="Show every desired object with its state (ok / missing / drifted) "
                                    "and anything of ours that should not be there, plus HostIP, "
                                    "tunnel driver, backend and ipset comment mode.")
    _engine_args(st)
    st.set_defaults(func=run_status)

    c = sub.add_parser("cleanup", help="remove exactly what noderedirect owns in both netns",
                       description="Remove our chains, hooks, ipsets (with --backend nft: our nft table, "
                                   "never anything else in nft), rules at our priorities, routes in "
                                   "our tables and our links, and put back the sysctl values recorded "
                                   "before the first apply. Foreign objects are never touched. Ownership "
                                   "is read from the kernel, so no values file is needed.")
    _engine_args(c, values_required=False)
    c.add_argument("--dry-run", action="store_true", help="print what would be removed")
    c.set_defaults(func=run_cleanup)

    pod = sub.add_parser("pod", help="enroll or unenroll one pod (set member + table-100 route)")
    psub = pod.add_subparsers(dest="pod_command", metavar="add|remove", required=True)
    pa = psub.add_parser("add", help="enroll one pod", description="Add one pod's set member (the "
                         "ipset; with --backend nft the set in our nft table) and table-100 route, "
                         "touching nothing else. A later `apply --values` makes the node match the "
                         "values file again (it is the source of truth).")
    _engine_args(pa)
    pa.add_argument("--namespace", required=True)
    pa.add_argument("--name", required=True)
    pa.add_argument("--uid", required=True)
    pa.add_argument("--ip", required=True)
    pa.set_defaults(func=run_pod_add)
    pr = psub.add_parser("remove", help="unenroll one pod", description="Remove one pod's set member "
                         "and route. With --uid the member is removed only if its comment is that UID, "
                         "so a late delete never unenrolls a newer pod that reused the IP.")
    _engine_args(pr)
    pr.add_argument("--ip", required=True)
    pr.add_argument("--uid")
    pr.set_defaults(func=run_pod_remove)


def _engine(args: argparse.Namespace):
    from ..apply import Engine
    from ..host import NetnsRef

    vals = load_values(args) if getattr(args, "values", None) else None
    return Engine(vals, NetnsRef.resolve(args.node_netns), NetnsRef.resolve(args.ztunnel_netns),
                  backend=args.backend, tunnel=args.tunnel, rules=getattr(args, "rules", None))


def _print_changes(res, args, verb: str) -> None:
    if args.output == "json":
        json.dump({"changes": [_change_json(c) for c in res.applied or res.plan.changes],
                   "warnings": res.plan.warnings, "notes": res.notes,
                   "seconds": round(res.seconds, 4), "changed": res.changed}, sys.stdout, indent=2)
        print()
        return
    for n in res.notes:
        print(f"note: {n}")
    for w in res.plan.warnings:
        print(f"warning: {w}")
    if res.plan.empty:
        print(f"{verb}: no changes (already converged)")
        return
    print(res.plan.text(), end="")
    done = "would change" if getattr(args, "dry_run", False) else "changed"
    print(f"{verb}: {done} {len(res.plan.changes)} objects in {res.seconds * 1000:.1f} ms")


def _change_json(c) -> dict:
    return {"netns": c.role, "kind": c.kind, "action": c.action, "object": c.desc, "reason": c.reason}


def run_apply(args: argparse.Namespace) -> int:
    with _engine(args) as eng:
        res = eng.apply(dry_run=args.dry_run)
        _print_changes(res, args, "apply")
    return 0


def run_plan(args: argparse.Namespace) -> int:
    with _engine(args) as eng:
        eng.check_features()
        p = eng.plan()
        if args.output == "json":
            json.dump({"changes": [_change_json(c) for c in p.changes], "conflicts": p.conflicts,
                       "warnings": p.warnings, "notes": eng.notes}, sys.stdout, indent=2)
            print()
        else:
            for n in eng.notes:
                print(f"note: {n}")
            print(p.text(), end="")
    if p.conflicts:
        return 1
    return 0 if p.empty else EXIT_CHANGES


def run_status(args: argparse.Namespace) -> int:
    from ..status import status, status_text

    with _engine(args) as eng:
        st = status(eng)
    if args.output == "json":
        json.dump(st, sys.stdout, indent=2)
        print()
    else:
        sys.stdout.write(status_text(st))
    return 0


def run_cleanup(args: argparse.Namespace) -> int:
    with _engine(args) as eng:
        res = eng.cleanup(dry_run=args.dry_run)
    if args.output == "json":
        json.dump({"removed": [_change_json(c) for c in res.plan.changes], "dry_run": args.dry_run},
                  sys.stdout, indent=2)
        print()
    elif res.plan.empty:
        print("cleanup: nothing of ours found")
    else:
        print(res.plan.text(), end="")
        print(f"cleanup: {'would remove' if args.dry_run else 'removed'} {len(res.plan.changes)} objects")
    return 0


def _pod_from_args(args) -> Pod:
    return Pod(namespace=values_mod.dns_name("--namespace", args.namespace, label=True),
               name=values_mod.dns_name("--name", args.name), uid=values_mod.uid("--uid", args.uid),
               ip=values_mod.ipv4("--ip", args.ip))


def run_pod_add(args: argparse.Namespace) -> int:
    pod = _pod_from_args(args)
    with _engine(args) as eng:
        done = eng.pod_add(pod)
    print("\n".join(done) if args.output == "text" else json.dumps({"done": done, "pod": asdict(pod)}))
    return 0


def run_pod_remove(args: argparse.Namespace) -> int:
    ip = values_mod.ipv4("--ip", args.ip)
    uid = values_mod.uid("--uid", args.uid) if args.uid else None
    with _engine(args) as eng:
        done = eng.pod_remove(ip, uid)
    if args.output == "json":
        print(json.dumps({"done": done}))
    else:
        print("\n".join(done) if done else f"{ip} is not enrolled")
    return 0
