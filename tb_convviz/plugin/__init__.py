"""The TensorBoard side of tb-convviz: loader, routes, reading and rendering (no torch)."""
