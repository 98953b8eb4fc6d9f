"""Same vectors as sentence-transformers on every backend, from text: folders and tiny models of each architecture."""
