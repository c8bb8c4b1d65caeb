"""The HTTP/1.1 front, the REST routes and the WebSocket upgrade."""
