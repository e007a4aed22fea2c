"""Domain values, the wire protocol and the error tree.

Nothing here performs I/O or imports a framework: the broker, the HTTP
API, clients and tests all share this one definition of the protocol.
"""
