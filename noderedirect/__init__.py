"""noderedirect: Istio ambient mesh's original node-level traffic redirection, re-implemented.

The data flow is one way: source of pods -> desired state -> rendered objects -> plan -> apply -> verify.
Everything up to the plan is pure (see DESIGN in docs/).
"""

__version__ = "0.1.0"
