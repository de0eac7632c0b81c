"""`exai-bridge`: stdio MCP clients (Claude Desktop, old EXAI shim entries) reach the router.

`bridge.relay` carries JSON-RPC messages between stdio and the router's Streamable HTTP
endpoint; `bridge.stdio` reads and writes the lines; `bridge.main` is the console script.
"""
