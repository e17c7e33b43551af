"""The lab: a one-machine stand-in for a Kubernetes node built from network namespaces.

It wires pods, a node and a ztunnel pod together, runs the redirection engine against them and
drives the test scenarios of kernel-notes.md §11 with real traffic. The processes it runs (a
stand-in ztunnel, the test HTTP servers) and the in-netns HTTP client live in this package too.
"""
