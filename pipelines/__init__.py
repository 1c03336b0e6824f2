"""raysmith's platform: CLI, experiment specs, tracking, cluster and jobs, pipeline kinds."""

__version__ = "0.1.0"
