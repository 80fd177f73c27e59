"""The frozen teacher as a training stage: adapters, relevance generation and batch targets."""
