"""How many kernel objects each design creates, per netns and per kind, and per additional pod.

Counts come from :func:`noderedirect.inventory.counts`, so they agree with ``diff``. The cost of
one more pod is measured, not assumed: the values are rendered with N pods and with N+1 (one
synthetic pod added at a free address of the node's podCIDR), and the totals are subtracted.
Synthetic pods (``--pods N``) are ``default/pod-<i>`` at the first free addresses of the
podCIDR, skipping the network and broadcast addresses, HostIP and the ztunnel IP; they have no
host-side device, so the legacy per-pod rp_filter sysctl is not counted for them. Pure.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from . import desired
from .diff import MODE_LABELS
from .inventory import KINDS, LABELS, counts
from .model import NetnsState, Pod, Rendered, Values

# the rows of a summary: netns touched, then every kind, then iptables rules including hooks
ROWS = ("netns",) + KINDS + ("iptables",)
ROW_LABELS = {"netns": "network namespaces", **LABELS, "iptables": "iptables rules incl. hooks"}


class SummaryError(ValueError):
    """The requested number of pods does not fit the node's podCIDR."""


@dataclass(frozen=True)
class Column:
    key: str                       # "node", "ztunnel", "pod", "total", "per_pod"
    label: str
    counts: tuple[tuple[str, int], ...]

    def get(self, row: str) -> int:
        return dict(self.counts)[row]


@dataclass(frozen=True)
class DesignSummary:
    mode: str
    version: str
    pods: int
    columns: tuple[Column, ...]    # one per netns kind, then total, then per_pod
    notes: tuple[str, ...] = ()

    def column(self, key: str) -> Column:
        for c in self.columns:
            if c.key == key:
                return c
        raise KeyError(key)


@dataclass(frozen=True)
class Summary:
    source: str
    node: str
    pods: int
    synthetic: bool
    designs: tuple[DesignSummary, ...]
    notes: tuple[str, ...] = ()


# ---------------------------------------------------------------- synthetic pods


def free_addresses(values: Values, taken: Iterable[str] = ()) -> list[str]:
    """Addresses of the podCIDR a new pod may take, in order."""
    n = values.node
    skip = {n.host_ip, n.ztunnel_ip, *taken}
    net = ipaddress.ip_network(n.pod_cidr)
    return [str(a) for a in net.hosts() if str(a) not in skip]


def _pod(i: int, ip: str) -> Pod:
    return Pod(namespace="default", name=f"pod-{i}", uid=f"00000000-0000-4000-8000-{i:012d}", ip=ip)


def synthetic_pods(values: Values, n: int) -> tuple[Pod, ...]:
    """``n`` pods at the first free addresses; one more address must stay free, because the
    per-pod cost is measured by adding a pod."""
    if n < 0:
        raise SummaryError(f"--pods {n}: the number of pods cannot be negative")
    free = free_addresses(values)
    if n + 1 > len(free):
        raise SummaryError(
            f"--pods {n} does not fit node.podCIDR {values.node.pod_cidr}: {len(free)} addresses "
            f"are free (without HostIP and the ztunnel IP), and one more than N is needed to "
            f"measure the per-pod cost; use at most {max(len(free) - 1, 0)}")
    return tuple(_pod(i + 1, ip) for i, ip in enumerate(free[:n]))


def extra_pod(values: Values) -> Pod:
    """One more pod at the first free address, with a name and UID nobody uses."""
    free = free_addresses(values, (p.ip for p in values.pods))
    if not free:
        raise SummaryError(f"node.podCIDR {values.node.pod_cidr} has no free address left for one "
                           "more pod, so the per-pod cost cannot be measured")
    used_names = {p.key for p in values.pods}
    used_uids = {p.uid for p in values.pods}
    i = len(values.pods) + 1
    while _pod(i, free[0]).key in used_names or _pod(i, free[0]).uid in used_uids:
        i += 1
    return _pod(i, free[0])


def with_pods(values: Values, pods: tuple[Pod, ...]) -> Values:
    return dataclasses.replace(values, pods=pods)


# ---------------------------------------------------------------- counting


def _col(key: str, label: str, c: dict[str, int]) -> Column:
    return Column(key, label, tuple((r, c.get(r, 0)) for r in ROWS))


def _netns_counts(ns: NetnsState) -> dict[str, int]:
    return {"netns": 1, **counts(ns)}


def _total(rendered: Rendered) -> dict[str, int]:
    out = {r: 0 for r in ROWS}
    for ns in rendered.netns:
        for k, v in _netns_counts(ns).items():
            out[k] += v
    return out


def _design(values: Values, mode: str, rules: Optional[Path]) -> DesignSummary:
    now = desired.render(values, mode, rules=rules)
    more = desired.render(with_pods(values, values.pods + (extra_pod(values),)), mode, rules=rules)
    total, total_more = _total(now), _total(more)
    per_pod = {r: total_more[r] - total[r] for r in ROWS}
    n = len(values.pods)
    notes: list[str] = []
    if mode == "legacy":
        cols = [_col("node", "node", _netns_counts(now.get("node"))),
                _col("ztunnel", "ztunnel", _netns_counts(now.get("ztunnel")))]
    else:
        pods = [ns for ns in now.netns if ns.role.startswith("pod:")]
        cols = [_col("node", "node", _netns_counts(now.get("node")))]
        if pods:
            cols.append(_col("pod", "1 pod netns", _netns_counts(pods[0])))
            rep = counts(pods[0])
            differ = [p.role[4:] for p in pods[1:] if counts(p) != rep]
            if differ:
                notes.append(f"in-pod: '1 pod netns' counts {pods[0].role[4:]}; these pods' "
                             f"knobs give other counts: {', '.join(differ)}")
        else:
            cols.append(_col("pod", "1 pod netns", {}))
            notes.append("in-pod: no pods, so no pod netns; the per-pod column still shows one")
    cols.append(_col("total", f"total ({n} pod{'s' if n != 1 else ''})", total))
    cols.append(_col("per_pod", "+1 pod", per_pod))
    return DesignSummary(mode, str(now.version), n, tuple(cols), tuple(notes))


def summarize(values: Values, pods: Optional[int] = None, rules: Optional[Path] = None) -> Summary:
    """Both designs for ``values``; with ``pods``, for that many synthetic pods instead."""
    synthetic = pods is not None
    if synthetic:
        values = with_pods(values, synthetic_pods(values, pods))
    which = "the N pods and the added one" if synthetic else "the pod added for '+1 pod'"
    notes = [f"synthetic pods ({which}) have no host-side device, so legacy's per-pod "
             "rp_filter sysctl is not counted for them"]
    designs = tuple(_design(values, m, rules) for m in ("legacy", "inpod"))
    return Summary(values.source, values.node.node_name, len(values.pods), synthetic, designs,
                   tuple(notes))


# ---------------------------------------------------------------- output


def to_text(s: Summary) -> str:
    """Both designs side by side: a column per netns, the total, and the cost of one more pod."""
    what = "synthetic pods" if s.synthetic else "pods from the values"
    out = [f"kernel objects on node {s.node} for {s.pods} {what} ({s.source})", ""]
    label_w = max(len(v) for v in ROW_LABELS.values()) + 2
    head1, head2 = " " * label_w, f"{'kind':<{label_w}}"
    widths: list[list[int]] = []
    for d in s.designs:
        ws = [max(len(c.label), 4) + 2 for c in d.columns]
        widths.append(ws)
        title = f"{MODE_LABELS[d.mode]} (Istio {d.version})"
        span = sum(ws)
        head1 += "  │" + f"{title:>{span}}"
        head2 += "  │" + "".join(f"{c.label:>{w}}" for c, w in zip(d.columns, ws))
    out += [head1.rstrip(), head2.rstrip()]
    for row in ROWS:
        line = f"{ROW_LABELS[row]:<{label_w}}"
        for d, ws in zip(s.designs, widths):
            line += "  │" + "".join(f"{c.get(row):>{w}}" for c, w in zip(d.columns, ws))
        out.append(line)
    notes = list(s.notes) + [n for d in s.designs for n in d.notes]
    if notes:
        out.append("")
        out += [f"note: {n}" for n in notes]
    return "\n".join(out) + "\n"


def to_json(s: Summary) -> dict[str, Any]:
    """``{source, node, pods, synthetic, notes, designs: [{mode, version, pods, notes,
    columns: {KEY: {label, counts: {ROW: n}}}}]}``; ROW is each of :data:`ROWS`."""
    return {
        "source": s.source, "node": s.node, "pods": s.pods, "synthetic": s.synthetic,
        "notes": list(s.notes),
        "designs": [{"mode": d.mode, "version": d.version, "pods": d.pods, "notes": list(d.notes),
                     "columns": {c.key: {"label": c.label, "counts": dict(c.counts)}
                                 for c in d.columns}}
                    for d in s.designs],
    }
