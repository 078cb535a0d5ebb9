"""Examples that run on the mesh: the bookinfo sample and its demo."""
