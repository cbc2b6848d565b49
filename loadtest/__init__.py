"""prescore.loadtest."""
