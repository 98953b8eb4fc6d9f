"""The HTTP API (the front): the Litestar app, its routes, the hot embeddings route, body decoding, the server."""
