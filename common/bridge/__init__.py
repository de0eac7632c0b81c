"""`exai-bridge`: stdio MCP clients (Claude Desktop, old EXAI shim entries) reach the router.

`common.bridge.relay` carries JSON-RPC messages between stdio and the router's Streamable HTTP
endpoint; `common.bridge.stdio` reads and writes the lines; `common.bridge.main` is the console script.
"""
