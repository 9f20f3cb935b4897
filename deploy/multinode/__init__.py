"""Multi-node deployment: node start script and the two-namespace lab."""
