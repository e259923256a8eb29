"""Optional HTTP query service for a finished job folder (see :mod:`pipeline.serve.app`)."""

from pipeline.serve.app import MicroBatcher, create_app, serve

__all__ = ["MicroBatcher", "create_app", "serve"]
