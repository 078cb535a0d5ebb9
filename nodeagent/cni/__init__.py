"""The chained CNI plugin that hands each new pod to the node agent (`plugin.py`, run by the container
runtime through the `ambient-cni` wrapper), the handover protocol it shares with the agent
(`protocol.py`), and the step that installs it on a node (`install.py`).

The plugin runs on the node itself, with the node's own Python and none of the project's dependencies:
`plugin.py`, `spec.py`, `protocol.py` and `podcgroup.py` import only the standard library and each other
(Python 3.10 or newer), and `install.py` copies exactly them next to the wrapper.
"""
