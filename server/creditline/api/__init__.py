"""The gRPC side: servicers, the server's wiring, security; the only code that imports the
generated protobuf modules (creditline.v1)."""
