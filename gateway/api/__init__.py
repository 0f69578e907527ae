"""Generated protobuf and gRPC code for the Silogate API (``make proto``)."""
