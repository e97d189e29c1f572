"""Serving layer (``maskpro.serve``): sparse runtime and OpenAI-compatible server."""
