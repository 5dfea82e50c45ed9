"""Command-line entry points (`dlas-train`, `dlas-test`)."""
