"""The files that travel with a checkpoint as Hub remote code (flat siblings, relative imports only)."""
