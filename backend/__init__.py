"""prescore.backend."""
