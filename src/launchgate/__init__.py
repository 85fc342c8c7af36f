"""launchgate: export-control enforcement in front of a cloud instance-launch API."""

__version__ = "0.1.0"
