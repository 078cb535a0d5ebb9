"""Where the node agent learns which pods of its node exist and where their namespaces are.

`PodSource` is the seam; `local.LocalPodSource` reads pods from discovery and finds their netns by path.
"""
