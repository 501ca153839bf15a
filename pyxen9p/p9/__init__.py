"""9P2000.L: message codec, client and file server."""
