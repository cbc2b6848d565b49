"""prescore.server."""
