"""The server: aiohttp app factory, signaling, sessions, and the headless bot client."""
