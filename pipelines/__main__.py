"""``python -m pipelines``: the raysmith CLI (what submitted Ray Jobs run)."""

from pipelines.cli import main

main()
