"""Generated gRPC stubs for glmvoice.v1 (built from the .proto files beside this file)."""
