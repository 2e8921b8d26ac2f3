"""The Pulse wire protocol, shared by the client and the local server."""
