import os

# gRPC's C core logs every failed TLS handshake at INFO on stderr, around our own one-line
# errors and structured logs; it still logs its errors.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
