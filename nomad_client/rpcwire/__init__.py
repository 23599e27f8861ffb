"""The client<->server RPC wire: framing, errors, addresses and TLS settings.

Plain building blocks shared by the server's listener (``server/rpc_listener.py``) and the
client's transport (``client/rpc_tcp.py``); nothing here opens a socket.
"""
