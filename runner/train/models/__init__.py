"""The job's network: built-in architectures (``builtin``), the user's factory (``factory``), and building and
compiling either from the spec (``build``)."""
