"""``noderedirect render --mode inpod``: every pod netns's restore file plus the node, per era."""

from __future__ import annotations

from helpers import EXAMPLE

from noderedirect import cli

POD_HEADER = "# netns pod:default/{} (inpod mode, Istio {})\n"


def render_out(capsys, *extra: str) -> str:
    assert cli.main(["render", "--mode", "inpod", "--values", str(EXAMPLE), *extra]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    return out


def section(out: str, header: str) -> str:
    """One netns's block of the output, from its header to the next one."""
    start = out.index(header)
    end = out.find("# netns ", start + len(header))
    return out[start:end if end != -1 else None]


def test_default_prints_node_and_every_pod(capsys):
    out = render_out(capsys)
    assert [l for l in out.splitlines() if l.startswith("# netns ")] == [
        "# netns node (inpod mode, Istio 1.29)",
        "# netns pod:default/sleep (inpod mode, Istio 1.29)",
        "# netns pod:default/httpbin (inpod mode, Istio 1.29)",
    ]
    node = section(out, "# netns node ")
    assert ("* nat\n-N ISTIO_POSTRT\n-I POSTROUTING 1 -j ISTIO_POSTRT\n"
            "-A ISTIO_POSTRT -m owner --socket-exists -p tcp -m set --match-set istio-inpod-probes-v4 "
            "dst -j SNAT --to-source 169.254.7.127\nCOMMIT\n") in node
    assert 'add istio-inpod-probes-v4 10.244.1.6 comment "7c2e3d4f-1b5e-4d66-8f2b-2c3d4e5f6a06"\n' in node
    for name in ("sleep", "httpbin"):
        pod = section(out, POD_HEADER.format(name, "1.29"))
        assert "## ip rules (ip rule show)\n32764:\tfrom all fwmark 0x111/0xfff lookup 100\n" in pod
        assert "## routes (ip route show table N)\ntable 100:\n  local default dev lo scope host\n" in pod
        # the example has dnsCapture: false -> no raw table, no DNS redirect
        assert "* mangle\n-N ISTIO_PRERT\n-N ISTIO_OUTPUT\n" in pod and "* raw" not in pod
        assert "-j REDIRECT --to-ports 15006\n" in pod and "15053" not in pod
        assert "ip6tables" not in pod


def test_inpod_version_selects_the_era(capsys):
    out = render_out(capsys, "--inpod-version", "1.21")
    pod = section(out, POD_HEADER.format("sleep", "1.21"))
    assert "-j TPROXY --on-port 15006 --tproxy-mark 0x111/0xfff\n" in pod
    assert "REDIRECT --to-ports 15006" not in pod and "-A PREROUTING -j ISTIO_PRERT\n" in pod
    node = section(out, "# netns node ")
    assert "-A POSTROUTING -j ISTIO_POSTRT\n" in node
    assert "--match-set istio-inpod-probes dst" in node
    assert "create istio-inpod-probes hash:ip family inet" in node

    out = render_out(capsys, "--inpod-version", "1.26")
    assert "-A POSTROUTING -j ISTIO_POSTRT\n" in section(out, "# netns node ")
    assert "# netns pod:default/sleep (inpod mode, Istio 1.26)\n" in out


def test_bad_inpod_version_is_a_usage_error(capsys):
    try:
        cli.main(["render", "--mode", "inpod", "--values", str(EXAMPLE), "--inpod-version", "1.20"])
    except SystemExit as e:
        assert e.code == 2
    else:
        raise AssertionError("--inpod-version 1.20 was accepted")
    assert "invalid choice: '1.20'" in capsys.readouterr().err
