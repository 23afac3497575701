"""The server: the aiohttp app (signaling, REST, render and avatar routes, access control,
observability), one session per call, the spoken conversation, and the headless bot client."""
