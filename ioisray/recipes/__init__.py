"""One module per workflow; each reads like its algorithm (setup, train, save, cleanup)."""
