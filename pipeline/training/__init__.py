"""Training GlimpsePrune's modules (glimpse embeddings and the VIP) on Ray Train."""
